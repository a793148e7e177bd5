#!/usr/bin/env python
"""Train several configurations with the same seed and budget, and print a Markdown table of their COCO
AP, AP50, AP75, APs, APm, APl, like the paper's Table 6.

    python tools/sweep.py --config configs/smoke.yaml none rpe-2.0-product-bias-1-k rpe-2.0-product-ctx-1-k \\
        --output_dir outputs/sweep
    python tools/sweep.py configs/table6/*.yaml --coco_path /data/coco --output_dir runs/table6
    python tools/sweep.py configs/table6/*.yaml --dataset_file synthetic --backbone resnet18 --epochs 2 \\
        --lr_drop 2 --batch_size 4 --parallel 2 --output_dir outputs/table6_small

Each entry is either an --enc_rpe2d string ('none' for no iRPE), trained with --config, or a config file
(configs/table6/row5.yaml), trained with that file alone. Any other flag (--epochs, --coco_path, ...) is
passed to every run of tools/train.py, after the config, so it overrides it: the same seed (--seed) and
budget for all. Runs go one after another, or --parallel N at a time, each in output_dir/<entry name>
with its output in train.out there; the table is read from their eval.json and also written to
output_dir/table.md. --table_only reprints the table of finished runs without training.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import json  # noqa: E402

import datasets  # noqa: E402
from detr_irpe import get_args_parser  # noqa: E402
from detr_irpe.config import parse_args_with_config, run_tool  # noqa: E402
from detr_irpe.inspect import describe_run, run_name, run_processes, sweep_table  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage='%(prog)s [options] ENTRY [ENTRY ...] [flags of tools/train.py]')
    p.add_argument('entries', nargs='+', metavar='ENTRY',
                   help="an --enc_rpe2d string ('none': no iRPE) or a config file (.yaml)")
    p.add_argument('--config', default=None, help='the preset of the --enc_rpe2d entries')
    p.add_argument('--seed', type=int, default=42, help='seed of every run')
    p.add_argument('--parallel', type=int, default=1, help='runs at a time (each its own process)')
    p.add_argument('--table_only', action='store_true', help="print the table of the runs' eval.json, train nothing")
    p.add_argument('--output_dir', default='outputs/sweep')
    return p


def train_argv(entry, args, extra, run_dir):
    if entry.endswith(('.yaml', '.yml')):
        head = ['--config', entry]
    else:
        head = (['--config', args.config] if args.config else []) + ['--enc_rpe2d', '' if entry == 'none' else entry]
    return head + extra + ['--seed', str(args.seed), '--output_dir', run_dir]


def main(argv=None):
    args, extra = get_parser().parse_known_args(argv)
    if args.parallel < 1:
        raise ValueError(f'--parallel must be at least 1, got {args.parallel}.')
    names = [run_name('' if e == 'none' else e) for e in args.entries]
    if len(set(names)) != len(names):
        raise ValueError(f'two entries share the name of their run folder: {", ".join(names)}; give each once.')
    runs = []
    for entry, name in zip(args.entries, names):
        run_dir = os.path.join(args.output_dir, name)
        run_argv = train_argv(entry, args, extra, run_dir)
        # The run's own flags, parsed as tools/train.py will: a mistake stops the sweep before any training.
        parsed = parse_args_with_config(datasets.add_dataset_args(get_args_parser()), run_argv)
        runs.append({'name': name, 'dir': run_dir, 'argv': run_argv, **describe_run(parsed)})
    if not args.table_only:
        for run in runs:  # a failed run must not show the numbers of an older one
            if os.path.exists(os.path.join(run['dir'], 'eval.json')):
                os.remove(os.path.join(run['dir'], 'eval.json'))
        env = dict(os.environ)
        env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // args.parallel)))
        commands = [[sys.executable, os.path.join(REPO, 'tools', 'train.py'), *run['argv']] for run in runs]
        run_processes(commands, [os.path.join(run['dir'], 'train.out') for run in runs], args.parallel, env)
    for run in runs:
        path = os.path.join(run['dir'], 'eval.json')
        run['bbox'] = json.load(open(path))['bbox'] if os.path.exists(path) else None
    table = sweep_table(runs)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, 'table.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    failed = [run['name'] for run in runs if run['bbox'] is None]
    if failed:
        raise RuntimeError(f'{len(failed)} of {len(runs)} runs have no eval.json: {", ".join(failed)}; '
                           f'see train.out in their folders under {args.output_dir}.')
    return table


if __name__ == '__main__':
    run_tool(main)
