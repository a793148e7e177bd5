"""Multi-head self-attention with iRPE terms: the DETR encoder's attention.

Parameters are named as torch.nn.MultiheadAttention's (in_proj_weight, in_proj_bias, out_proj), plus
rpe_q / rpe_k / rpe_v, so the published DETR and DETR-with-iRPE checkpoints load as they are.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detr_irpe import triton_attention
from detr_irpe.flex import check_attention_impl, flex_irpe_attention, use_flex
from detr_irpe.irpe import build_rpe, query_key_terms


class RPEMultiheadAttention(nn.Module):
    """Self-attention whose logits carry iRPE on queries/keys and whose output carries iRPE on values.

    logits = (q * d^-0.5) k^T + rpe_k(q * d^-0.5) + rpe_q(k * d^-0.5)^T, then the key padding mask;
    out = softmax(logits) v + rpe_v(softmax(logits)).
    Where no attention weights are needed (no iRPE on values, need_weights=False) this runs
    F.scaled_dot_product_attention with the iRPE terms as its additive float mask; otherwise the
    explicit softmax. Both give the same numbers. attention_impl 'flex' (or 'auto' on CUDA) runs those
    cases through flex_attention with the iRPE terms inside the kernel instead (detr_irpe.flex.use_flex);
    'triton' runs every case but need_weights through fused Triton kernels, iRPE on values included
    (detr_irpe.triton_attention).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, rpe_config=None, attention_impl='auto'):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}: '
                             'choose --hidden_dim a multiple of --nheads.')
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(rpe_config, self.head_dim, num_heads)
        check_attention_impl(attention_impl, rpe_config)
        self.attention_impl = attention_impl  # 'auto', 'sdpa', 'flex' (detr_irpe.flex.use_flex) or 'triton'

    def forward(self, query, key, value, key_padding_mask=None, height=None, width=None, need_weights=False):
        """query, key, value: (L, B, E) sequence-first, as in DETR; key_padding_mask: (B, L), True on padding.

        height, width: the feature map whose row-major tokens these are (they define relative positions).
        Returns (output (L, B, E), attention weights (B, H, L, L) or None).
        """
        B, E = query.shape[1], self.embed_dim
        q, k, v = self.project(query, key, value)
        dropout_p = self.dropout if self.training else 0.0
        if self.attention_impl == 'triton' and not need_weights:
            out = triton_attention.triton_irpe_attention(q, k, v, self.rpe_q, self.rpe_k, self.rpe_v,
                                                         key_padding_mask, height, width, dropout_p)
            return self.out_proj(out.permute(2, 0, 1, 3).reshape(-1, B, E)), None
        if use_flex(self.attention_impl, q, self.rpe_q, self.rpe_k, self.rpe_v, need_weights, dropout_p):
            # The iRPE terms inside one flex_attention kernel (detr_irpe.flex), no (B, H, L, L) tensor.
            out = flex_irpe_attention(q, k, v, self.rpe_q, self.rpe_k, key_padding_mask, height, width)
            return self.out_proj(out.permute(2, 0, 1, 3).reshape(-1, B, E)), None
        scale = self.head_dim ** -0.5
        bias = self.logits_bias(q, k * scale, key_padding_mask, height, width)

        weights = None
        # SDPA fuses softmax and its mask where it can; on CPU it has no fused kernel with dropout, and its
        # fallback is slower than the explicit softmax below.
        if self.rpe_v is None and not need_weights and (dropout_p == 0.0 or q.is_cuda):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)
        else:
            weights = F.dropout(add_query_key_products(bias, q, k).softmax(dim=-1), dropout_p, self.training)
            out = weights @ v
            if self.rpe_v is not None:
                out = out + self.rpe_v(weights, height, width)
        out = out.permute(2, 0, 1, 3)
        if torch.compiler.is_exporting():
            # torch.export records this reshape as a view of SDPA's output as laid out on CPU, (L, B, H, d);
            # the ONNX exporter's retrace gets a contiguous (B, H, L, d) one, which no view can reshape.
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(-1, B, E)
        return self.out_proj(out), weights

    def project(self, query, key, value=None):
        """(L, B, E) inputs -> (B, H, L, d) q (scaled by d^-0.5), k and v (None without value)."""
        E, H, d, B = self.embed_dim, self.num_heads, self.head_dim, query.shape[1]
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[:2 * E], b[:2 * E]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w[:E], b[:E]), F.linear(key, w[E:2 * E], b[E:2 * E])
        v = None if value is None else F.linear(value, w[2 * E:], b[2 * E:])
        # (L, B, E) -> (B, H, L, d)
        q, k, v = (None if t is None else t.reshape(t.shape[0], B, H, d).permute(1, 2, 0, 3) for t in (q, k, v))
        return q * d ** -0.5, k, v

    @torch.no_grad()
    def irpe_logits(self, query, key, height=None, width=None):
        """The extra attention logits b_ij that iRPE adds (paper Fig. 5): rpe_k(q) + rpe_q(k)^T, without the
        padding mask. query, key: (L, B, E) as forward takes them. Returns (B or 1, H or 1, L, L), or None
        without iRPE on queries or keys."""
        q, k, _ = self.project(query, key)
        return self.logits_bias(q, k * self.head_dim ** -0.5, None, height, width)

    def logits_bias(self, q, k, key_padding_mask, height, width):
        """rpe_k(q) + rpe_q(k)^T with -inf on padded keys, in the iRPE term's own storage.

        q, k: (B, H, L, d), both already scaled. Returns None, (B, 1, 1, L) (padding only), or a
        (B or 1, H, L, L) tensor made here, which add_query_key_products may overwrite.
        """
        if self.rpe_k is not None and self.rpe_q is not None:
            total = query_key_terms(self.rpe_q, self.rpe_k, q, k, height, width)  # one (B, H, L, L) pass
        elif self.rpe_k is not None:
            total = self.rpe_k(q, height, width)
        elif self.rpe_q is not None:
            total = self.rpe_q(k, height, width, transpose_output=True)
        elif key_padding_mask is None:
            return None
        else:
            pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            return pad.masked_fill_(key_padding_mask, float('-inf'))[:, None, None, :]
        if key_padding_mask is not None:
            # The iRPE term is a fresh tensor: write -inf into the padded key columns only, rather than
            # adding a (B, 1, 1, L) row of zeros and -inf to every entry (a whole (B, H, L, L) pass).
            # Outside autograd, so the gradient passes through unchanged, as it did through that add
            # (index_fill_'s own backward would copy it): at padded keys it is exactly zero anyway, the
            # softmax weight there being 0.
            if total.shape[0] != key_padding_mask.shape[0]:
                total = total.expand(key_padding_mask.shape[0], *total.shape[1:]).contiguous()
            with torch.no_grad():
                # One pass over (B, H, L, L) on GPU, where finding the columns would wait for it, and under
                # torch.compile / torch.export, where the columns' count is data a graph cannot branch on.
                if total.is_cuda or torch.compiler.is_compiling():
                    total.masked_fill_(key_padding_mask[:, None, None, :], float('-inf'))
                else:
                    for b, padded in enumerate(key_padding_mask):
                        columns = padded.nonzero().flatten()
                        if columns.numel():
                            total[b].index_fill_(-1, columns, float('-inf'))
        return total


class _AddQueryKeyProducts(torch.autograd.Function):
    """bias + q @ k^T, computed into bias's own storage (one GEMM with beta=1, no new (B, H, L, L))."""

    @staticmethod
    def forward(ctx, bias, q, k):
        B, H, L, d = q.shape
        ctx.save_for_backward(q, k)
        bias.view(B * H, L, -1).baddbmm_(q.reshape(B * H, L, d), k.reshape(B * H, -1, d).transpose(1, 2))
        ctx.mark_dirty(bias)
        return bias

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        grad_q = grad @ k if ctx.needs_input_grad[1] else None
        grad_k = grad.transpose(-2, -1) @ q if ctx.needs_input_grad[2] else None
        return grad, grad_q, grad_k


def add_query_key_products(bias, q, k):
    """logits (B, H, L, L) = q @ k^T + bias; bias None or broadcastable, and overwritten when it already
    has the logits' shape (it is then a temporary of RPEMultiheadAttention.logits_bias)."""
    if bias is None:
        return q @ k.transpose(-2, -1)
    B, H, L, _ = q.shape
    shape = (B, H, L, k.shape[2])
    if bias.shape != shape or not bias.is_contiguous():
        bias = bias.expand(shape).contiguous()  # the copy baddbmm would make of a broadcast input anyway
    return _AddQueryKeyProducts.apply(bias, q, k)
