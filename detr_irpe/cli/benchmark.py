"""Print what iRPE costs over plain attention (ratios measured side by side in one run) and save it as JSON.

    python tools/benchmark.py                 # full sizes, about 10-15 minutes on 2 cores
    python tools/benchmark.py --quick         # smaller images and maps, a few minutes
    python tools/benchmark.py --parts models attention --json outputs/bench_models.json
"""
import argparse

from detr_irpe.checkpoint import check_output_file, save_json
from detr_irpe.cli.flags import int_range, non_empty
from detr_irpe.cli.runner import run_tool
from detr_irpe.lab.benchmark import PARTS, markdown_table, run as run_benchmark


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='smaller sizes and fewer repeats')
    parser.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
    parser.add_argument('--threads', type=int_range(1, 4096), default=None, help="torch threads (default: torch's)")
    parser.add_argument('--json', default='outputs/benchmark.json', type=non_empty, help='where to write the result')
    return parser


def run(argv=None):
    args = get_parser().parse_args(argv)
    check_output_file('--json', args.json, 'benchmark.json')  # before minutes of measuring, not after
    result = run_benchmark(quick=args.quick, parts=args.parts, threads=args.threads)
    print(markdown_table(result))
    save_json(result, args.json, indent=2)
    print(f'\nwrote {args.json}')


def main(argv=None):
    run_tool(run, argv)
