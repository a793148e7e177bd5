"""Prove the GPU path on the first GPU machine met, in one command: build rpe_ops in place, run named
checks, benchmark, print a table and write JSON.

    make gpu-check                                           # the same as the next line
    python3 -m detr_irpe.cli.gpu_check --output outputs/gpu_check.json   # from the checkout, nothing installed
    python3 -m detr_irpe.cli.gpu_check --device cpu --quick  # the same checks on CPU at small sizes (tests run it)

Written for a bare machine with one GPU: Python, PyTorch 2.7+ with its Triton, torchvision, scipy, a C++ compiler
and ninja; no virtual environment, no nvcc, nothing to download. The CPU op is built in place against the
installed torch (`python setup.py build_ext --inplace`; an installed package uses its op as installed); on CUDA
the ops run Triton kernels. Neither datasets/ nor pycocotools is needed (the GPU machines have neither). Each
check is independent: one that fails is reported and the others still run; the exit status is 1 when a check
failed (or a benchmark part raised), 0 otherwise. With --device cpu the comparisons of CUDA against CPU are
skipped and said so. On one H200 the whole run took 6 min 52 s, build included
(docs/gpu_check.md).
"""
import argparse
import os
import platform
import sys
import time

# First, so that a machine without torch hears what to do rather than a traceback.
try:
    import torch
except ImportError as error:
    raise SystemExit(f'gpu_check needs PyTorch (2.7 or later) installed for {sys.executable} ({error}). On the GPU '
                     f'machine, run it with the python that has torch: make gpu-check PYTHON=/path/to/python') from None

from detr_irpe.checkpoint import save_json
from detr_irpe.lab.gpu_benchmarks import BENCHMARKS
from detr_irpe.lab.gpu_check import CHECKS, build_extension, device_name, markdown, run_one


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--quick', action='store_true', help='small sizes and few repeats (a run of the script itself)')
    parser.add_argument('--output', default=os.path.join('outputs', 'gpu_check.json'), help='where to write the JSON')
    parser.add_argument('--no_build', action='store_true',
                        help='use the rpe_ops extension as it is (no build step; what an installed package does)')
    parser.add_argument('--checks', nargs='+', choices=list(CHECKS), default=list(CHECKS), help='which checks to run')
    parser.add_argument('--benchmarks', nargs='*', choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help='which benchmark parts to run (none: give the flag alone)')
    return parser


def run(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device cuda, but torch {torch.__version__} sees no CUDA device (torch.version.cuda = '
                     f'{torch.version.cuda}); run on a GPU machine, or pass --device cpu to run the checks on CPU.')
    started = time.time()
    report = {'device': device_name(args.device), 'torch': torch.__version__, 'cuda': torch.version.cuda,
              'python': platform.python_version(), 'quick': args.quick, 'build': None, 'checks': {}, 'benchmark': {}}
    if not args.no_build:
        report['build'] = build = build_extension(args.device)
        if build is None:
            print('no setup.py here (an installed package): rpe_ops as installed', flush=True)
        else:
            print(f"build {'done' if build['passed'] else 'FAILED'} in {build['seconds']} s", flush=True)
    for name in args.checks:
        print(f'check {name} ...', flush=True)
        report['checks'][name] = run_one(CHECKS[name], args.device, args.quick)
        save_json(report, args.output, default=str)  # what is done so far survives a crash or a time limit
    for name in args.benchmarks:
        print(f'benchmark {name} ...', flush=True)
        report['benchmark'][name] = run_one(BENCHMARKS[name], args.device, args.quick)
        save_json(report, args.output, default=str)
    report['seconds'] = time.time() - started
    failed = [n for n, r in report['checks'].items() if r['passed'] is False]
    failed += [f'benchmark {n}' for n, r in report['benchmark'].items() if r.get('error')]
    if report['build'] is not None and not report['build']['passed']:
        failed.insert(0, 'build')
    report['failed'] = failed
    print(markdown(report))
    save_json(report, args.output, default=str)  # the report is written whatever failed
    print(f"\nwrote {args.output}; {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


def main(argv=None):
    sys.exit(run(argv))


if __name__ == '__main__':  # `python -m detr_irpe.cli.gpu_check` from a checkout: what `make gpu-check` runs
    main()
