"""iRPE attention fused into one Triton kernel per pass (--attention_impl triton): iRPE on queries, keys and
values without any (B, H, L, L) tensor, forward and backward.

With q scaled by d^-0.5 (as RPEMultiheadAttention.project gives it), the logit of query i and key j is

    s_ij = q_i . k_j + qr[i, idk(i, j)] + kr[j, idq(j, i)]       (Eq. 14 + 15; -inf at padded keys)

where qr = rpe_k.per_bucket(q) (B, H, L, Kk) and kr = rpe_q.per_bucket(k * d^-0.5) (B, H, L, Kq) hold each
token's term against every bucket, and the output is

    out_i = sum_j p_ij v_j + sum_t w_it r_t,   p = softmax(s), w_it = sum_j p_ij [idv(i, j) = t]   (Eq. 16)

with r the value table of rpe_v (Kv, d). The kernels walk (BLOCK_M queries x BLOCK_N keys) tiles as flash
attention does (online softmax, the logits recomputed in the backward from the row's log-sum-exp). The per-bucket
sums w of a query block accumulate in float32 rows of memory that only its program touches, CHUNK buckets at a
time: each row of a tile has its own ids, so no matrix product applies, and a (BLOCK_M, BLOCK_N, buckets) select
would not fit in registers. w r is one small matmul after the kernel, so the value table's gradient is autograd's.
The backward: dp_ij = dout_i . v_j + dw[i, idv(i, j)], ds_ij = p_ij (dp_ij - delta_i) with
delta_i = dout_i . o_i + dw_i . w_i, then dq = ds k, dk = ds^T q, dv = p^T dout and the per-bucket sums
dqr[i, t] = sum_j ds_ij [idk(i, j) = t] (a kernel per query block) and dkr[j, t] = sum_i ds_ij [idq(j, i) = t]
(a kernel per key block). Attention dropout drops pairs by a Philox draw per (b, h, i, j) from one seed per
call, so the backward recomputes the forward's choice; delta keeps its form with the kept, rescaled weights.

The kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how the suite checks them (detr_irpe.lab.gpu_check's triton_attention check).
Not covered, and refused with a message: the cross method (two tables per term). Returning the attention weights
is the explicit path's (RPEMultiheadAttention takes it when they are asked for).
"""
import os

import torch

from detr_irpe.irpe import iRPE_Cross, key_major_ids

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without triton
    triton = None

INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
CROSS_REFUSAL = ('--attention_impl triton has no cross method (two tables per iRPE term): use --attention_impl auto '
                 'or sdpa, or another method in --enc_rpe2d (e.g. product).')
# Query and key rows per tile, and buckets per step of the per-bucket sums, whose (BLOCK_M, BLOCK_N, CHUNK)
# select dominates the registers.
BLOCK_M, BLOCK_N, CHUNK, NUM_WARPS = 16, 16, 16, 4


def problem(q, rpe_q, rpe_k, rpe_v):
    """Why triton_irpe_attention cannot run on these inputs and settings, or None."""
    if triton is None:
        return ('--attention_impl triton needs triton, which this torch install lacks: install the triton that '
                f'matches torch {torch.__version__} (`pip install triton`), or use --attention_impl auto.')
    if any(isinstance(m, iRPE_Cross) for m in (rpe_q, rpe_k, rpe_v)):
        return CROSS_REFUSAL
    if not q.is_cuda and not INTERPRETING:
        return (f'--attention_impl triton runs on CUDA, but the encoder runs on {q.device.type}: use --attention_impl '
                'auto or sdpa there (the suite runs the kernels on CPU under TRITON_INTERPRET=1).')
    return None


def triton_irpe_attention(q, k, v, rpe_q=None, rpe_k=None, rpe_v=None, key_padding_mask=None, height=None,
                          width=None, dropout_p=0.0, seed=None):
    """softmax(q k^T + iRPE terms, -inf at padded keys) v + the iRPE term on values, without (B, H, L, L) tensors.

    q: (B, H, L, d) scaled by d^-0.5; k, v: (B, H, L, d); key_padding_mask: (B, L) True on padding, or None.
    dropout_p: attention dropout, on the weights that multiply v and that the iRPE term on values sums, as
    F.dropout after the softmax; which pairs it drops follows from seed (by default drawn from torch's CPU
    generator), the same in the backward (dropout_mask gives them). Returns (B, H, L, d) in q's dtype.
    """
    why = problem(q, rpe_q, rpe_k, rpe_v)
    if why is not None:
        raise ValueError(why)
    B, H, L, _ = q.shape
    dtype = q.dtype

    def per_bucket(module, x):  # (B, H, L, K) view, broadcast entries with stride 0
        return module.per_bucket(x).to(dtype).expand(B, H, L, module.num_buckets)

    def ids(module):
        return module.bucket_ids(L, height, width, q.device)

    qr = per_bucket(rpe_k, q) if rpe_k is not None else None
    kr = per_bucket(rpe_q, k * q.shape[-1] ** -0.5) if rpe_q is not None else None
    # rpe_q's term at (i, j) reads bucket(j, i): its ids transposed, contiguous (cached per map size).
    id_q = key_major_ids(ids(rpe_q), 0) if rpe_q is not None else None
    id_v = ids(rpe_v) if rpe_v is not None else None
    num_v = rpe_v.num_buckets if rpe_v is not None else 0
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, ())) if dropout_p > 0 else 0
    out, weights = _attention(q, k, v, qr, ids(rpe_k) if rpe_k is not None else None, kr, id_q, id_v, num_v, mask,
                              float(dropout_p), seed)
    if rpe_v is not None:
        out = out + torch.matmul(weights, rpe_v.lookup_table_weight.to(dtype))
    return out


def dropout_mask(seed, batch, heads, length, dropout_p, device):
    """(batch, heads, length, length) float32: 1 / (1 - dropout_p) where triton_irpe_attention called with this seed
    keeps the attention weight of a pair, 0 where its dropout drops it."""
    out = torch.empty(batch * heads, length, length, device=device)
    _dropout_mask_kernel[(triton.cdiv(length, BLOCK_M), batch * heads)](out, length, seed, float(dropout_p),
                                                                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out.view(batch, heads, length, length)


@torch.compiler.disable  # under torch.compile: run as is, a graph break per layer (dynamo does not trace these launches)
def _attention(*args):
    return _Attention.apply(*args)


class _Attention(torch.autograd.Function):
    """(out (B, H, L, d), w (B, H, L, Kv)) of the module docstring; qr, kr and their ids may be None."""

    @staticmethod
    def forward(ctx, q, k, v, qr, id_k, kr, id_q, id_v, num_v, mask, dropout_p, seed):
        B, H, L, D = q.shape
        a = _Args(q, k, v, qr, id_k, kr, id_q, id_v, num_v, mask, dropout_p, seed)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
        weights = a.sums(num_v)
        if L:
            _forward_kernel[(triton.cdiv(L, BLOCK_M), B * H)](
                *a.arguments(), out, lse, weights, *out.stride(), **a.flags(), num_warps=NUM_WARPS)
        weights = a.unpadded(weights, num_v)
        ctx.save_for_backward(q, k, v, qr, id_k, kr, id_q, id_v, mask, out, lse, weights)
        ctx.num_v, ctx.dropout_p, ctx.seed = num_v, dropout_p, seed
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        q, k, v, qr, id_k, kr, id_q, id_v, mask, out, lse, weights = ctx.saved_tensors
        B, H, L, D = q.shape
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        # sum_j p_ij dp_ij, the softmax backward's row term (with dropout: of the kept, rescaled weights)
        delta = (grad_out.float() * out.float()).sum(-1)
        if ctx.num_v:
            grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights
            delta += (grad_weights.float() * weights.float()).sum(-1)
        else:
            grad_weights = weights  # empty; never read
        a = _Args(q, k, v, qr, id_k, kr, id_q, id_v, ctx.num_v, mask, ctx.dropout_p, ctx.seed)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        num_k, num_q = (x.shape[-1] if x is not None else 0 for x in (qr, kr))
        dqr, dkr = a.sums(num_k), a.sums(num_q)
        if L:
            common = (*a.arguments(), grad_out, grad_weights, lse, delta, *grad_out.stride(), *grad_weights.stride())
            _backward_queries_kernel[(triton.cdiv(L, BLOCK_M), B * H)](
                *common, dq, dqr, *dq.stride(), **a.flags(), num_warps=NUM_WARPS)
            _backward_keys_kernel[(triton.cdiv(L, BLOCK_N), B * H)](
                *common, dk, dv, dkr, *dk.stride(), *dv.stride(), **a.flags(), num_warps=NUM_WARPS)
        return (dq, dk, dv, a.unpadded(dqr, num_k) if qr is not None else None, None,
                a.unpadded(dkr, num_q) if kr is not None else None, None, None, None, None, None, None)


class _Args:
    """The tensors, strides and flags every kernel takes, with stand-ins for the absent iRPE terms."""

    def __init__(self, q, k, v, qr, id_k, kr, id_q, id_v, num_v, mask, dropout_p, seed):
        self.q, self.k, self.v = q, k, v
        self.dropout_p, self.seed = dropout_p, seed
        self.qr, self.id_k = (qr, id_k) if qr is not None else (q, None)
        self.kr, self.id_q = (kr, id_q) if kr is not None else (q, None)
        self.id_v, self.num_v, self.mask = id_v, num_v, mask
        present = [t for t in (id_k, id_q, id_v) if t is not None]
        self.no_ids = present[0] if present else torch.zeros(1, 1, dtype=torch.int32, device=q.device)
        B, H, L, _ = q.shape
        block = max(BLOCK_M, BLOCK_N)
        self.rows = triton.cdiv(L, block) * block  # of the per-bucket sums' float32 accumulators
        dtype = q.dtype
        if INTERPRETING and dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32  # the interpreter's tl.dot (numpy) has no bfloat16
        self.dot = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]

    def _ids(self, t):
        return self.no_ids if t is None else t

    def arguments(self):
        mask_strides = (0, 0) if self.mask is None else self.mask.stride()
        H, L, D = self.q.shape[1:]
        return (self.q, self.k, self.v, self.qr, self._ids(self.id_k), self.kr, self._ids(self.id_q),
                self._ids(self.id_v), self.q if self.mask is None else self.mask,
                H, L, D, self.rows, *(_padded(n) for n in self.bucket_counts()),
                *self.q.stride(), *self.k.stride(), *self.v.stride(), *self.qr.stride(), *self.kr.stride(),
                *self._ids(self.id_k).stride(), *self._ids(self.id_q).stride(), *self._ids(self.id_v).stride(),
                *mask_strides, self.seed, self.dropout_p)

    def bucket_counts(self):
        """Buckets of the terms on keys, on queries and on values (0 where absent)."""
        return (self.qr.shape[-1] if self.id_k is not None else 0, self.kr.shape[-1] if self.id_q is not None else 0,
                self.num_v)

    def sums(self, num_buckets):
        """A zeroed float32 accumulator of per-bucket sums: (B * H, rows, buckets padded to CHUNK)."""
        B, H = self.q.shape[:2]
        return torch.zeros(B * H, self.rows if num_buckets else 0, _padded(num_buckets), device=self.q.device)

    def unpadded(self, sums, num_buckets):
        """(B, H, L, num_buckets) in the inputs' dtype from an accumulator of self.sums."""
        B, H, L = self.q.shape[:3]
        return sums[:, :L, :num_buckets].reshape(B, H, L, num_buckets).to(self.q.dtype)

    def flags(self):
        D = self.q.shape[-1]
        return dict(HAS_QR=self.id_k is not None, HAS_KR=self.id_q is not None, HAS_V=self.num_v > 0,
                    HAS_MASK=self.mask is not None, DROPOUT=self.dropout_p > 0, DOT=self.dot,
                    PRECISION='ieee' if self.q.dtype == torch.float32 else 'tf32',
                    BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CHUNK=CHUNK)


def _padded(num_buckets):
    return triton.cdiv(num_buckets, CHUNK) * CHUNK


if triton is not None:
    @triton.jit
    def _logits(q, k, b, h, i, j, L, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, mask_ptr,
                s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k,
                s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_mask_b, s_mask_l,
                HAS_QR: tl.constexpr, HAS_KR: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr):
        """s (BLOCK_M, BLOCK_N) float32 of queries i (M, 1) and keys j (1, N) with q (M, D) and k (N, D): -inf at
        padded and out-of-range keys. Also returns the ids the backward's per-bucket sums need."""
        inside = (i < L) & (j < L)
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION)
        t = tl.zeros_like(inside.to(tl.int32))
        u = tl.zeros_like(inside.to(tl.int32))
        if HAS_QR:
            t = tl.load(id_k_ptr + i * s_idk_i + j * s_idk_j, mask=inside, other=0)
            s += tl.load(qr_ptr + b * s_qr_b + h * s_qr_h + i * s_qr_l + t * s_qr_k, mask=inside, other=0).to(tl.float32)
        if HAS_KR:
            u = tl.load(id_q_ptr + i * s_idq_i + j * s_idq_j, mask=inside, other=0)
            s += tl.load(kr_ptr + b * s_kr_b + h * s_kr_h + j * s_kr_l + u * s_kr_k, mask=inside, other=0).to(tl.float32)
        keep = j < L
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * s_mask_b + j * s_mask_l, mask=j < L, other=1) == 0)
        return tl.where(keep, s, float('-inf')), t, u

    @triton.jit
    def _dropped(x, seed, dropout_p, bh, i, j, L):
        """x (BLOCK_M, BLOCK_N) with the pairs that dropout drops at 0 and the kept ones divided by 1 - dropout_p:
        one Philox draw per (b, h, i, j) from the call's seed, so the backward drops what the forward dropped."""
        offsets = (bh.to(tl.int64) * L + i) * L + j
        return tl.where(tl.rand(seed, offsets) >= dropout_p, x / (1 - dropout_p), 0.0)

    @triton.jit
    def _dropout_mask_kernel(out_ptr, L, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(1)
        i = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        for n0 in range(0, L, BLOCK_N):
            j = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
            tl.store(out_ptr + (bh * L + i) * L + j, _dropped(tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32), seed,
                                                              dropout_p, bh, i, j, L), mask=(i < L) & (j < L))

    @triton.jit
    def _add_bucket_sums(acc_ptr, rows, K_PAD, x, ids, scale, AXIS: tl.constexpr, CHUNK: tl.constexpr):
        """acc[r, t] = acc[r, t] * scale + (sum of x (M, N) over AXIS where ids == t) for the tile's rows r (R, 1)
        and every bucket t < K_PAD: float32 rows of K_PAD entries in memory, CHUNK buckets at a time, so the
        (M, N, CHUNK) select stays in registers (a whole (M, N, buckets) one spills)."""
        for t0 in range(0, K_PAD, CHUNK):
            t = t0 + tl.arange(0, CHUNK)
            sums = tl.sum(tl.where(ids[:, :, None] == t[None, None, :], x[:, :, None], 0.0), axis=AXIS)
            ptrs = acc_ptr + rows * K_PAD + t[None, :]
            tl.debug_barrier()  # the previous tile's stores to these entries, maybe by other threads, are done
            tl.store(ptrs, tl.load(ptrs) * scale + sums)

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, id_v_ptr, mask_ptr,
                        H, L, D, ROWS, KP_K, KP_Q, KP_V, s_q_b, s_q_h, s_q_l, s_q_d, s_k_b, s_k_h, s_k_l, s_k_d,
                        s_v_b, s_v_h, s_v_l, s_v_d, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k,
                        s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l, seed, dropout_p,
                        o_ptr, lse_ptr, w_ptr, s_o_b, s_o_h, s_o_l, s_o_d,
                        HAS_QR: tl.constexpr, HAS_KR: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr,
                        DROPOUT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        """One query block of one (b, h): o = softmax(s) v, lse = log sum exp s, w = per-bucket sums of p."""
        bh = tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        row = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        i = row[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        q = tl.load(q_ptr + b * s_q_b + h * s_q_h + i * s_q_l + d * s_q_d, mask=(i < L) & (d < D), other=0)
        w_ptr += bh.to(tl.int64) * ROWS * KP_V
        m = tl.full((BLOCK_M,), float('-inf'), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, L, BLOCK_N):
            cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            jc, j = cols[:, None], cols[None, :]  # keys as rows (k, v) and as columns (the logits)
            k = tl.load(k_ptr + b * s_k_b + h * s_k_h + jc * s_k_l + d * s_k_d, mask=(jc < L) & (d < D), other=0)
            v = tl.load(v_ptr + b * s_v_b + h * s_v_h + jc * s_v_l + d * s_v_d, mask=(jc < L) & (d < D), other=0)
            s, _, _ = _logits(q, k, b, h, i, j, L, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, mask_ptr,
                              s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k,
                              s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_mask_b, s_mask_l,
                              HAS_QR, HAS_KR, HAS_MASK, DOT, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # a row with no key yet
            scale = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            total = total * scale + tl.sum(p, 1)
            if DROPOUT:  # the normaliser sums every weight; what multiplies v is the kept ones, rescaled
                p = _dropped(p, seed, dropout_p, bh, i, j, L)
            acc = acc * scale[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
            if HAS_V:
                idv = tl.load(id_v_ptr + i * s_idv_i + j * s_idv_j, mask=(i < L) & (j < L), other=-1)
                _add_bucket_sums(w_ptr, i, KP_V, p, idv, scale[:, None], 1, CHUNK)
            m = m_new
        m = tl.where(m == float('-inf'), 0.0, m)
        # A row whose keys are all padded gets zeros (and +inf as its lse, so the backward's p is 0 there).
        norm = tl.where(total > 0, total, 1.0)
        tl.store(lse_ptr + bh * L + row, tl.where(total > 0, m + tl.log(norm), float('inf')), mask=row < L)
        tl.store(o_ptr + b * s_o_b + h * s_o_h + i * s_o_l + d * s_o_d, (acc / norm[:, None]).to(o_ptr.dtype.element_ty),
                 mask=(i < L) & (d < D))
        if HAS_V:
            _add_bucket_sums(w_ptr, i, KP_V, tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                             tl.zeros((BLOCK_M, BLOCK_N), tl.int32), 1.0 / norm[:, None], 1, CHUNK)

    @triton.jit
    def _ds(q, k, v, do, lse, delta, b, h, bh, i, j, L, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, id_v_ptr, mask_ptr,
            dw_ptr, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i,
            s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l, s_dw_b, s_dw_h, s_dw_l, s_dw_k, seed, dropout_p,
            HAS_QR: tl.constexpr, HAS_KR: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr,
            DROPOUT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """The weights that multiplied v (p, or its kept entries rescaled under dropout) and ds = p (dp - delta)
        (BLOCK_M, BLOCK_N) of one tile, recomputed from the forward's lse, and the tile's ids on keys and
        queries."""
        s, t, u = _logits(q, k, b, h, i, j, L, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, mask_ptr,
                          s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k,
                          s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_mask_b, s_mask_l,
                          HAS_QR, HAS_KR, HAS_MASK, DOT, PRECISION)
        p = tl.exp(s - lse)
        dp = tl.dot(do.to(DOT), tl.trans(v.to(DOT)), input_precision=PRECISION)
        if HAS_V:
            inside = (i < L) & (j < L)
            idv = tl.load(id_v_ptr + i * s_idv_i + j * s_idv_j, mask=inside, other=0)
            dp += tl.load(dw_ptr + b * s_dw_b + h * s_dw_h + i * s_dw_l + idv * s_dw_k, mask=inside, other=0).to(tl.float32)
        if DROPOUT:  # dp so far is the gradient of the kept, rescaled weights
            kept = _dropped(p, seed, dropout_p, bh, i, j, L)
            return kept, p * (_dropped(dp, seed, dropout_p, bh, i, j, L) - delta), t, u
        return p, p * (dp - delta), t, u

    @triton.jit
    def _backward_queries_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, id_v_ptr, mask_ptr,
                                 H, L, D, ROWS, KP_K, KP_Q, KP_V, s_q_b, s_q_h, s_q_l, s_q_d, s_k_b, s_k_h, s_k_l,
                                 s_k_d, s_v_b, s_v_h, s_v_l, s_v_d, s_qr_b, s_qr_h, s_qr_l, s_qr_k,
                                 s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j,
                                 s_idv_i, s_idv_j, s_mask_b, s_mask_l, seed, dropout_p,
                                 do_ptr, dw_ptr, lse_ptr, delta_ptr, s_do_b, s_do_h, s_do_l, s_do_d,
                                 s_dw_b, s_dw_h, s_dw_l, s_dw_k, dq_ptr, dqr_ptr, s_dq_b, s_dq_h, s_dq_l, s_dq_d,
                                 HAS_QR: tl.constexpr, HAS_KR: tl.constexpr, HAS_V: tl.constexpr,
                                 HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                                 PRECISION: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 CHUNK: tl.constexpr):
        """One query block of one (b, h): dq = ds k and dqr = per-bucket sums of ds over keys."""
        bh = tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        row = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        i = row[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        rows = (i < L) & (d < D)
        q = tl.load(q_ptr + b * s_q_b + h * s_q_h + i * s_q_l + d * s_q_d, mask=rows, other=0)
        do = tl.load(do_ptr + b * s_do_b + h * s_do_h + i * s_do_l + d * s_do_d, mask=rows, other=0)
        lse = tl.load(lse_ptr + bh * L + row, mask=row < L, other=float('inf'))[:, None]
        delta = tl.load(delta_ptr + bh * L + row, mask=row < L, other=0)[:, None]
        dqr_ptr += bh.to(tl.int64) * ROWS * KP_K
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, L, BLOCK_N):
            cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            jc, j = cols[:, None], cols[None, :]
            k = tl.load(k_ptr + b * s_k_b + h * s_k_h + jc * s_k_l + d * s_k_d, mask=(jc < L) & (d < D), other=0)
            v = tl.load(v_ptr + b * s_v_b + h * s_v_h + jc * s_v_l + d * s_v_d, mask=(jc < L) & (d < D), other=0)
            _, ds, t, _ = _ds(q, k, v, do, lse, delta, b, h, bh, i, j, L, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr,
                              id_v_ptr, mask_ptr, dw_ptr, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l,
                              s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l,
                              s_dw_b, s_dw_h, s_dw_l, s_dw_k, seed, dropout_p, HAS_QR, HAS_KR, HAS_V, HAS_MASK,
                              DROPOUT, DOT, PRECISION)
            dq += tl.dot(ds.to(DOT), k.to(DOT), input_precision=PRECISION)
            if HAS_QR:
                _add_bucket_sums(dqr_ptr, i, KP_K, ds, t, 1.0, 1, CHUNK)  # ds is 0 outside the map
        tl.store(dq_ptr + b * s_dq_b + h * s_dq_h + i * s_dq_l + d * s_dq_d, dq.to(dq_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def _backward_keys_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr, id_v_ptr, mask_ptr,
                              H, L, D, ROWS, KP_K, KP_Q, KP_V, s_q_b, s_q_h, s_q_l, s_q_d, s_k_b, s_k_h, s_k_l,
                              s_k_d, s_v_b, s_v_h, s_v_l, s_v_d, s_qr_b, s_qr_h, s_qr_l, s_qr_k,
                              s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j,
                              s_idv_i, s_idv_j, s_mask_b, s_mask_l, seed, dropout_p,
                              do_ptr, dw_ptr, lse_ptr, delta_ptr, s_do_b, s_do_h, s_do_l, s_do_d,
                              s_dw_b, s_dw_h, s_dw_l, s_dw_k, dk_ptr, dv_ptr, dkr_ptr,
                              s_dk_b, s_dk_h, s_dk_l, s_dk_d, s_dv_b, s_dv_h, s_dv_l, s_dv_d,
                              HAS_QR: tl.constexpr, HAS_KR: tl.constexpr, HAS_V: tl.constexpr,
                              HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                              PRECISION: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CHUNK: tl.constexpr):
        """One key block of one (b, h): dk = ds^T q, dv = p^T dout and dkr = per-bucket sums of ds over queries."""
        bh = tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        jc, j = cols[:, None], cols[None, :]
        d = tl.arange(0, BLOCK_D)[None, :]
        keys = (jc < L) & (d < D)
        k = tl.load(k_ptr + b * s_k_b + h * s_k_h + jc * s_k_l + d * s_k_d, mask=keys, other=0)
        v = tl.load(v_ptr + b * s_v_b + h * s_v_h + jc * s_v_l + d * s_v_d, mask=keys, other=0)
        dkr_ptr += bh.to(tl.int64) * ROWS * KP_Q
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for m0 in range(0, L, BLOCK_M):
            row = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            i = row[:, None]
            rows = (i < L) & (d < D)
            q = tl.load(q_ptr + b * s_q_b + h * s_q_h + i * s_q_l + d * s_q_d, mask=rows, other=0)
            do = tl.load(do_ptr + b * s_do_b + h * s_do_h + i * s_do_l + d * s_do_d, mask=rows, other=0)
            lse = tl.load(lse_ptr + bh * L + row, mask=row < L, other=float('inf'))[:, None]
            delta = tl.load(delta_ptr + bh * L + row, mask=row < L, other=0)[:, None]
            p, ds, _, u = _ds(q, k, v, do, lse, delta, b, h, bh, i, j, L, qr_ptr, id_k_ptr, kr_ptr, id_q_ptr,
                              id_v_ptr, mask_ptr, dw_ptr, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l,
                              s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l,
                              s_dw_b, s_dw_h, s_dw_l, s_dw_k, seed, dropout_p, HAS_QR, HAS_KR, HAS_V, HAS_MASK,
                              DROPOUT, DOT, PRECISION)
            dv += tl.dot(tl.trans(p.to(DOT)), do.to(DOT), input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(DOT)), q.to(DOT), input_precision=PRECISION)
            if HAS_KR:
                _add_bucket_sums(dkr_ptr, jc, KP_Q, ds, u, 1.0, 0, CHUNK)
        tl.store(dk_ptr + b * s_dk_b + h * s_dk_h + jc * s_dk_l + d * s_dk_d, dk.to(dk_ptr.dtype.element_ty), mask=keys)
        tl.store(dv_ptr + b * s_dv_b + h * s_dv_h + jc * s_dv_l + d * s_dv_d, dv.to(dv_ptr.dtype.element_ty), mask=keys)
