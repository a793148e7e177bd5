"""Ablation sweeps (paper Table 6): where each run lives and runs, whether it finished, and the statistics
over seeds that its table shows.

A sweep trains every entry (an --enc_rpe2d string or a config file) with the same seeds, so runs pair up
seed by seed: entry e, seed s lives in output_dir/<entry name>/seed<s>. Its numbers are the 12 COCO stats
of the run's eval.json, counted only when they are of the final epoch.
"""
import json
import math
import os
import subprocess
import sys
import time

from detr_irpe import UsageError
from detr_irpe.irpe import rpe_config_from_string
from detr_irpe.lab.plots import COCO_STATS

# ------------------------------------------------------------------------------------------- runs

# tools/train.py as a module: found in a checkout's install and in a pip-installed package alike (which has no tools/)
TRAIN = ('-m', 'detr_irpe.cli.train')


def run_name(spec):
    """A folder name for one sweep entry: a config file's stem, or the --enc_rpe2d string ('none' if empty)."""
    if spec.endswith(('.yaml', '.yml')):
        return os.path.splitext(os.path.basename(spec))[0]
    return spec or 'none'


def run_dir(output_dir, name, seed):
    return os.path.join(output_dir, name, f'seed{seed}')


def seed_folders(folder):
    """{seed: its run folder} of a sweep entry's folder (output_dir/<entry>), in seed order."""
    names = [d for d in os.listdir(folder) if d.startswith('seed') and d[4:].lstrip('-').isdigit()
             and os.path.isdir(os.path.join(folder, d))]
    return {int(d[4:]): os.path.join(folder, d) for d in sorted(names, key=lambda d: int(d[4:]))}  # the names as found


def seed_logs(folder):
    """The log.txt of every seed of a sweep entry's folder (output_dir/<entry>), in seed order; [] for a
    folder that is not a sweep entry's."""
    return [p for p in (os.path.join(d, 'log.txt') for d in seed_folders(folder).values()) if os.path.isfile(p)]


def describe_run(args):
    """Table 6 columns of a run from its parsed training flags: abs. pos., iRPE, buckets, epochs."""
    config = rpe_config_from_string(args.enc_rpe2d)
    one = None if config is None else (config.rpe_k or config.rpe_q or config.rpe_v)
    if one is None:
        rel, buckets = 'none', '-'
    else:
        side = 2 * one.beta_int + 1
        rel = one.mode + ('-clip' if one.index_func == 'clip' else '')
        buckets = f'{side}x{side}' if one.method == 'product' else f'{side} ({one.method})'
    abs_pos = {'sine': 'sinusoid'}.get(args.position_embedding, args.position_embedding)
    return {'abs. pos.': abs_pos, 'iRPE': rel, 'buckets': buckets, 'epochs': str(args.epochs)}


def final_result(folder, epochs):
    """The 12 COCO stats of a run's eval.json if they are of its final epoch (epochs - 1), else None: an
    evaluation of an earlier epoch, of a run killed before its end, is no result."""
    path = os.path.join(folder, 'eval.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result['bbox'] if result.get('epoch') == epochs - 1 else None


# Flags that may change between starts of one run: where it writes, how it runs, how long it trains
# (train.py --resume continues a finished run to a larger --epochs).
RESTART_FLAGS = ('output_dir', 'config', 'resume', 'eval', 'start_epoch', 'epochs', 'threads', 'num_workers',
                 'device', 'dist_url', 'dist_timeout')


def check_same_run(folder, flags):
    """Refuse to continue the run in `folder` with other flags than it was started with (kept in run.json).
    flags: the run's parsed flags as a dict."""
    path = os.path.join(folder, 'run.json')
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)['flags']
    # Only flags both know: a flag added to train.py since the run started has no value to compare.
    changed = sorted(k for k in set(before) & set(flags) if k not in RESTART_FLAGS and before[k] != flags[k])
    if changed:
        diff = '; '.join(f'--{k} {before[k]!r} then, {flags[k]!r} now' for k in changed)
        raise UsageError(f'{folder} holds a run started with other flags ({diff}); a sweep continues a run only '
                         'with the flags it was started with. Give the sweep another --output_dir, or delete '
                         'that folder.')


# ------------------------------------------------------------------------------------ devices


def visible_gpus(cuda_visible_devices, device_count):
    """The GPU ids a sweep may hand to its runs: the entries of CUDA_VISIBLE_DEVICES when it is set (a child
    process must be given the same names), else 0 .. device_count - 1."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    return [g.strip() for g in cuda_visible_devices.split(',') if g.strip()][:device_count]


def device_slots(gpus, gpus_per_run=1, runs_per_gpu=1):
    """The places runs go: one tuple of GPU ids per run that may be running at a time. Each run gets
    gpus_per_run GPUs of its own; a GPU is shared only when asked (runs_per_gpu > 1). Slots are ordered so
    that the first runs land on different GPUs. No GPUs: no slots (the runs go on the CPU)."""
    if gpus_per_run < 1 or runs_per_gpu < 1:
        raise UsageError(f'--gpus_per_run and --runs_per_gpu must be at least 1, got {gpus_per_run} and '
                         f'{runs_per_gpu}.')
    if gpus and len(gpus) < gpus_per_run:
        raise UsageError(f'--gpus_per_run {gpus_per_run} asks for more GPUs than the {len(gpus)} visible '
                         f'({", ".join(gpus)}); give at most {len(gpus)}.')
    groups = [tuple(gpus[i:i + gpus_per_run]) for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
    return [group for _ in range(runs_per_gpu) for group in groups]


def launch_command(train_argv, slot, port):
    """(command, environment updates) of one run of tools/train.py: on the CPU (slot None) or on the
    GPUs of `slot`, through torchrun when there are several (one process per GPU, its own rendezvous port)."""
    if slot is None:
        return [sys.executable, *TRAIN, *train_argv], {}
    env = {'CUDA_VISIBLE_DEVICES': ','.join(slot)}
    if len(slot) == 1:
        return [sys.executable, *TRAIN, *train_argv], env
    env['TORCH_DISABLE_SHARE_RDZV_TCP_STORE'] = '1'  # restarted workers can hang on a shared store otherwise
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(len(slot)),
            '--master_port', str(port), *TRAIN, *train_argv], env


def run_processes(runs, slots, env=None, base_port=29500):
    """Run each (train_argv, log_path) of `runs`, at most one per slot at a time (slot None: CPU), each
    run's output into its log file; print a line as each starts and ends. Returns the exit codes in order."""
    pending, free = list(range(len(runs))), list(range(len(slots)))
    running, codes = {}, [None] * len(runs)
    while pending or running:
        while pending and free:
            i, s = pending.pop(0), free.pop(0)
            argv, log_path = runs[i]
            command, env_update = launch_command(argv, slots[s], base_port + s)
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            log = open(log_path, 'a')
            where = f' on GPU {",".join(slots[s])}' if slots[s] else ''
            print(f'[{i + 1}/{len(runs)}] started{where}, output in {log_path}', flush=True)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**(env or os.environ),
                                                                                        **env_update})
            running[i] = (proc, log, s, time.time())
        time.sleep(0.2)
        for i, (proc, log, s, started) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[i] = proc.returncode
                state = 'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode}), see {runs[i][1]}'
                print(f'[{i + 1}/{len(runs)}] {state} in {time.time() - started:.0f} s', flush=True)
                free.append(s)
                del running[i]
    return codes


# --------------------------------------------------------------------------------- statistics

INTERVAL = ('mean of the n paired differences (entry minus baseline, seed by seed) [95% t-interval: '
            'mean ± t(0.975, n-1) · sd / √n, sd their sample standard deviation]')


def spread(values):
    """Mean, sample standard deviation (n - 1; None for one value), min and max of a list of numbers."""
    n = len(values)
    if n == 0:
        return {'n': 0, 'mean': None, 'std': None, 'min': None, 'max': None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {'n': n, 'mean': mean, 'std': std, 'min': min(values), 'max': max(values)}


def paired_difference(values, baseline):
    """The mean of the seed-by-seed differences values[s] - baseline[s] over the seeds both have, with its
    95% t-interval (INTERVAL; None below two seeds). values, baseline: {seed: number}."""
    from scipy import stats
    seeds = sorted(set(values) & set(baseline))
    diffs = [values[s] - baseline[s] for s in seeds]
    result = {'seeds': seeds, **{k: v for k, v in spread(diffs).items() if k in ('n', 'mean', 'std')},
              'low': None, 'high': None}
    if len(diffs) > 1:
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * result['std'] / math.sqrt(len(diffs))
        result['low'], result['high'] = result['mean'] - half, result['mean'] + half
    return result


def summarize(entries, seeds, baseline=0):
    """What the sweep table shows, JSON-ready. entries: dicts with 'name', the describe_run() columns and
    'results' {seed: the 12 COCO stats, or None for a run without a final eval.json}; baseline: the index of
    the entry the others are compared with. Stats in % (AP x 100); a stat of -1 (no object of that size)
    counts as missing."""
    def per_metric(entry):
        """{metric: {seed: value in %}} over the finished runs of an entry."""
        return {m: {s: 100 * r[k] for s, r in entry['results'].items() if r is not None and r[k] >= 0}
                for k, m in enumerate(COCO_STATS)}

    base = per_metric(entries[baseline])
    out = {'seeds': list(seeds), 'metrics': list(COCO_STATS), 'baseline': entries[baseline]['name'],
           'interval': INTERVAL, 'entries': []}
    for i, entry in enumerate(entries):
        values = per_metric(entry)
        runs = {str(s): (None if r is None else [100 * v if v >= 0 else None for v in r[:len(COCO_STATS)]])
                for s, r in entry['results'].items()}
        out['entries'].append({
            **{k: v for k, v in entry.items() if k != 'results'},
            'runs': runs, 'finished': sum(r is not None for r in runs.values()),
            'stats': {m: spread([values[m][s] for s in seeds if s in values[m]]) for m in COCO_STATS},
            'vs_baseline': None if i == baseline else {m: paired_difference(values[m], base[m]) for m in COCO_STATS}})
    return out


# ------------------------------------------------------------------------------------------ tables

DESCRIPTION = ('abs. pos.', 'iRPE', 'buckets', 'epochs')


def sweep_table(summary):
    """Markdown table like the paper's Table 6, from summarize(). One seed: one AP per cell. Several: per
    cell mean ± std (min–max) over seeds (std: sample standard deviation), then a table of paired
    differences against the baseline (INTERVAL)."""
    seeds = summary['seeds']
    head = ['#', 'run', *DESCRIPTION] + (['seeds'] if len(seeds) > 1 else []) + list(COCO_STATS)
    lines = _table_head(head)
    for i, entry in enumerate(summary['entries'], 1):
        cells = [str(i), entry['name']] + [entry.get(k, '') for k in DESCRIPTION]
        if len(seeds) > 1:
            cells.append(f'{entry["finished"]}/{len(seeds)}')
        if entry['finished'] == 0:
            cells += ['failed'] + [''] * (len(COCO_STATS) - 1)
        elif len(seeds) == 1:
            cells += ['-' if v is None else f'{v:.1f}' for v in entry['runs'][str(seeds[0])]]
        else:
            cells += [_spread_cell(entry['stats'][m]) for m in COCO_STATS]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if len(seeds) == 1:
        return '\n'.join(lines)
    lines += ['', f'Against {summary["baseline"]}: {summary["interval"]}.', '']
    lines += _table_head(['#', 'run', 'pairs'] + [f'Δ{m}' for m in COCO_STATS])
    for i, entry in enumerate(summary['entries'], 1):
        if entry['vs_baseline'] is None:
            lines.append('| ' + ' | '.join([str(i), entry['name'], '', 'baseline'] + [''] * (len(COCO_STATS) - 1)) + ' |')
            continue
        diffs = [entry['vs_baseline'][m] for m in COCO_STATS]
        cells = [str(i), entry['name'], str(diffs[0]['n'])] + [_difference_cell(d) for d in diffs]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _table_head(head):
    numeric = {'#', 'seeds', 'pairs', *COCO_STATS, *(f'Δ{m}' for m in COCO_STATS)}
    return ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---:' if h in numeric else '---' for h in head) + '|']


def _spread_cell(s):
    if s['n'] == 0:
        return '-'
    if s['n'] == 1:
        return f'{s["mean"]:.1f}'
    return f'{s["mean"]:.1f} ± {s["std"]:.1f} ({s["min"]:.1f}–{s["max"]:.1f})'


def _difference_cell(d):
    if d['n'] == 0:
        return '-'
    if d['low'] is None:
        return f'{d["mean"]:+.1f}'
    return f'{d["mean"]:+.1f} [{d["low"]:+.1f}, {d["high"]:+.1f}]'
