"""iRPE attention fused into one Triton kernel per pass (--attention_impl triton): iRPE on queries, keys and
values without any (B, H, L, L) tensor, forward and backward.

With q scaled by d^-0.5 (as RPEMultiheadAttention.project gives it), the logit of query i and key j is

    s_ij = q_i . k_j + qr[i, idk(i, j)] + kr[j, idq(j, i)]       (Eq. 14 + 15; -inf at padded keys)

where qr = rpe_k.per_bucket(q) (B, H, L, Kk) and kr = rpe_q.per_bucket(k * d^-0.5) (B, H, L, Kq) hold each
token's term against every bucket, and the output is

    out_i = sum_j p_ij v_j + sum_t w_it r_t,   p = softmax(s), w_it = sum_j p_ij [idv(i, j) = t]   (Eq. 16)

with r the value table of rpe_v (Kv, d). The kernels walk (BLOCK_M queries x BLOCK_N keys) tiles as flash
attention does (online softmax, the logits recomputed in the backward from the row's log-sum-exp); the forward
makes a second pass with the final log-sum-exp for the per-bucket sums w (nothing of them to rescale). A
per-bucket sum has no matrix-product form (each row of a tile has its own ids): it is a select over a
(rows, columns, CHUNK buckets) tile, added to float32 rows in memory that only the program touches. w r is one
small matmul after the kernel, so the value table's gradient is autograd's. The backward:
dp_ij = dout_i . v_j + dw[i, idv(i, j)], ds_ij = p_ij (dp_ij - delta_i) with delta_i = dout_i . o_i + dw_i . w_i,
then dq = ds k, dk = ds^T q, dv = p^T dout and the per-bucket sums dqr[i, t] = sum_j ds_ij [idk(i, j) = t] (a
kernel per query block) and dkr[j, t] = sum_i ds_ij [idq(j, i) = t] (a kernel per key block).

The product method's bucket is a row bucket times the side plus a column bucket (irpe.product_factors). Its
loops walk the other side's tokens one image row at a time, so that in a tile the row bucket is one per own token
and a sum is one select over the side's 7-13 column buckets, where any other method's ids take one select per
CHUNK of all buckets (49-169); the ids then come from two small tables instead of (L, L) ones. Attention dropout
drops pairs by a Philox draw per (b, h, i, j) from one seed per call, so the backward recomputes the forward's
choice; delta keeps its form with the kept, rescaled weights.

The kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how the suite checks them (detr_irpe.lab.gpu_check's triton_attention check).
Not covered, and refused with a message: the cross method (two tables per term). Returning the attention weights
is the explicit path's (RPEMultiheadAttention takes it when they are asked for).
"""
import os

import torch

from detr_irpe.irpe import _map_size, key_major_ids, product_factors
from rpe_ops.cuda import on_device_of

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels come without triton
    triton = None

INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
# Query and key rows per tile, and buckets per step of the per-bucket sums, whose (BLOCK_M, BLOCK_N, CHUNK)
# select dominates the registers.
BLOCK_M, BLOCK_N, CHUNK, NUM_WARPS = 16, 16, 16, 4
# The product method's buckets from its row and column factors (one select over the column buckets per tile
# instead of one per CHUNK of all buckets); False runs its ids as any method's, for comparison.
FACTOR_PRODUCT = True


def settings_problem(*configs):
    """Why the kernels cannot compute iRPE with these RPEConfig (None where a term is absent), or None."""
    if any(c is not None and c.method == 'cross' for c in configs):
        return ('--attention_impl triton has no cross method (two tables per iRPE term): use --attention_impl auto '
                'or sdpa, or another method in --enc_rpe2d (e.g. product).')
    return None


def problem(q, rpe_q, rpe_k, rpe_v):
    """Why triton_irpe_attention cannot run on these inputs and settings, or None."""
    if triton is None:
        return ('--attention_impl triton needs triton, which this torch install lacks: install the triton that '
                f'matches torch {torch.__version__} (`pip install triton`), or use --attention_impl auto.')
    settings = settings_problem(*(None if m is None else m.config for m in (rpe_q, rpe_k, rpe_v)))
    if settings is not None:
        return settings
    if not q.is_cuda and not INTERPRETING:
        return (f'--attention_impl triton runs on CUDA, but the encoder runs on {q.device.type}: use --attention_impl '
                'auto or sdpa there (the suite runs the kernels on CPU under TRITON_INTERPRET=1).')
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # float64 compiles for no GPU (interpreted, runs)
        return (f'--attention_impl triton computes in float32, bfloat16 or float16, not {q.dtype}: use '
                '--attention_impl sdpa for this precision.')
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

    qr = per_bucket(rpe_k, q) if rpe_k is not None else None
    kr = per_bucket(rpe_q, k * q.shape[-1] ** -0.5) if rpe_q is not None else None
    num_v = rpe_v.num_buckets if rpe_v is not None else 0
    geometry = _Geometry(rpe_q, rpe_k, rpe_v, L, height, width, q.device)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, ())) if dropout_p > 0 else 0
    out, weights = _attention(q, k, v, qr, kr, num_v, mask, float(dropout_p), seed, geometry)
    if rpe_v is not None:
        out = out + torch.matmul(weights, rpe_v.lookup_table_weight.to(dtype))
    return out


class _Geometry:
    """Where the kernels find each pair's buckets. The product method (one setting for all terms, no skip tokens,
    at most CHUNK buckets a side): its row and column factors (irpe.product_factors), with the loops over the
    other side's tokens walking one image row at a time, so that a tile's row bucket is one per own token. Any
    other: the (L, L) bucket ids (rpe_q's transposed: its term at (i, j) reads bucket(j, i)), the loops walking
    all L tokens as one row."""

    def __init__(self, rpe_q, rpe_k, rpe_v, L, height, width, device):
        present = [m for m in (rpe_q, rpe_k, rpe_v) if m is not None]
        settings = {(m.method, m.config.ratio, m.config.index_func, m.config.skip) for m in present}
        self.factored = FACTOR_PRODUCT and len(settings) == 1 and next(iter(settings))[0] == 'product' \
            and next(iter(settings))[3] == 0
        self.id_k = self.id_q = self.id_v = None
        self.rows = self.cols = None
        self.height, self.width, self.side = 1, L, 1
        if self.factored:
            _, ratio, index_func, _ = settings.pop()
            map_height, map_width = _map_size(L, 0, height, width)
            rows, cols, side = product_factors(map_height, map_width, ratio, index_func, device)
            self.factored = side <= CHUNK
            if self.factored:
                self.rows, self.cols, self.side = rows, cols, side
                self.height, self.width = map_height, map_width
                return
        ids = {m: m.bucket_ids(L, height, width, device) for m in present}
        self.id_k = ids.get(rpe_k)
        self.id_q = key_major_ids(ids[rpe_q], 0) if rpe_q is not None else None
        self.id_v = ids.get(rpe_v)


def dropout_mask(seed, batch, heads, length, dropout_p, device):
    """(batch, heads, length, length) float32: 1 / (1 - dropout_p) where triton_irpe_attention called with this seed
    keeps the attention weight of a pair, 0 where its dropout drops it."""
    out = torch.empty(batch * heads, length, length, device=device)
    with on_device_of(out):
        _dropout_mask_kernel[(triton.cdiv(length, BLOCK_M), batch * heads)](out, length, seed, float(dropout_p),
                                                                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out.view(batch, heads, length, length)


# Under torch.compile: run as is, a graph break per layer (dynamo does not trace these launches).
@torch.compiler.disable
def _attention(*args):
    return _Attention.apply(*args)


class _Attention(torch.autograd.Function):
    """(out (B, H, L, d), w (B, H, L, Kv)) of the module docstring; qr, kr may be None."""

    @staticmethod
    def forward(ctx, q, k, v, qr, kr, num_v, mask, dropout_p, seed, geometry):
        B, H, L, D = q.shape
        a = _Args(q, k, v, qr, kr, num_v, mask, dropout_p, seed, geometry)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
        weights = a.sums(num_v)
        if L:
            with on_device_of(q):
                _forward_kernel[(triton.cdiv(L, BLOCK_M), B * H)](
                    *a.arguments(), out, lse, weights, *out.stride(), **a.flags(), num_warps=NUM_WARPS)
        weights = a.unpadded(weights, num_v)
        ctx.save_for_backward(q, k, v, qr, kr, mask, out, lse, weights)
        ctx.num_v, ctx.dropout_p, ctx.seed, ctx.geometry = num_v, dropout_p, seed, geometry
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        q, k, v, qr, kr, mask, out, lse, weights = ctx.saved_tensors
        B, H, L, D = q.shape
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        # sum_j p_ij dp_ij, the softmax backward's row term (with dropout: of the kept, rescaled weights)
        delta = (grad_out.float() * out.float()).sum(-1)
        if ctx.num_v:
            grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights
            delta += (grad_weights.float() * weights.float()).sum(-1)
        else:
            grad_weights = weights  # empty; never read
        a = _Args(q, k, v, qr, kr, ctx.num_v, mask, ctx.dropout_p, ctx.seed, ctx.geometry)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        num_k, num_q = (x.shape[-1] if x is not None else 0 for x in (qr, kr))
        dqr, dkr = a.sums(num_k), a.sums(num_q)
        if L:
            common = (*a.arguments(), grad_out, grad_weights, lse, delta, *grad_out.stride(), *grad_weights.stride())
            with on_device_of(q):
                _backward_queries_kernel[(triton.cdiv(L, BLOCK_M), B * H)](
                    *common, dq, dqr, *dq.stride(), **a.flags(), num_warps=NUM_WARPS)
                _backward_keys_kernel[(triton.cdiv(L, BLOCK_N), B * H)](
                    *common, dk, dv, dkr, *dk.stride(), *dv.stride(), **a.flags(), num_warps=NUM_WARPS)
        return (dq, dk, dv, a.unpadded(dqr, num_k) if qr is not None else None,
                a.unpadded(dkr, num_q) if kr is not None else None, None, None, None, None, None)


class _Args:
    """The tensors, scalars and flags every kernel takes, with stand-ins for what a call lacks."""

    def __init__(self, q, k, v, qr, kr, num_v, mask, dropout_p, seed, geometry):
        self.q, self.k, self.v, self.qr, self.kr, self.num_v, self.mask = q, k, v, qr, kr, num_v, mask
        self.dropout_p, self.seed, self.g = dropout_p, seed, geometry
        B, H, L, _ = q.shape
        block = max(BLOCK_M, BLOCK_N)
        self.rows = triton.cdiv(L, block) * block  # of the per-bucket sums' float32 accumulators
        self.none = torch.empty(1, 1, dtype=torch.int32, device=q.device)  # stands in for absent ids; never read

    def arguments(self):
        g, none = self.g, self.none
        qr, kr = (self.q if t is None else t for t in (self.qr, self.kr))
        ids = [none if t is None else t for t in (g.id_k, g.id_q, g.id_v)]
        mask = self.q if self.mask is None else self.mask
        H, L, D = self.q.shape[1:]
        return (self.q, self.k, self.v, qr, kr, *ids, none if g.rows is None else g.rows,
                none if g.cols is None else g.cols, mask, H, L, D, self.rows,
                *(_padded(n) for n in self.bucket_counts()), g.height, g.width, g.side,
                *self.q.stride(), *self.k.stride(), *self.v.stride(), *qr.stride(), *kr.stride(),
                *(s for t in ids for s in t.stride()), *((0, 0) if self.mask is None else self.mask.stride()),
                self.seed, self.dropout_p)

    def bucket_counts(self):
        """Buckets of the terms on keys, on queries and on values (0 where absent)."""
        return tuple(t.shape[-1] if t is not None else 0 for t in (self.qr, self.kr)) + (self.num_v,)

    def sums(self, num_buckets):
        """A zeroed float32 accumulator of per-bucket sums: (B * H, rows, buckets padded to CHUNK)."""
        B, H = self.q.shape[:2]
        return torch.zeros(B * H, self.rows if num_buckets else 0, _padded(num_buckets), device=self.q.device)

    def unpadded(self, sums, num_buckets):
        """(B, H, L, num_buckets) in the inputs' dtype from an accumulator of self.sums."""
        B, H, L = self.q.shape[:3]
        return sums[:, :L, :num_buckets].reshape(B, H, L, num_buckets).to(self.q.dtype)

    def flags(self):
        return kernel_flags(self.qr is not None, self.kr is not None, self.num_v > 0, self.mask is not None,
                            self.dropout_p > 0, self.g.factored, self.q.dtype, self.q.shape[-1])


def kernel_flags(on_keys, on_queries, on_values, mask, dropout, factored, dtype, head_dim):
    """The compile-time arguments of the three kernels: which iRPE terms and features a call has (on_keys: the
    term rpe_k adds, qr), the products' dtype and precision, and the block sizes."""
    # the interpreter's tl.dot (numpy) has no bfloat16
    dot = torch.float32 if INTERPRETING and dtype in (torch.bfloat16, torch.float16) else dtype
    return dict(HAS_QR=on_keys, HAS_KR=on_queries, HAS_V=on_values, HAS_MASK=mask, DROPOUT=dropout,
                FACTORED=factored, DOT=getattr(tl, str(dot).split('.')[1]),
                PRECISION='ieee' if dtype == torch.float32 else 'tf32',
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CHUNK=CHUNK)


def _padded(num_buckets):
    return triton.cdiv(num_buckets, CHUNK) * CHUNK


if triton is not None:
    @triton.jit
    def _program(H, BLOCK: tl.constexpr):
        """This program's (b, h) pair (grid axis 1, as bh and as int64 b, h) and its block of tokens (axis 0)."""
        bh = tl.program_id(1)
        tokens = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), tokens

    @triton.jit
    def _load_rows(ptr, b, h, t, d, D, ok, s_b, s_h, s_l, s_d):
        """The (tokens, head dim) block of a (B, H, L, D) tensor at tokens t (T, 1), zeros outside."""
        return tl.load(ptr + b * s_b + h * s_h + t * s_l + d * s_d, mask=ok & (d < D), other=0)

    @triton.jit
    def _loop_tokens(it, WIDTH, BLOCK: tl.constexpr):
        """Token ids (BLOCK,) int64 of step `it` of a loop over the map one image row of WIDTH tokens at a time,
        BLOCK per step, and which of them are in the row."""
        per_row = tl.cdiv(WIDTH, BLOCK)
        in_row = (it % per_row) * BLOCK + tl.arange(0, BLOCK)
        return ((it // per_row) * WIDTH + in_row).to(tl.int64), in_row < WIDTH

    @triton.jit
    def _buckets(i, j, inside, rows_ptr, cols_ptr, HEIGHT, WIDTH, SIDE):
        """bucket(i, j) of the product method from its factors: (query i minus key j) in rows and columns."""
        dr = i // WIDTH - j // WIDTH + HEIGHT - 1
        dc = i % WIDTH - j % WIDTH + WIDTH - 1
        return (tl.load(rows_ptr + dr, mask=inside, other=0) * SIDE + tl.load(cols_ptr + dc, mask=inside, other=0))

    @triton.jit
    def _logits(q, k, b, h, i, j, i_ok, j_ok, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr, rows_ptr, cols_ptr,
                mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i,
                s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l, HAS_QR: tl.constexpr,
                HAS_KR: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, FACTORED: tl.constexpr,
                DOT: tl.constexpr, PRECISION: tl.constexpr):
        """s (BLOCK_M, BLOCK_N) float32 of queries i (M, 1) and keys j (1, N) with q (M, D) and k (N, D): -inf at
        padded and out-of-range keys. Also returns the tile's bucket(i, j) of the terms on keys and on values, and
        bucket(j, i) of the term on queries (0 where a term is absent)."""
        inside = i_ok & j_ok
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION)
        t = tl.zeros_like(inside.to(tl.int32))
        u = tl.zeros_like(inside.to(tl.int32))
        tv = tl.zeros_like(inside.to(tl.int32))
        if FACTORED:
            if HAS_QR or HAS_V:
                t = _buckets(i, j, inside, rows_ptr, cols_ptr, HEIGHT, WIDTH, SIDE)
                tv = t
            if HAS_KR:
                u = _buckets(j, i, inside, rows_ptr, cols_ptr, HEIGHT, WIDTH, SIDE)
        else:
            if HAS_QR:
                t = tl.load(id_k_ptr + i * s_idk_i + j * s_idk_j, mask=inside, other=0)
            if HAS_KR:
                u = tl.load(id_q_ptr + i * s_idq_i + j * s_idq_j, mask=inside, other=0)
            if HAS_V:
                tv = tl.load(id_v_ptr + i * s_idv_i + j * s_idv_j, mask=inside, other=0)
        if HAS_QR:
            s += tl.load(qr_ptr + b * s_qr_b + h * s_qr_h + i * s_qr_l + t * s_qr_k, mask=inside,
                         other=0).to(tl.float32)
        if HAS_KR:
            s += tl.load(kr_ptr + b * s_kr_b + h * s_kr_h + j * s_kr_l + u * s_kr_k, mask=inside,
                         other=0).to(tl.float32)
        keep = j_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * s_mask_b + j * s_mask_l, mask=j_ok, other=1) == 0)
        return tl.where(keep, s, float('-inf')), t, u, tv

    @triton.jit
    def _dropped(x, seed, dropout_p, bh, i, j, L):
        """x (BLOCK_M, BLOCK_N) with the pairs that dropout drops at 0 and the kept ones divided by 1 - dropout_p:
        one Philox draw per (b, h, i, j) from the call's seed, so the backward drops what the forward dropped."""
        offsets = (bh.to(tl.int64) * L + i) * L + j
        return tl.where(tl.rand(seed, offsets) >= dropout_p, x / (1 - dropout_p), 0.0)

    @triton.jit(do_not_specialize=['seed'])  # a fresh seed per call: no second compile for seeds divisible by 16
    def _dropout_mask_kernel(out_ptr, L, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(1)
        i = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        for n0 in range(0, L, BLOCK_N):
            j = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
            tl.store(out_ptr + (bh * L + i) * L + j, _dropped(tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32), seed,
                                                              dropout_p, bh, i, j, L), mask=(i < L) & (j < L))

    @triton.jit
    def _add_bucket_sums(acc_ptr, rows, K_PAD, x, ids, inside, SIDE, AXIS: tl.constexpr, CHUNK: tl.constexpr,
                         FACTORED: tl.constexpr):
        """acc[r, t] += sum of x (M, N) over AXIS where ids == t, for the tile's own tokens r (R, 1): float32 rows of
        K_PAD entries in memory. Any method: CHUNK buckets at a time (a select over all buckets at once would not fit
        in registers). Factored (the loop's tokens in one image row): the row bucket ids // SIDE is one per own
        token, so one select over the SIDE column buckets, added at row bucket * SIDE."""
        if FACTORED:
            row_bucket = tl.expand_dims(tl.max(tl.where(inside, ids // SIDE, -1), axis=AXIS), 1)  # -1: none inside
            c = tl.arange(0, CHUNK)
            sums = tl.sum(tl.where((ids % SIDE)[:, :, None] == c[None, None, :], x[:, :, None], 0.0), axis=AXIS)
            ptrs = acc_ptr + rows * K_PAD + row_bucket * SIDE + c[None, :]
            used = (c[None, :] < SIDE) & (row_bucket >= 0)
            tl.debug_barrier()  # the previous tile's stores to these entries, maybe by other threads, are done
            tl.store(ptrs, tl.load(ptrs, mask=used, other=0) + sums, mask=used)
        else:
            for t0 in range(0, K_PAD, CHUNK):
                t = t0 + tl.arange(0, CHUNK)
                sums = tl.sum(tl.where(ids[:, :, None] == t[None, None, :], x[:, :, None], 0.0), axis=AXIS)
                ptrs = acc_ptr + rows * K_PAD + t[None, :]
                tl.debug_barrier()
                tl.store(ptrs, tl.load(ptrs) + sums)

    @triton.jit
    def _ds(q, k, v, do, lse, delta, b, h, bh, i, j, i_ok, j_ok, L, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr,
            rows_ptr, cols_ptr, mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l,
            s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l, HAS_QR, HAS_KR, HAS_V,
            HAS_MASK, FACTORED, DOT, PRECISION, dw_ptr, s_dw_b, s_dw_h, s_dw_l, s_dw_k, seed, dropout_p,
            DROPOUT: tl.constexpr):
        """The weights that multiplied v (p, or its kept entries rescaled under dropout) and ds = p (dp - delta)
        (BLOCK_M, BLOCK_N) of one tile, recomputed from the forward's lse (M, 1), and the tile's bucket(i, j) on
        keys and bucket(j, i) on queries."""
        s, t, u, tv = _logits(q, k, b, h, i, j, i_ok, j_ok, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr, rows_ptr,
                              cols_ptr, mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h,
                              s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l,
                              HAS_QR, HAS_KR, HAS_V, HAS_MASK, FACTORED, DOT, PRECISION)
        p = tl.exp(s - lse)
        dp = tl.dot(do.to(DOT), tl.trans(v.to(DOT)), input_precision=PRECISION)
        if HAS_V:
            dp += tl.load(dw_ptr + b * s_dw_b + h * s_dw_h + i * s_dw_l + tv * s_dw_k, mask=i_ok & j_ok,
                          other=0).to(tl.float32)
        if DROPOUT:  # dp so far is the gradient of the kept, rescaled weights
            return (_dropped(p, seed, dropout_p, bh, i, j, L),
                    p * (_dropped(dp, seed, dropout_p, bh, i, j, L) - delta), t, u)
        return p, p * (dp - delta), t, u

    @triton.jit(do_not_specialize=['seed'])
    def _forward_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr, rows_ptr, cols_ptr, mask_ptr,
                        H, L, D, ROWS, KP_K, KP_Q, KP_V, HEIGHT, WIDTH, SIDE, s_q_b, s_q_h, s_q_l, s_q_d, s_k_b, s_k_h,
                        s_k_l, s_k_d, s_v_b, s_v_h, s_v_l, s_v_d, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b, s_kr_h,
                        s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b, s_mask_l, seed,
                        dropout_p, o_ptr, lse_ptr, w_ptr, s_o_b, s_o_h, s_o_l, s_o_d, HAS_QR: tl.constexpr,
                        HAS_KR: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                        FACTORED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        """One query block of one (b, h): o = softmax(s) v and lse = log sum exp s over the keys; then, in a second
        pass with the final lse (no rescaling of the sums), w = the per-bucket sums of p."""
        bh, b, h, row = _program(H, BLOCK_M)
        i, i_ok = row[:, None], (row < L)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        q = _load_rows(q_ptr, b, h, i, d, D, i_ok, s_q_b, s_q_h, s_q_l, s_q_d)
        m = tl.full((BLOCK_M,), float('-inf'), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        steps = HEIGHT * tl.cdiv(WIDTH, BLOCK_N)
        for it in range(0, steps):
            cols, ok = _loop_tokens(it, WIDTH, BLOCK_N)
            jc, j, jc_ok, j_ok = cols[:, None], cols[None, :], ok[:, None], ok[None, :]
            k = _load_rows(k_ptr, b, h, jc, d, D, jc_ok, s_k_b, s_k_h, s_k_l, s_k_d)
            v = _load_rows(v_ptr, b, h, jc, d, D, jc_ok, s_v_b, s_v_h, s_v_l, s_v_d)
            s, _, _, _ = _logits(q, k, b, h, i, j, i_ok, j_ok, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr, rows_ptr,
                                 cols_ptr, mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h, s_qr_l, s_qr_k, s_kr_b,
                                 s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i, s_idv_j, s_mask_b,
                                 s_mask_l, HAS_QR, HAS_KR, HAS_V, HAS_MASK, FACTORED, DOT, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # a row with no key yet
            scale = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            total = total * scale + tl.sum(p, 1)
            if DROPOUT:  # the normaliser sums every weight; what multiplies v is the kept ones, rescaled
                p = _dropped(p, seed, dropout_p, bh, i, j, L)
            acc = acc * scale[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
            m = m_new
        m = tl.where(m == float('-inf'), 0.0, m)
        # A row whose keys are all padded gets zeros (and +inf as its lse, so that every p of it is 0).
        norm = tl.where(total > 0, total, 1.0)
        lse = tl.where(total > 0, m + tl.log(norm), float('inf'))
        tl.store(lse_ptr + bh * L + row, lse, mask=row < L)
        tl.store(o_ptr + b * s_o_b + h * s_o_h + i * s_o_l + d * s_o_d,
                 (acc / norm[:, None]).to(o_ptr.dtype.element_ty), mask=i_ok & (d < D))
        if HAS_V:
            w_ptr += bh.to(tl.int64) * ROWS * KP_V
            for it in range(0, steps):
                cols, ok = _loop_tokens(it, WIDTH, BLOCK_N)
                jc, j, jc_ok, j_ok = cols[:, None], cols[None, :], ok[:, None], ok[None, :]
                k = _load_rows(k_ptr, b, h, jc, d, D, jc_ok, s_k_b, s_k_h, s_k_l, s_k_d)
                s, _, _, tv = _logits(q, k, b, h, i, j, i_ok, j_ok, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr,
                                      rows_ptr, cols_ptr, mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h, s_qr_l, s_qr_k,
                                      s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i,
                                      s_idv_j, s_mask_b, s_mask_l, HAS_QR, HAS_KR, HAS_V, HAS_MASK, FACTORED, DOT,
                                      PRECISION)
                p = tl.exp(s - lse[:, None])
                if DROPOUT:
                    p = _dropped(p, seed, dropout_p, bh, i, j, L)
                _add_bucket_sums(w_ptr, i, KP_V, p, tv, i_ok & j_ok, SIDE, 1, CHUNK, FACTORED)

    @triton.jit(do_not_specialize=['seed'])
    def _backward_queries_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr, rows_ptr, cols_ptr,
                                 mask_ptr, H, L, D, ROWS, KP_K, KP_Q, KP_V, HEIGHT, WIDTH, SIDE, s_q_b, s_q_h, s_q_l,
                                 s_q_d, s_k_b, s_k_h, s_k_l, s_k_d, s_v_b, s_v_h, s_v_l, s_v_d, s_qr_b, s_qr_h, s_qr_l,
                                 s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i,
                                 s_idv_j, s_mask_b, s_mask_l, seed, dropout_p, do_ptr, dw_ptr, lse_ptr, delta_ptr,
                                 s_do_b, s_do_h, s_do_l, s_do_d, s_dw_b, s_dw_h, s_dw_l, s_dw_k, dq_ptr, dqr_ptr,
                                 s_dq_b, s_dq_h, s_dq_l, s_dq_d, HAS_QR: tl.constexpr, HAS_KR: tl.constexpr,
                                 HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                                 FACTORED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 CHUNK: tl.constexpr):
        """One query block of one (b, h): dq = ds k and dqr = per-bucket sums of ds over keys."""
        bh, b, h, row = _program(H, BLOCK_M)
        i, i_ok = row[:, None], (row < L)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        q = _load_rows(q_ptr, b, h, i, d, D, i_ok, s_q_b, s_q_h, s_q_l, s_q_d)
        do = _load_rows(do_ptr, b, h, i, d, D, i_ok, s_do_b, s_do_h, s_do_l, s_do_d)
        lse = tl.load(lse_ptr + bh * L + row, mask=row < L, other=float('inf'))[:, None]
        delta = tl.load(delta_ptr + bh * L + row, mask=row < L, other=0)[:, None]
        dqr_ptr += bh.to(tl.int64) * ROWS * KP_K
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for it in range(0, HEIGHT * tl.cdiv(WIDTH, BLOCK_N)):
            cols, ok = _loop_tokens(it, WIDTH, BLOCK_N)
            jc, j, jc_ok, j_ok = cols[:, None], cols[None, :], ok[:, None], ok[None, :]
            k = _load_rows(k_ptr, b, h, jc, d, D, jc_ok, s_k_b, s_k_h, s_k_l, s_k_d)
            v = _load_rows(v_ptr, b, h, jc, d, D, jc_ok, s_v_b, s_v_h, s_v_l, s_v_d)
            _, ds, t, _ = _ds(q, k, v, do, lse, delta, b, h, bh, i, j, i_ok, j_ok, L, qr_ptr, kr_ptr, id_k_ptr,
                              id_q_ptr, id_v_ptr, rows_ptr, cols_ptr, mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h,
                              s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j,
                              s_idv_i, s_idv_j, s_mask_b, s_mask_l, HAS_QR, HAS_KR, HAS_V, HAS_MASK, FACTORED, DOT,
                              PRECISION, dw_ptr, s_dw_b, s_dw_h, s_dw_l, s_dw_k, seed, dropout_p, DROPOUT)
            dq += tl.dot(ds.to(DOT), k.to(DOT), input_precision=PRECISION)
            if HAS_QR:
                _add_bucket_sums(dqr_ptr, i, KP_K, ds, t, i_ok & j_ok, SIDE, 1, CHUNK, FACTORED)
        tl.store(dq_ptr + b * s_dq_b + h * s_dq_h + i * s_dq_l + d * s_dq_d, dq.to(dq_ptr.dtype.element_ty),
                 mask=i_ok & (d < D))

    @triton.jit(do_not_specialize=['seed'])
    def _backward_keys_kernel(q_ptr, k_ptr, v_ptr, qr_ptr, kr_ptr, id_k_ptr, id_q_ptr, id_v_ptr, rows_ptr, cols_ptr,
                              mask_ptr, H, L, D, ROWS, KP_K, KP_Q, KP_V, HEIGHT, WIDTH, SIDE, s_q_b, s_q_h, s_q_l,
                              s_q_d, s_k_b, s_k_h, s_k_l, s_k_d, s_v_b, s_v_h, s_v_l, s_v_d, s_qr_b, s_qr_h, s_qr_l,
                              s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j, s_idv_i,
                              s_idv_j, s_mask_b, s_mask_l, seed, dropout_p, do_ptr, dw_ptr, lse_ptr, delta_ptr, s_do_b,
                              s_do_h, s_do_l, s_do_d, s_dw_b, s_dw_h, s_dw_l, s_dw_k, dk_ptr, dv_ptr, dkr_ptr, s_dk_b,
                              s_dk_h, s_dk_l, s_dk_d, s_dv_b, s_dv_h, s_dv_l, s_dv_d, HAS_QR: tl.constexpr,
                              HAS_KR: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                              FACTORED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        """One key block of one (b, h): dk = ds^T q, dv = p^T dout and dkr = per-bucket sums of ds over queries."""
        bh, b, h, cols = _program(H, BLOCK_N)
        jc, j, jc_ok, j_ok = cols[:, None], cols[None, :], (cols < L)[:, None], (cols < L)[None, :]
        d = tl.arange(0, BLOCK_D)[None, :]
        k = _load_rows(k_ptr, b, h, jc, d, D, jc_ok, s_k_b, s_k_h, s_k_l, s_k_d)
        v = _load_rows(v_ptr, b, h, jc, d, D, jc_ok, s_v_b, s_v_h, s_v_l, s_v_d)
        dkr_ptr += bh.to(tl.int64) * ROWS * KP_Q
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for it in range(0, HEIGHT * tl.cdiv(WIDTH, BLOCK_M)):
            row, ok = _loop_tokens(it, WIDTH, BLOCK_M)
            i, i_ok = row[:, None], ok[:, None]
            q = _load_rows(q_ptr, b, h, i, d, D, i_ok, s_q_b, s_q_h, s_q_l, s_q_d)
            do = _load_rows(do_ptr, b, h, i, d, D, i_ok, s_do_b, s_do_h, s_do_l, s_do_d)
            lse = tl.load(lse_ptr + bh * L + row, mask=ok, other=float('inf'))[:, None]
            delta = tl.load(delta_ptr + bh * L + row, mask=ok, other=0)[:, None]
            p, ds, _, u = _ds(q, k, v, do, lse, delta, b, h, bh, i, j, i_ok, j_ok, L, qr_ptr, kr_ptr, id_k_ptr,
                              id_q_ptr, id_v_ptr, rows_ptr, cols_ptr, mask_ptr, HEIGHT, WIDTH, SIDE, s_qr_b, s_qr_h,
                              s_qr_l, s_qr_k, s_kr_b, s_kr_h, s_kr_l, s_kr_k, s_idk_i, s_idk_j, s_idq_i, s_idq_j,
                              s_idv_i, s_idv_j, s_mask_b, s_mask_l, HAS_QR, HAS_KR, HAS_V, HAS_MASK, FACTORED, DOT,
                              PRECISION, dw_ptr, s_dw_b, s_dw_h, s_dw_l, s_dw_k, seed, dropout_p, DROPOUT)
            dv += tl.dot(tl.trans(p.to(DOT)), do.to(DOT), input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(DOT)), q.to(DOT), input_precision=PRECISION)
            if HAS_KR:
                _add_bucket_sums(dkr_ptr, jc, KP_Q, ds, u, i_ok & j_ok, SIDE, 0, CHUNK, FACTORED)
        tl.store(dk_ptr + b * s_dk_b + h * s_dk_h + jc * s_dk_l + d * s_dk_d, dk.to(dk_ptr.dtype.element_ty),
                 mask=jc_ok & (d < D))
        tl.store(dv_ptr + b * s_dv_b + h * s_dv_h + jc * s_dv_l + d * s_dv_d, dv.to(dv_ptr.dtype.element_ty),
                 mask=jc_ok & (d < D))
