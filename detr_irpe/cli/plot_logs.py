"""Plot training curves (losses, and val AP / AP50) of one or more runs of tools/train.py, overlaid.

    python tools/plot_logs.py outputs/demo_baseline/log.txt outputs/demo_irpe/log.txt --output_dir outputs
    python tools/plot_logs.py runs/*/log.txt --labels "DETR" "DETR + iRPE" --name detr_vs_irpe.png
    python tools/plot_logs.py outputs/sweep/none outputs/sweep/rpe-2.0-product-ctx-1-k --band std

Each line is labelled with its run folder's name unless --labels is given. The folder of a sweep entry
(tools/sweep.py --seeds N: output_dir/<entry> with seed<s>/log.txt) is drawn as the mean over its seeds
with a band: their min to max (--band minmax, the default) or the mean ± their std (--band std); seed
folders without a log.txt are named in a warning. A last line cut off (a run killed while writing it) is
skipped with a warning. A sweep's own folder is refused with its entry folders named.
AP is in [0, 1] as pycocotools gives it. Writes output_dir/<--name> (default logs.png; .png, .jpg or .jpeg);
output_dir defaults to the first log's folder.
"""
import argparse
import os

from detr_irpe import UsageError
from detr_irpe.checkpoint import check_output_file, check_output_folder
from detr_irpe.cli.flags import check_figure_name, int_range, non_empty
from detr_irpe.cli.runner import run_tool
from detr_irpe.lab.plots import LOG_PANELS, plot_logs, read_log, run_label, save_figure
from detr_irpe.lab.sweep import seed_folders, seed_logs

EXPECTED = "expected log.txt files of tools/train.py, their run folders or a sweep entry's folder (seed*/log.txt)"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('logs', nargs='+', help='log.txt files written by tools/train.py (or their run folders, or '
                                           "a sweep entry's folder: its seeds)")
    p.add_argument('--labels', nargs='+', default=None, help='one label per log (default: the run folder names)')
    p.add_argument('--name', default='logs.png', type=non_empty, help='file name of the picture (.png, .jpg, .jpeg)')
    p.add_argument('--dpi', type=int_range(10, 1200), default=90)
    p.add_argument('--band', default='minmax', choices=['minmax', 'std'],
                   help="the band around a sweep entry's mean: min to max over seeds, or mean ± std")
    p.add_argument('--output_dir', default='')
    return p


def run(argv=None):
    args = get_parser().parse_args(argv)
    missing = [p for p in args.logs if not os.path.exists(p)]
    if missing:
        raise UsageError(f'{", ".join(missing)}: no such file or folder; {EXPECTED}')
    groups = [logs_of(p) for p in args.logs]
    paths = [os.path.join(p, 'log.txt') if os.path.isdir(p) else p for p in args.logs]
    labels = args.labels or [run_label(p) for p in paths]
    if len(labels) != len(paths):
        raise UsageError(f'--labels gives {len(labels)} labels for {len(paths)} logs; give one per log.')
    if len(set(labels)) != len(labels):
        raise UsageError(f'two logs would share a label ({", ".join(labels)}); name them with --labels.')
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(paths[0]))
    check_output_folder('--output_dir', output_dir)
    check_figure_name('--name', args.name)
    check_output_file('--name', os.path.join(output_dir, args.name), 'logs.png')
    records = {log: read_log(log) for group in groups for log in group}
    fields = [field for field, _ in LOG_PANELS]
    for log, lines in records.items():
        if not any(r.get(field) is not None for r in lines for field in fields):
            raise UsageError(f'{log}: none of its {len(lines)} lines has a field to draw ({", ".join(fields)}); '
                             f'{EXPECTED}')
    runs = {label: [records[log] for log in group] if len(group) > 1 else records[group[0]]
            for label, group in zip(labels, groups)}
    path = save_figure(plot_logs(runs, band=args.band), os.path.join(output_dir, args.name), args.dpi)
    for label, group in zip(labels, groups):
        for log in group:
            last = records[log][-1]
            name = f'{label} {os.path.basename(os.path.dirname(log))}' if len(group) > 1 else label
            ap = f', AP {last["AP"]:.3f}' if last.get('AP') is not None else ''
            print(f'{name}: {len(records[log])} epochs, last loss {last.get("train_loss", float("nan")):.3f}{ap}')
    print(f'wrote {path}')
    return path


def logs_of(given):
    """The log.txt files one argument stands for: a file itself; a run folder's log.txt; the log.txt of each seed
    of a sweep entry's folder (warning of seed folders without one). Any other folder is a UsageError that names,
    for a sweep's own folder, the entry folders to pass."""
    if not os.path.isdir(given):
        return [given]
    logs = seed_logs(given)
    if logs:
        without = [os.path.basename(d) for d in seed_folders(given).values() if os.path.join(d, 'log.txt') not in logs]
        if without:
            drawn = ', '.join(os.path.basename(os.path.dirname(log)) for log in logs)
            print(f'warning: {given}: {", ".join(without)} hold(s) no log.txt; drawing {drawn} only.', flush=True)
        return logs
    if os.path.isfile(os.path.join(given, 'log.txt')):
        return [os.path.join(given, 'log.txt')]
    entries = sorted(os.path.join(given, d) for d in os.listdir(given) if os.path.isdir(os.path.join(given, d))
                     and seed_logs(os.path.join(given, d)))
    if entries:
        raise UsageError(f"{given} is a sweep's folder; pass its entry folders, each drawn as the mean of its seeds: "
                         f'{" ".join(entries)}')
    raise UsageError(f'{given} holds no log.txt; {EXPECTED}.')


def main(argv=None):
    run_tool(run, argv)
