"""Block sizes of rpe_ops' Triton index and reduce kernels on this GPU, and a reduce that puts the buckets on the
dot's M dimension (one row p per program: (K x R) one-hot @ (R x B*H) values, a 2-D tl.dot), beside torch.gather /
scatter_add and a plain copy of the same bytes. Each variant is checked against the default kernel's output, then
timed by triton.testing.do_bench (median ms). Run from the repository root:
    python3 docs/gpu_runs/2026-12-04/probe_kernels.py [out.json]"""
import json
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, '.')
from rpe_ops import triton_kernels as T  # noqa: E402


@triton.jit
def _reduce_t_kernel(v_ptr, idx_ptr, out_ptr, BH, H, R, K, s_v_b, s_v_h, s_v_p, s_v_r, s_idx_p, s_idx_r,
                     s_out_b, s_out_h, s_out_p, s_out_k, DOT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_BH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, h, p, t] = sum_r v[b, h, p, r] [idx[p, r] == t]: per row p, onehot(idx[p, :])^T (K, R) @ v[:, p, :]^T."""
    p = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    bh = tl.program_id(2) * BLOCK_BH + tl.arange(0, BLOCK_BH)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    base = p * s_v_p + b * s_v_b + h * s_v_h  # (BH,)
    acc = tl.zeros((BLOCK_K, BLOCK_BH), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        ids = tl.load(idx_ptr + p * s_idx_p + r * s_idx_r, mask=r < R, other=-1)
        onehot = t[:, None] == ids[None, :]  # (K, R)
        v = tl.load(v_ptr + base[None, :] + r[:, None] * s_v_r, mask=(r < R)[:, None] & (bh < BH)[None, :],
                    other=0)  # (R, BH)
        acc = tl.dot(onehot.to(DOT), v.to(DOT), acc, input_precision=PRECISION)
    out = out_ptr + p * s_out_p + (b * s_out_b + h * s_out_h)[None, :] + t[:, None] * s_out_k
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(t < K)[:, None] & (bh < BH)[None, :])


def reduce_t(values, index, K, BLOCK_R, BLOCK_K, num_warps, num_stages):
    B, H, P, R = values.shape
    out = values.new_empty(B, H, P, K)
    BLOCK_BH = min(64, max(16, triton.next_power_of_2(B * H)))
    dot = T._TRITON_DTYPES[values.dtype]
    if T.INTERPRETING and values.dtype in T._HALF:
        dot = tl.float32
    grid = (P, triton.cdiv(K, BLOCK_K), triton.cdiv(B * H, BLOCK_BH))
    _reduce_t_kernel[grid](values, index, out, B * H, H, R, K, *values.stride(), *index.stride(), *out.stride(),
                           DOT=dot, PRECISION='tf32x3' if values.dtype == torch.float32 else 'ieee',
                           BLOCK_BH=BLOCK_BH, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=num_warps,
                           num_stages=num_stages)
    return out


INDEX = [dict(BLOCK_I=16, BLOCK_J=64, num_warps=4), dict(BLOCK_I=16, BLOCK_J=128, num_warps=4),
         dict(BLOCK_I=16, BLOCK_J=128, num_warps=8), dict(BLOCK_I=32, BLOCK_J=64, num_warps=4),
         dict(BLOCK_I=32, BLOCK_J=128, num_warps=8), dict(BLOCK_I=8, BLOCK_J=128, num_warps=4),
         dict(BLOCK_I=64, BLOCK_J=64, num_warps=8), dict(BLOCK_I=16, BLOCK_J=256, num_warps=8)]
REDUCE = [dict(BLOCK_P=2, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=3),  # the default
          dict(BLOCK_P=1, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=3),
          dict(BLOCK_P=2, BLOCK_R=128, BLOCK_K=64, num_warps=4, num_stages=3),
          dict(BLOCK_P=4, BLOCK_R=64, BLOCK_K=64, num_warps=8, num_stages=3),
          dict(BLOCK_P=2, BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=3),
          dict(BLOCK_P=2, BLOCK_R=32, BLOCK_K=128, num_warps=4, num_stages=4)]
REDUCE_T = [dict(BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=3), dict(BLOCK_R=128, BLOCK_K=128, num_warps=4, num_stages=3),
            dict(BLOCK_R=64, BLOCK_K=128, num_warps=8, num_stages=3), dict(BLOCK_R=32, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_R=128, BLOCK_K=64, num_warps=4, num_stages=3), dict(BLOCK_R=256, BLOCK_K=128, num_warps=8, num_stages=3)]


def main(device='cuda', cases=(((25, 34), torch.bfloat16), ((50, 68), torch.bfloat16), ((50, 68), torch.float32)),
         out_path=None):
    from detr_irpe import irpe
    results = []
    g = torch.Generator(device=device).manual_seed(0)
    bench = (lambda f: do_bench(f, warmup=10, rep=40, return_mode='median')) if device == 'cuda' else \
        (lambda f: (f(), 0.0)[1])
    for (h, w), dtype in cases:
        ids, K = irpe.get_bucket_ids_2d('product', h, w, 0, 1.9, 'piecewise', device)
        L = h * w
        if True:
            table = torch.randn(2, 8, L, K, generator=g, device=device).to(dtype)
            scores = torch.randn(2, 8, L, L, generator=g, device=device).to(dtype)
            keys = scores.transpose(2, 3)  # the key side of rpe_reduce_qk: strided values
            ids_t = ids.t()
            base = {'map': f'{h}x{w}', 'dtype': str(dtype).split('.')[1]}
            index64 = ids.long().expand(2, 8, L, L)
            results.append({**base, 'op': 'copy of the (B, H, L, L) bytes', 'ms': bench(lambda: scores.clone())})
            results.append({**base, 'op': 'torch.gather', 'ms': bench(lambda: table.gather(3, index64))})
            results.append({**base, 'op': 'torch.scatter_add', 'ms': bench(
                lambda: torch.zeros_like(table).scatter_add_(3, index64, scores))})
            want = T._index(table, ids)
            for cfg in INDEX:
                got = T._index(table, ids, tuning=cfg)
                results.append({**base, 'op': 'index', **cfg, 'equal': bool(torch.equal(got, want)),
                                'ms': bench(lambda: T._index(table, ids, tuning=cfg))})
            for side, values, idx in (('queries', scores, ids), ('keys', keys, ids_t)):
                want = T._reduce(values, idx, K).double()
                scale = want.abs().max().item()
                for cfg in REDUCE:
                    got = T._reduce(values, idx, K, tuning=cfg).double()
                    results.append({**base, 'op': f'reduce ({side})', **cfg,
                                    'max_difference_over_max': (got - want).abs().max().item() / scale,
                                    'ms': bench(lambda: T._reduce(values, idx, K, tuning=cfg))})
                for cfg in REDUCE_T:
                    got = reduce_t(values, idx, K, **cfg).double()
                    results.append({**base, 'op': f'reduce_t ({side})', **cfg,
                                    'max_difference_over_max': (got - want).abs().max().item() / scale,
                                    'ms': bench(lambda: reduce_t(values, idx, K, **cfg))})
            for r in results[-(3 + len(INDEX) + 2 * (len(REDUCE) + len(REDUCE_T))):]:
                print(json.dumps(r), flush=True)
            if out_path:
                with open(out_path, 'w') as f:
                    json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main(out_path=sys.argv[1] if len(sys.argv) > 1 else None)
