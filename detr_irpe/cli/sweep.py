"""Train several configurations with the same seeds and budget, and print a Markdown table of their COCO
AP, AP50, AP75, APs, APm, APl, like the paper's Table 6; with several seeds, their mean and spread and
each entry's paired difference against a baseline entry with a 95% interval.

    python tools/sweep.py --config configs/smoke.yaml none rpe-2.0-product-bias-1-k rpe-2.0-product-ctx-1-k \\
        --output_dir outputs/sweep
    python tools/sweep.py --config configs/smoke.yaml none rpe-2.0-product-ctx-1-k --seeds 3 --parallel 2
    python tools/sweep.py configs/table6/row1_sine_noirpe_150ep.yaml configs/table6/row6_sine_ctx9x9_150ep.yaml \\
        --seeds 3 --coco_path /data/coco --output_dir runs/table6 --gpus_per_run 8     # the paper's batch of 16

Each entry is either an --enc_rpe2d string ('none' for no iRPE), trained with --config, or a config file
(configs/table6/row6_sine_ctx9x9_150ep.yaml), trained with that file alone. Any other flag (--epochs,
--coco_path, ...) is passed to every run of tools/train.py, after the config, so it overrides it: the same
budget for all. Every entry is trained with the seeds --seed, --seed + 1, ... (--seeds of them), so runs
pair up seed by seed; entry e, seed s runs in output_dir/<e>/seed<s>, its output in train.out there.

Runs go --parallel N at a time on the CPU. Runs on GPUs (--device cuda, the default where there is one)
get a GPU each (CUDA_VISIBLE_DEVICES), or --gpus_per_run K GPUs each through torchrun (--batch_size is per
GPU), as many at a time as there are; a GPU takes a second run only with --runs_per_gpu 2.

Started again, a sweep skips every run whose eval.json is of its final epoch, and resumes the others from
their checkpoint.pth. The table is written to output_dir/table.md and table.json (every run's stats, the
per-entry mean, std, min and max, the paired differences). --table_only reprints it without training.
"""
import argparse
import json
import os

from detr_irpe import UsageError
from detr_irpe.checkpoint import CHECKPOINT, load_checkpoint, resume_point, save_json, stopped_before_its_log_line
from detr_irpe.cli.flags import MAX_SEED, get_args_parser, int_range
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.cli.runner import run_tool
from detr_irpe.lab.sweep import (check_same_run, describe_run, device_slots, final_result, run_dir,
                                 run_name, run_processes, seed_folders, summarize, sweep_table, visible_gpus)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage='%(prog)s [options] ENTRY [ENTRY ...] [flags of tools/train.py]')
    p.add_argument('entries', nargs='+', metavar='ENTRY',
                   help="an --enc_rpe2d string ('none': no iRPE) or a config file (.yaml)")
    p.add_argument('--config', default=None, help='the preset of the --enc_rpe2d entries')
    p.add_argument('--seed', type=int_range(0, MAX_SEED), default=42, help='the first seed')
    p.add_argument('--seeds', type=int_range(1, 1000), default=1,
                   help='seeds per entry: --seed, --seed + 1, ... (the same for all)')
    p.add_argument('--baseline', default=None, metavar='ENTRY',
                   help='the entry the others are compared with (default: the first)')
    p.add_argument('--parallel', type=int_range(1, 1024), default=1,
                   help='runs at a time on the CPU (each its own process)')
    p.add_argument('--gpus_per_run', type=int_range(1, 1024), default=1,
                   help='GPUs of each run (more than 1: through torchrun)')
    p.add_argument('--runs_per_gpu', type=int_range(1, 64), default=1,
                   help='runs that may share one GPU')
    p.add_argument('--table_only', action='store_true', help="print the table of the runs' eval.json, train nothing")
    p.add_argument('--output_dir', default='outputs/sweep')
    return p


def train_argv(entry, args, extra, seed, folder):
    if entry.endswith(('.yaml', '.yml')):
        head = ['--config', entry]
    else:
        head = (['--config', args.config] if args.config else []) + ['--enc_rpe2d', '' if entry == 'none' else entry]
    return head + extra + ['--seed', str(seed), '--output_dir', folder]


def parse_train_flags(entry, run_argv):
    """A run's flags parsed as tools/train.py will: a mistake stops the sweep before any training, in one line
    naming the entry (not tools/train.py's usage, which would read as the sweep's)."""
    parser = get_args_parser()

    def error(message):
        raise UsageError(f'entry {entry!r}: {message} (python tools/train.py --help lists its flags)')
    parser.error = error
    return parse_args_with_config(parser, run_argv)


def resume_flags(folder, epochs):
    """Flags that continue an unfinished run from its checkpoint: training where it stopped (or the last epoch's
    evaluation and log line where the run stopped before them), or only the final evaluation when training ended
    but its eval.json was not written."""
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.exists(path):
        return []
    checkpoint = load_checkpoint(path)
    trained = resume_point(checkpoint)[0]  # whole epochs done
    if trained > epochs:
        raise UsageError(f'{path} has trained {trained} epochs, more than the --epochs {epochs} asked for now; '
                         'give the sweep the --epochs it ran with, or another --output_dir.')
    if trained == epochs and not stopped_before_its_log_line(checkpoint, folder):
        return ['--resume', path, '--eval', '--start_epoch', str(epochs)]  # eval.json of epoch epochs - 1
    return ['--resume', path]


def check_table_runs(output_dir, names, seeds):
    """--table_only: every entry has its folder in output_dir (a mistyped entry or --output_dir would rewrite
    the table with failed rows), and a note names seed folders the table leaves out (--seeds, --seed)."""
    missing = [n for n in names if not os.path.isdir(os.path.join(output_dir, n))]
    if missing:
        held = sorted(d for d in os.listdir(output_dir) if os.path.isdir(os.path.join(output_dir, d))) \
            if os.path.isdir(output_dir) else []
        raise UsageError(f'--table_only: no runs of {", ".join(missing)} in {output_dir} (entries there: '
                         f'{", ".join(held) or "none"}); give the entries and --output_dir the sweep ran with.')
    for name in names:
        left_out = sorted(set(seed_folders(os.path.join(output_dir, name))) - set(seeds))
        if left_out:
            print(f'note: {os.path.join(output_dir, name)} also holds seeds {", ".join(map(str, left_out))}, which '
                  f'--seed {seeds[0]} --seeds {len(seeds)} leaves out of the table')


def gpu_slots(args, runs):
    """Where the runs go: one slot per GPU group, or CPU slots (None) for --parallel."""
    on_gpu = [r for r in runs if r['device'].startswith('cuda')]
    if not on_gpu:
        if args.gpus_per_run > 1:
            raise UsageError(f'--gpus_per_run {args.gpus_per_run} needs runs on GPUs, but they run on '
                             f'{runs[0]["device"]}; leave it out, or give --device cuda.')
        return [None] * args.parallel
    import torch
    gpus = visible_gpus(os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.device_count())
    if not gpus:
        raise UsageError(f'{len(on_gpu)} runs ask for --device {on_gpu[0]["device"]}, but no GPU is visible; '
                         'give --device cpu to run them on the CPU.')
    return device_slots(gpus, args.gpus_per_run, args.runs_per_gpu)


def run(argv=None):
    args, extra = get_parser().parse_known_args(argv)  # --parallel and --seeds are at least 1 at parse
    names = [run_name('' if e == 'none' else e) for e in args.entries]
    if len(set(names)) != len(names):
        raise UsageError(f'two entries share the name of their run folder: {", ".join(names)}; give each once.')
    baseline = 0
    if args.baseline is not None:
        if args.baseline not in args.entries and args.baseline not in names:
            raise UsageError(f'--baseline {args.baseline!r} is none of the entries ({", ".join(args.entries)}); '
                             'give one of them.')
        baseline = (args.entries.index(args.baseline) if args.baseline in args.entries
                    else names.index(args.baseline))
    seeds = [args.seed + i for i in range(args.seeds)]
    entries, runs = [], []
    for entry, name in zip(args.entries, names):
        described = None
        for seed in seeds:
            folder = run_dir(args.output_dir, name, seed)
            run_argv = train_argv(entry, args, extra, seed, folder)
            parsed = parse_train_flags(entry, run_argv)
            described = describe_run(parsed)
            runs.append({'entry': name, 'seed': seed, 'dir': folder, 'argv': run_argv, 'epochs': parsed.epochs,
                         'device': parsed.device, 'flags': json.loads(json.dumps(vars(parsed)))})
        entries.append({'name': name, **described})

    for run in runs:  # all checked before any starts: a mismatch stops the sweep with nothing trained
        check_same_run(run['dir'], run['flags'])
    if args.table_only:
        check_table_runs(args.output_dir, [e['name'] for e in entries], seeds)
    else:
        slots = gpu_slots(args, runs)
        todo = [r for r in runs if final_result(r['dir'], r['epochs']) is None]
        for run in runs:
            if run not in todo:
                print(f'{run["entry"]} seed {run["seed"]}: finished (eval.json of epoch {run["epochs"] - 1}), skipped')
        for run in todo:
            save_json({'argv': run['argv'], 'flags': run['flags']}, os.path.join(run['dir'], 'run.json'))
            run['argv'] = run['argv'] + resume_flags(run['dir'], run['epochs'])
        env = dict(os.environ)
        at_once = max(1, min(len(slots), len(todo)))
        env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // at_once)))
        run_processes([(r['argv'], os.path.join(r['dir'], 'train.out')) for r in todo], slots, env)

    for entry in entries:
        entry['results'] = {r['seed']: final_result(r['dir'], r['epochs']) for r in runs if r['entry'] == entry['name']}
    summary = summarize(entries, seeds, baseline)
    table = sweep_table(summary)
    save_json(summary, os.path.join(args.output_dir, 'table.json'))
    with open(os.path.join(args.output_dir, 'table.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    failed = [f'{e["name"]} seed {seed}' for e in entries for seed, result in e['results'].items() if result is None]
    if failed:
        raise UsageError(f'{len(failed)} of {len(runs)} runs have no eval.json of their final epoch: '
                           f'{", ".join(failed)}; see train.out in their folders under {args.output_dir}. '
                           'Run the sweep again to resume them.')
    return table


def main(argv=None):
    run_tool(run, argv)
