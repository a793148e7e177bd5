"""Triton kernels of the four rpe_ops (definitions in rpe_ops/__init__.py), the CUDA implementation
that rpe_ops/cuda.py registers. They run on CUDA tensors, or on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how the suite tests them.

rpe_index / rpe_index_qk: one program per (BLOCK_I, BLOCK_J) tile of the (Lq, Lk) pairs loads the tile's
    bucket ids once and gathers that tile for a share of the B*H (b, h) pairs.
rpe_reduce: out[bh, p, t] = sum_r values[bh, p, r] [index[p, r] == t] is, for one row p, the matrix
    product values[:, p, :] (B*H, R) @ onehot(index[p, :]) (R, K): one program per (BLOCK_P rows,
    BLOCK_K buckets, BLOCK_BH (b, h) pairs) runs it as a batched tl.dot over all of R, accumulating in
    float32 (tensor cores for half types), and writes its output block once: no atomics, and each id
    tile is read once for BLOCK_BH (b, h) pairs. The key side of rpe_reduce_qk is the same kernel on
    the transposed view (p = key j, r = query i), with blocks wide in p so its loads stay coalesced.
    When K is so large that re-reading values once per BLOCK_K buckets costs more than atomics (the
    flattened key-major layout of iRPE on queries alone, K = L * buckets), a scatter with float32
    atomics runs instead; there the ids of a row are spread, so the atomics rarely collide.
Bucket ids are checked on the host before a launch (no device asserts), once per ids tensor and version.
"""
import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

import rpe_ops

INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
# Above this many buckets the reductions scatter with atomics instead of one-hot products (see above).
ONE_HOT_MAX_BUCKETS = 512
_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _index_kernel(in_ptr, idx_ptr, in_t_ptr, idx_t_ptr, out_ptr, BH, H, Lq, Lk,
                  s_in_b, s_in_h, s_in_i, s_in_k, s_t_b, s_t_h, s_t_j, s_t_k,
                  s_idx_i, s_idx_j, s_idxt_i, s_idxt_j, s_out_b, s_out_h, s_out_i, s_out_j,
                  KEYS: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[b, h, i, j] = in[b, h, i, idx[i, j]] (+ in_t[b, h, j, idx_t[i, j]] if KEYS)."""
    i = (tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)[:, None]
    j = (tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)[None, :]
    mask = (i < Lq) & (j < Lk)
    t = tl.load(idx_ptr + i * s_idx_i + j * s_idx_j, mask=mask, other=0).to(tl.int64)
    if KEYS:
        u = tl.load(idx_t_ptr + i * s_idxt_i + j * s_idxt_j, mask=mask, other=0).to(tl.int64)
    for bh in range(tl.program_id(2), BH, tl.num_programs(2)):
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        y = tl.load(in_ptr + b * s_in_b + h * s_in_h + i * s_in_i + t * s_in_k, mask=mask)
        if KEYS:  # one rounding of the sum, as the CPU op
            y = y.to(ACC) + tl.load(in_t_ptr + b * s_t_b + h * s_t_h + j * s_t_j + u * s_t_k, mask=mask).to(ACC)
        tl.store(out_ptr + b * s_out_b + h * s_out_h + i * s_out_i + j * s_out_j,
                 y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(v_ptr, idx_ptr, out_ptr, BH, H, P, R, K,
                   s_v_b, s_v_h, s_v_p, s_v_r, s_idx_p, s_idx_r, s_out_b, s_out_h, s_out_p, s_out_k,
                   DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_BH: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, h, p, t] = sum_r v[b, h, p, r] [idx[p, r] == t]: per row p, v[:, p, :] @ onehot(idx[p, :])."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    t = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    bh = tl.program_id(2) * BLOCK_BH + tl.arange(0, BLOCK_BH)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = (p[:, None] * s_v_p + (b * s_v_b + h * s_v_h)[None, :])[:, :, None]      # (P, BH, 1)
    row_mask = ((p < P)[:, None] & (bh < BH)[None, :])[:, :, None]
    acc = tl.zeros((BLOCK_P, BLOCK_BH, BLOCK_K), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        ids = tl.load(idx_ptr + p[:, None] * s_idx_p + r[None, :] * s_idx_r,
                      mask=(p < P)[:, None] & (r < R)[None, :], other=-1)                # (P, R)
        onehot = ids[:, :, None] == t[None, None, :]                                     # (P, R, K)
        v = tl.load(v_ptr + rows + r[None, None, :] * s_v_r, mask=row_mask & (r < R)[None, None, :],
                    other=0)                                                             # (P, BH, R)
        if DOT:  # 0/1 times a value is exact; tensor cores sum in float32; no TF32 for float32 values
            acc = tl.dot(v.to(DOT), onehot.to(DOT), acc, input_precision='ieee')
        else:  # float64 (tl.dot has no float64)
            acc += tl.sum(v.to(ACC)[:, :, :, None] * onehot.to(ACC)[:, None, :, :], axis=2)
    out = out_ptr + (p[:, None] * s_out_p + (b * s_out_b + h * s_out_h)[None, :])[:, :, None] + t[None, None, :] * s_out_k
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask & (t < K)[None, None, :])


@triton.jit
def _scatter_kernel(v_ptr, idx_ptr, out_ptr, BH, H, P, R,
                    s_v_b, s_v_h, s_v_p, s_v_r, s_idx_p, s_idx_r, s_out_b, s_out_h, s_out_p, s_out_k,
                    BLOCK_R: tl.constexpr):
    """out[b, h, p, idx[p, r]] += v[b, h, p, r] with atomics; out is float32 (float64 for float64 v)."""
    p = tl.program_id(0).to(tl.int64)
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask = r < R
    t = tl.load(idx_ptr + p * s_idx_p + r * s_idx_r, mask=mask, other=0).to(tl.int64)
    for bh in range(tl.program_id(2), BH, tl.num_programs(2)):
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        v = tl.load(v_ptr + b * s_v_b + h * s_v_h + p * s_v_p + r * s_v_r, mask=mask, other=0)
        tl.atomic_add(out_ptr + b * s_out_b + h * s_out_h + p * s_out_p + t * s_out_k,
                      v.to(out_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bh_programs(BH, tiles):
    """How many programs share the B*H loop of one tile: enough programs to fill a GPU, ids read few times."""
    return max(1, min(BH, triton.cdiv(1024, max(tiles, 1))))


def check_bucket_ids(op, index, num_buckets):
    """IndexError naming the op, the ids found and the range expected if an id lies outside [0, num_buckets).
    One min/max reduction (and a device sync) per ids tensor and version: cached on the tensor, since
    bucket ids are built once per map size and reused every step."""
    if index.numel() == 0:
        return
    cached = getattr(index, '_rpe_ops_id_range', None)
    if cached is None or cached[0] != index._version:
        lo, hi = torch.aminmax(index)
        cached = (index._version, int(lo), int(hi))
        index._rpe_ops_id_range = cached
    _, lo, hi = cached
    if lo < 0 or hi >= num_buckets:
        raise IndexError(f'rpe_ops.{op}: the bucket ids lie in [{lo}, {hi}], but a table of {num_buckets} '
                         f'buckets needs ids in [0, {num_buckets - 1}]. Pass the ids built for this table '
                         f'(detr_irpe.irpe.get_bucket_ids_2d) and its num_buckets.')


def rpe_index(input, index):
    return _index(input, index)


def rpe_index_qk(input, index, input_t, index_t):
    return _index(input, index, input_t, index_t)


def rpe_reduce(values, index, num_buckets):
    return _reduce(values, index, num_buckets)


def rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t):
    # The key side is the same reduction on the transposed view: out_t[b, h, j, t] sums over queries i.
    return (_reduce(values, index, num_buckets),
            _reduce(values.transpose(2, 3), index_t.t(), num_buckets_t))


def _index(input, index, input_t=None, index_t=None):
    B, H, Lq, _ = input.shape
    Lk = index.shape[1]
    out = input.new_empty(B, H, Lq, Lk)
    if out.numel() == 0:
        return out
    keys = input_t is not None
    if not keys:
        input_t, index_t = input, index  # unused by the kernel
    BLOCK_I, BLOCK_J = 16, 64
    grid_ij = (triton.cdiv(Lq, BLOCK_I), triton.cdiv(Lk, BLOCK_J))
    grid = (*grid_ij, _bh_programs(B * H, grid_ij[0] * grid_ij[1]))
    _index_kernel[grid](input, index, input_t, index_t, out, B * H, H, Lq, Lk, *input.stride(),
                        *input_t.stride(), *index.stride(), *index_t.stride(), *out.stride(),
                        KEYS=keys, ACC=_acc_dtype(input.dtype), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
                        num_warps=4)
    return out


def _reduce(values, index, num_buckets):
    """out[b, h, p, t] = sum_r values[b, h, p, r] [index[p, r] == t] for any strides of values and index."""
    B, H, P, R = values.shape
    BH, dtype = B * H, values.dtype
    if num_buckets > ONE_HOT_MAX_BUCKETS:
        acc = torch.zeros(B, H, P, num_buckets, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=values.device)
        if acc.numel() == 0 or R == 0:
            return acc.to(dtype)
        BLOCK_R = 256
        grid = (P, triton.cdiv(R, BLOCK_R))
        _scatter_kernel[(*grid, _bh_programs(BH, grid[0] * grid[1]))](
            values, index, acc, BH, H, P, R, *values.stride(), *index.stride(), *acc.stride(), BLOCK_R=BLOCK_R)
        return acc.to(dtype)
    out = values.new_empty(B, H, P, num_buckets)
    if out.numel() == 0:
        return out
    if R == 0:
        return out.zero_()
    if dtype == torch.float64:
        dot, BLOCK_BH, BLOCK_K = None, min(16, triton.next_power_of_2(BH)), 16
        BLOCK_P, BLOCK_R = (1, 16) if values.stride(3) == 1 else (4, 16)
    else:
        # Under the interpreter tl.dot has no bfloat16 (numpy): float32 there, exact for 0/1 products too.
        dot = tl.float32 if dtype == torch.float32 or INTERPRETING else (
            tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
        BLOCK_BH, BLOCK_K = min(64, max(16, triton.next_power_of_2(BH))), 64  # tl.dot needs dims >= 16
        # Coalesced loads: wide in r when r is the contiguous dim (query side), else wide in p (one
        # 32-byte sector of keys per row).
        BLOCK_P, BLOCK_R = (2, 64) if values.stride(3) == 1 else (32 // values.element_size(), 16)
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(num_buckets, BLOCK_K), triton.cdiv(BH, BLOCK_BH))
    _reduce_kernel[grid](values, index, out, BH, H, P, R, num_buckets, *values.stride(), *index.stride(),
                         *out.stride(), DOT=dot, ACC=_acc_dtype(dtype), BLOCK_P=BLOCK_P, BLOCK_BH=BLOCK_BH,
                         BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4 if BLOCK_P < 8 else 8)
    return out
