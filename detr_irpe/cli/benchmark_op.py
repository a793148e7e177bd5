"""Time rpe_ops.rpe_index against torch.gather, rpe_index_qk against the two passes it replaces and, on
CPU, the loops each op chose against the portable loops (and every other set this CPU runs), at
DETR-encoder size, and print the ratios with the host they were measured on.

    python tools/benchmark_op.py                       # B=2 H=8 L=25*38 K=81, float32, CPU, iRPE bucket ids
    python tools/benchmark_op.py --ids random --threads 1
    RPE_OPS_CPU_LOOPS=portable ATEN_CPU_CAPABILITY=avx2 python tools/benchmark_op.py   # as on a host without AVX-512
    python tools/benchmark_op.py --device cuda --json outputs/benchmark_op_cuda.json
"""
import argparse

import torch

from rpe_ops import block_cache
from detr_irpe.checkpoint import save_json
from detr_irpe.cli.flags import device_flag, int_range, non_empty
from detr_irpe.cli.runner import run_tool
from detr_irpe.lab.benchmark import irpe_k_bucket_ids
from rpe_ops.benchmark import benchmark, benchmark_loops, benchmark_qk, describe_host, host


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int_range(1, 1024), default=2)
    parser.add_argument('--heads', type=int_range(1, 1024), default=8)
    parser.add_argument('--length', type=int_range(1, 10 ** 5), default=25 * 38, help='Lq = Lk (feature-map H*W)')
    parser.add_argument('--buckets', type=int_range(1, 10 ** 5), default=81, help='K, lookup-table size')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16', 'float64'])
    parser.add_argument('--device', default='cpu', type=device_flag)
    parser.add_argument('--repeats', type=int_range(1, 10 ** 4), default=15)
    parser.add_argument('--threads', type=int_range(1, 4096), default=None, help="torch threads (default: torch's)")
    parser.add_argument('--ids', default='product', choices=['product', 'random'],
                        help='bucket ids: product = those of rpe-2.0-product on a 25x38 map (K = 81, needs '
                             '--length 950 --buckets 81); random = uniform in [0, K)')
    parser.add_argument('--json', default='outputs/benchmark_op.json', type=non_empty, help='where to write the result')
    return parser


def run(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = block_cache.install()  # as every tool runs (RPE_OPS_BLOCK_CACHE_MB=0: torch's default allocator)

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
    m['malloc'] = malloc
    print(f"machine: gpu {m['gpu']}, torch {m['torch']}, load average {m['load_average_1min']:.1f}, "
          f"THP_MEM_ALLOC_ENABLE={m['THP_MEM_ALLOC_ENABLE']}; malloc: {malloc}")
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
          "tensor from the process's CPU allocator, written (+ grad read): what gather's output costs before any "
          "gathering (rpe_index's outputs come from its block cache)")

    qk = benchmark_qk(args.batch, args.heads, args.length, args.buckets, getattr(torch, args.dtype), args.device,
                      args.repeats)
    result['qk'] = qk
    t = qk['median_seconds_forward_backward']
    print(f"iRPE on keys and queries, fwd+bwd: rpe_index_qk {t['rpe_index_qk'] * 1e3:.1f} ms, "
          f"two rpe_index + add {t['two_rpe_index_and_add'] * 1e3:.1f} ms ({qk['speedup']:.2f}x)")

    if args.device == 'cpu' and args.dtype == 'float32':
        loops = benchmark_loops(args.batch, args.heads, args.length, args.buckets, args.repeats, index=index)
        result['cpu_loops'] = loops
        print(f"CPU loops, float32 (these ops run {loops['loops']}); ms, and / portable:")
        for op, kinds in loops['median_seconds'].items():
            for kind, t in kinds.items():
                print(f"  {op:<13}{kind:<17}" + '  '.join(
                    f"{s} {v * 1e3:.1f} ({loops['vs_portable'][op][kind][s]:.2f})" for s, v in t.items()))
    result['machine']['host'] = host()
    print(describe_host(result['machine']['host']))
    save_json(result, args.json, indent=2)
    print(f'wrote {args.json}')


def main(argv=None):
    run_tool(run, argv)
