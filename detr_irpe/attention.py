"""Multi-head self-attention with iRPE terms: the DETR encoder's attention.

Parameters are named as torch.nn.MultiheadAttention's (in_proj_weight, in_proj_bias, out_proj), plus
rpe_q / rpe_k / rpe_v, so the published DETR and DETR-with-iRPE checkpoints load as they are.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detr_irpe.irpe import build_rpe


class RPEMultiheadAttention(nn.Module):
    """Self-attention whose logits carry iRPE on queries/keys and whose output carries iRPE on values.

    logits = (q * d^-0.5) k^T + rpe_k(q * d^-0.5) + rpe_q(k * d^-0.5)^T, then the key padding mask;
    out = softmax(logits) v + rpe_v(softmax(logits)).
    Where no attention weights are needed (no iRPE on values, need_weights=False) this runs
    F.scaled_dot_product_attention with the iRPE terms as its additive float mask; otherwise the
    explicit softmax. Both give the same numbers.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, rpe_config=None):
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

    def forward(self, query, key, value, key_padding_mask=None, height=None, width=None, need_weights=False):
        """query, key, value: (L, B, E) sequence-first, as in DETR; key_padding_mask: (B, L), True on padding.

        height, width: the feature map whose row-major tokens these are (they define relative positions).
        Returns (output (L, B, E), attention weights (B, H, L, L) or None).
        """
        L, B, E = query.shape
        H, d = self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[:2 * E], b[:2 * E]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w[:E], b[:E]), F.linear(key, w[E:2 * E], b[E:2 * E])
        v = F.linear(value, w[2 * E:], b[2 * E:])
        # (L, B, E) -> (B, H, L, d)
        q, k, v = (t.reshape(t.shape[0], B, H, d).permute(1, 2, 0, 3) for t in (q, k, v))
        scale = d ** -0.5
        q = q * scale

        logits_bias = None
        if self.rpe_k is not None:
            logits_bias = self.rpe_k(q, height, width)
        if self.rpe_q is not None:
            term = self.rpe_q(k * scale, height, width).transpose(2, 3)
            logits_bias = term if logits_bias is None else logits_bias + term
        if key_padding_mask is not None:
            pad = torch.zeros(B, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
            pad.masked_fill_(key_padding_mask[:, None, None, :], float('-inf'))
            logits_bias = pad if logits_bias is None else logits_bias + pad

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if self.rpe_v is None and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=logits_bias, dropout_p=dropout_p, scale=1.0)
        else:
            logits = q @ k.transpose(-2, -1)
            if logits_bias is not None:
                logits = logits + logits_bias
            weights = F.dropout(logits.softmax(dim=-1), dropout_p, self.training)
            out = weights @ v
            if self.rpe_v is not None:
                out = out + self.rpe_v(weights, height, width)
        out = out.permute(2, 0, 1, 3).reshape(-1, B, E)
        return self.out_proj(out), weights
