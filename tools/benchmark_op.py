"""Time rpe_ops.rpe_index against torch.gather, and rpe_index_qk against the two passes it replaces,
at DETR-encoder size, and print the ratios.

    python tools/benchmark_op.py                       # B=2 H=8 L=25*38 K=81, float32, CPU, iRPE bucket ids
    python tools/benchmark_op.py --ids random --threads 1
    python tools/benchmark_op.py --device cuda --json outputs/benchmark_op_cuda.json
"""
import argparse

import torch

from detr_irpe.checkpoint import save_json
from detr_irpe.benchmark import irpe_k_bucket_ids
from rpe_ops.benchmark import benchmark, benchmark_qk


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--length', type=int, default=25 * 38, help='Lq = Lk (feature-map H*W)')
    parser.add_argument('--buckets', type=int, default=81, help='K, lookup-table size')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16', 'float64'])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument('--ids', default='product', choices=['product', 'random'],
                        help='bucket ids: product = those of rpe-2.0-product on a 25x38 map (K = 81, needs '
                             '--length 950 --buckets 81); random = uniform in [0, K)')
    parser.add_argument('--json', default='outputs/benchmark_op.json', help='where to write the result')
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    index = None
    if args.ids == 'product':
        index, num_buckets = irpe_k_bucket_ids(25, 38)
        if (args.length, args.buckets) != (index.shape[0], num_buckets):
            parser.error(f'--ids product is the 25x38 map of rpe-2.0-product: use --length {index.shape[0]} '
                         f'--buckets {num_buckets} (got --length {args.length} --buckets {args.buckets}), or --ids random')
    result = benchmark(args.batch, args.heads, args.length, args.buckets, getattr(torch, args.dtype),
                       args.device, args.repeats, index=index)
    result['sizes']['index'] = args.ids
    m, s = result['machine'], result['sizes']
    print(f"machine: {m['cpu_count']} cores ({m['torch_threads']} torch threads), {m['processor']}, "
          f"gpu {m['gpu']}, torch {m['torch']}, load average {m['load_average_1min']:.1f}, "
          f"THP_MEM_ALLOC_ENABLE={m['THP_MEM_ALLOC_ENABLE']}")
    print(f"sizes: B={s['B']} H={s['H']} Lq=Lk={s['Lq']} K={s['K']} {s['dtype']} on {s['device']}, "
          f"{s['index']} bucket ids; "
          f"median of {result['repeats']} interleaved repeats")
    print(f"{'method':<26}{'forward ms':>12}{'fwd+bwd ms':>12}{'fwd x':>8}{'fwd+bwd x':>11}")
    for name in result['median_seconds']['forward']:
        fwd, fb = result['median_seconds']['forward'][name], result['median_seconds']['forward_backward'][name]
        ratio = [result['speedup'][kind].get(name) for kind in ('forward', 'forward_backward')]
        ratio = ['' if r is None else f'{r:.2f}' for r in ratio]
        print(f"{name:<26}{fwd * 1e3:>12.1f}{fb * 1e3:>12.1f}{ratio[0]:>8}{ratio[1]:>11}")
    print('x = baseline time / rpe_index time (higher: rpe_index faster); memory_floor = a fresh (B, H, L, L) '
          "tensor from torch's allocator, written (+ grad read): what gather's output costs before any gathering "
          "(rpe_index's outputs come from its huge-page cache instead)")

    qk = benchmark_qk(args.batch, args.heads, args.length, args.buckets, getattr(torch, args.dtype), args.device,
                      args.repeats)
    result['qk'] = qk
    t = qk['median_seconds_forward_backward']
    print(f"iRPE on keys and queries, fwd+bwd: rpe_index_qk {t['rpe_index_qk'] * 1e3:.1f} ms, "
          f"two rpe_index + add {t['two_rpe_index_and_add'] * 1e3:.1f} ms ({qk['speedup']:.2f}x)")

    save_json(result, args.json, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
