"""Block sizes of rpe_ops' Triton index and reduce kernels on this GPU, beside torch.gather / scatter_add and a
plain copy of the same bytes. Each configuration is checked against the default launcher's output, then timed
by triton.testing.do_bench (median ms, kernel time). Run from the repository root:
    python3 docs/gpu_runs/2026-12-04/probe_kernels.py [out.json]
Run 3's sweep (probe_kernels.json beside this) ran an earlier form of this script that also timed the reduce
kernel it replaced (a batched 3-D dot over BLOCK_P rows); the kernels' defaults are its fastest rows."""
import json
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, '.')
from rpe_ops import triton_kernels as T  # noqa: E402

INDEX = [dict(BLOCK_I=8, BLOCK_J=128, num_warps=4), dict(BLOCK_I=16, BLOCK_J=64, num_warps=4),
         dict(BLOCK_I=16, BLOCK_J=128, num_warps=4), dict(BLOCK_I=32, BLOCK_J=64, num_warps=4),
         dict(BLOCK_I=4, BLOCK_J=256, num_warps=4), dict(BLOCK_I=8, BLOCK_J=256, num_warps=8)]
REDUCE = [dict(BLOCK_R=128, BLOCK_K=64, num_warps=4, num_stages=3), dict(BLOCK_R=32, BLOCK_K=128, num_warps=4, num_stages=4),
          dict(BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=3), dict(BLOCK_R=128, BLOCK_K=128, num_warps=4, num_stages=3),
          dict(BLOCK_R=256, BLOCK_K=64, num_warps=8, num_stages=3), dict(BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=4)]


def index(table, ids, BLOCK_I, BLOCK_J, num_warps):
    """rpe_index with these block sizes (the launcher of rpe_ops.triton_kernels._index, query-side only)."""
    B, H, Lq, _ = table.shape
    out = table.new_empty(B, H, Lq, ids.shape[1])
    grid_ji = (triton.cdiv(ids.shape[1], BLOCK_J), triton.cdiv(Lq, BLOCK_I))
    T._index_kernel[(*grid_ji, T._bh_programs(B * H, grid_ji[0] * grid_ji[1]))](
        table, ids, table, ids, out, B * H, H, Lq, ids.shape[1], *table.stride(), *table.stride(), *ids.stride(),
        *ids.stride(), *out.stride(), KEYS=False, ACC=T._acc_dtype(table.dtype), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
        num_warps=num_warps)
    return out


def reduce(values, ids, K, BLOCK_R, BLOCK_K, num_warps, num_stages):
    """rpe_reduce with these block sizes (the launcher of rpe_ops.triton_kernels._reduce, one-hot path)."""
    B, H, P, R = values.shape
    out = values.new_empty(B, H, P, K)
    BLOCK_BH = min(64, max(16, triton.next_power_of_2(B * H)))
    dot = T.tl.float32 if T.INTERPRETING and values.dtype in T._HALF else T._TRITON_DTYPES[values.dtype]
    T._reduce_kernel[(P, triton.cdiv(K, BLOCK_K), triton.cdiv(B * H, BLOCK_BH))](
        values, ids, out, B * H, H, R, K, *values.stride(), *ids.stride(), *out.stride(), DOT=dot,
        PRECISION='tf32x3' if values.dtype == torch.float32 else 'ieee', BLOCK_BH=BLOCK_BH, BLOCK_R=BLOCK_R,
        BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages)
    return out


# (map, iRPE ratio, dtype): ratio 2.0 is DETR's rpe-2.0-... (81 product buckets), 1.9 run 3's sweep (49)
CASES = (((25, 34), 2.0, torch.bfloat16), ((50, 68), 2.0, torch.bfloat16), ((50, 68), 2.0, torch.float32),
         ((50, 68), 1.9, torch.bfloat16))


def main(device='cuda', cases=CASES, out_path=None):
    from detr_irpe import irpe
    results = []
    g = torch.Generator(device=device).manual_seed(0)
    bench = (lambda f: do_bench(f, warmup=10, rep=40, return_mode='median')) if device == 'cuda' else \
        (lambda f: (f(), 0.0)[1])
    for (h, w), ratio, dtype in cases:
        ids, K = irpe.get_bucket_ids_2d('product', h, w, 0, ratio, 'piecewise', torch.device(device))
        L, start = h * w, len(results)
        table = torch.randn(2, 8, L, K, generator=g, device=device).to(dtype)
        scores = torch.randn(2, 8, L, L, generator=g, device=device).to(dtype)
        base = {'map': f'{h}x{w}', 'buckets': K, 'dtype': str(dtype).split('.')[1]}
        index64 = ids.long().expand(2, 8, L, L)
        results.append({**base, 'op': 'copy of the (B, H, L, L) bytes', 'ms': bench(lambda: scores.clone())})
        results.append({**base, 'op': 'torch.gather', 'ms': bench(lambda: table.gather(3, index64))})
        results.append({**base, 'op': 'torch.scatter_add', 'ms': bench(
            lambda: torch.zeros_like(table).scatter_add_(3, index64, scores))})
        want = T._index(table, ids)
        for cfg in INDEX:
            results.append({**base, 'op': 'index', **cfg, 'equal': bool(torch.equal(index(table, ids, **cfg), want)),
                            'ms': bench(lambda: index(table, ids, **cfg))})
        # the query side, and the key side of rpe_reduce_qk (values strided by L)
        for side, values, idx in (('queries', scores, ids), ('keys', scores.transpose(2, 3), ids.t())):
            want = T._reduce(values, idx, K).double()
            for cfg in REDUCE:
                got = reduce(values, idx, K, **cfg).double()
                results.append({**base, 'op': f'reduce ({side})', **cfg,
                                'max_difference_over_max': (got - want).abs().max().item() / want.abs().max().item(),
                                'ms': bench(lambda: reduce(values, idx, K, **cfg))})
        for r in results[start:]:
            print(json.dumps(r), flush=True)
        if out_path:
            with open(out_path, 'w') as f:
                json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main(out_path=sys.argv[1] if len(sys.argv) > 1 else None)
