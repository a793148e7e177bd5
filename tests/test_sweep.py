"""Ablations: the Table 6 presets against the paper's text, and tools/sweep.py's seeds, statistics, device
slots and restarts."""
import glob
import json
import importlib
import os
import re
import statistics
import sys

import pytest
from scipy import stats

from detr_irpe import UsageError
from detr_irpe.lab import plots, sweep
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.irpe import rpe_config_from_string
from detr_irpe.lab.sweep import device_slots, launch_command, visible_gpus


def tool(name):
    """The module of tools/<name>.py: its get_parser() and run(argv)."""
    return importlib.import_module(f'detr_irpe.cli.{name}')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')


# ------------------------------------------------------------------------------- Table 6 presets

def load_preset(path):
    """The flags tools/train.py runs with for `--config path` (the real loader and parser)."""
    return parse_args_with_config(get_args_parser(), ['--config', path])


@pytest.fixture(scope='module')
def table6():
    """{row number: parsed flags} of every configs/table6/rowN_*.yaml."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(ROOT, 'configs', 'table6', '*.yaml'))):
        match = re.match(r'row(\d+)_', os.path.basename(path))
        assert match, f'{path}: a Table 6 preset is named rowN_....yaml'
        assert int(match.group(1)) not in rows, f'two presets for row {match.group(1)}'
        rows[int(match.group(1))] = load_preset(path)
    return rows


def irpe_on_keys(args):
    """The one iRPE setting of a preset (asserting it is on keys only), or None without iRPE."""
    config = rpe_config_from_string(args.enc_rpe2d)
    if config is None:
        return None
    assert config.rpe_q is None and config.rpe_v is None and config.rpe_k is not None, args.enc_rpe2d
    return config.rpe_k


def differing_flags(a, b):
    return {k for k in vars(a) if k not in ('output_dir', 'config') and getattr(a, k) != getattr(b, k)}


def test_table6_has_one_preset_per_row_one_to_nine(table6):
    assert sorted(table6) == list(range(1, 10))


def test_table6_rows_1_and_8_are_plain_detr_at_150_and_300_epochs(table6):
    for row, epochs in ((1, 150), (8, 300)):
        assert table6[row].enc_rpe2d == '' and table6[row].position_embedding == 'sine'
        assert table6[row].epochs == epochs


def test_table6_rows_6_and_9_are_the_model_zoo_irpe_models(table6):
    zoo_150 = {1.9: 7, 2.0: 9}  # rpe-1.9 (7x7) and rpe-2.0 (9x9) are the zoo's 150-epoch files
    for row, epochs, ratios in ((6, 150, zoo_150), (9, 300, {2.0: 9})):
        rpe = irpe_on_keys(table6[row])
        assert (rpe.method, rpe.mode, rpe.shared_head, rpe.index_func) == ('product', 'contextual', True, 'piecewise')
        assert rpe.ratio in ratios and 2 * rpe.beta_int + 1 == ratios[rpe.ratio]
        assert table6[row].position_embedding == 'sine' and table6[row].epochs == epochs
    # "#1,6 and #8,9": each pair differs in iRPE alone, so the 1.3 / 1.7 AP are iRPE's
    assert differing_flags(table6[1], table6[6]) == {'enc_rpe2d'}
    assert differing_flags(table6[8], table6[9]) == {'enc_rpe2d'}


def test_table6_row5_is_row6_with_the_clip_index_function(table6):
    clip, piecewise = irpe_on_keys(table6[5]), irpe_on_keys(table6[6])
    assert clip.index_func == 'clip' and piecewise.index_func == 'piecewise'
    assert {**vars(clip), 'index_func': None} == {**vars(piecewise), 'index_func': None}
    assert differing_flags(table6[5], table6[6]) == {'enc_rpe2d'}


def test_table6_row2_has_no_position_encoding_and_row4_relative_only(table6):
    assert table6[2].position_embedding == 'none' and irpe_on_keys(table6[2]) is None
    assert table6[4].position_embedding == 'none' and irpe_on_keys(table6[4]) is not None
    assert differing_flags(table6[1], table6[2]) == {'position_embedding'}


def test_table6_150_epoch_rows_share_the_recipe_and_only_position_flags_differ(table6):
    position_flags = {'enc_rpe2d', 'position_embedding'}
    for row in (1, 2, 3, 4, 5, 6, 7):
        assert table6[row].epochs == 150 and table6[row].lr_drop == 100
        assert differing_flags(table6[1], table6[row]) <= position_flags
    assert differing_flags(table6[1], table6[8]) == {'epochs', 'lr_drop'}


def test_table6_presets_say_whether_the_papers_text_fixes_their_row():
    for path in sorted(glob.glob(os.path.join(ROOT, 'configs', 'table6', '*.yaml'))):
        row = int(re.match(r'row(\d+)_', os.path.basename(path)).group(1))
        head = open(path).read().split('\ndataset_file')[0]
        # rows 3 and 7 are not named in the text: their comment must say so, and why the choice
        assert ('NOT fixed by the paper' in head) == (row in (3, 7)), path
        assert ('Fixed by the paper' in head) == (row not in (3, 7)), path
        assert ('inferred' in head) or row not in (3, 7), path


# ------------------------------------------------------------------------------- where runs go

def test_visible_gpus_are_named_as_cuda_visible_devices_names_them():
    assert visible_gpus(None, 3) == ['0', '1', '2']
    assert visible_gpus('4,6', 2) == ['4', '6']  # a child must get '6', not '1'
    assert visible_gpus('', 0) == [] and visible_gpus(None, 0) == []


@pytest.mark.parametrize('n_gpus', [1, 2, 3, 4, 8])
@pytest.mark.parametrize('gpus_per_run', [1, 2, 3])
@pytest.mark.parametrize('runs_per_gpu', [1, 2])
def test_device_slots_give_every_run_its_own_gpus_unless_sharing_is_asked(n_gpus, gpus_per_run, runs_per_gpu):
    gpus = [str(g) for g in range(10, 10 + n_gpus)]
    if gpus_per_run > n_gpus:
        with pytest.raises(ValueError, match=f'--gpus_per_run {gpus_per_run}'):
            device_slots(gpus, gpus_per_run, runs_per_gpu)
        return
    slots = device_slots(gpus, gpus_per_run, runs_per_gpu)
    assert len(slots) == (n_gpus // gpus_per_run) * runs_per_gpu
    for slot in slots:
        assert len(slot) == gpus_per_run == len(set(slot)) and set(slot) <= set(gpus)
    for g in gpus:  # at most runs_per_gpu runs at a time on any GPU
        assert sum(g in slot for slot in slots) in ((0, runs_per_gpu) if n_gpus % gpus_per_run else (runs_per_gpu,))
    first = [g for slot in slots[:n_gpus // gpus_per_run] for g in slot]
    assert len(first) == len(set(first))  # the first runs land on different GPUs
    assert device_slots([], gpus_per_run, runs_per_gpu) == []


def test_launch_command_sets_the_gpus_of_its_slot_and_uses_torchrun_for_several():
    argv = ['--config', 'c.yaml', '--seed', '7']
    command, env = launch_command(argv, None, 29500)
    assert command == [sys.executable, '-m', 'detr_irpe.cli.train', *argv] and env == {}
    command, env = launch_command(argv, ('5',), 29500)
    assert env == {'CUDA_VISIBLE_DEVICES': '5'} and 'torch.distributed.run' not in command
    command, env = launch_command(argv, ('2', '3'), 29501)
    assert env == {'CUDA_VISIBLE_DEVICES': '2,3', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    assert command[1:7] == ['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29501']
    assert command[7:] == ['-m', 'detr_irpe.cli.train', *argv]


def test_run_processes_never_runs_two_processes_on_one_slot_at_once(tmp_path, monkeypatch):
    """Stand-in runs write their GPUs and start / end times; no two overlapping runs may share a GPU."""
    script = ('import os, sys, time; t = time.time(); time.sleep(0.3); '
              'print(os.environ.get("CUDA_VISIBLE_DEVICES", "cpu"), t, time.time(), sys.argv[1])')
    real = sweep.launch_command
    monkeypatch.setattr(sweep, 'launch_command',
                        lambda argv, slot, port: ([sys.executable, '-c', script, argv[0]], real(argv, slot, port)[1]))
    runs = [([str(i)], str(tmp_path / f'{i}.out')) for i in range(7)]
    slots = device_slots(['0', '1', '2', '3'], gpus_per_run=2)
    assert sweep.run_processes(runs, slots) == [0] * 7
    spans = []
    for i in range(7):
        gpus, start, end, name = open(tmp_path / f'{i}.out').read().split()
        assert name == str(i)
        spans.append((set(gpus.split(',')), float(start), float(end)))
    assert all(len(gpus) == 2 for gpus, _, _ in spans)
    for a, (gpus_a, start_a, end_a) in enumerate(spans):
        for gpus_b, start_b, end_b in spans[a + 1:]:
            if start_a < end_b and start_b < end_a:  # overlapping in time
                assert not gpus_a & gpus_b



def test_sweep_refuses_an_unknown_baseline_and_gpus_per_run_on_the_cpu_before_training(tmp_path, capsys):
    flags = ['--config', SMOKE, 'none', 'rpe-2.0-product-ctx-1-k', '--output_dir', str(tmp_path)]
    # an entry's flag mistake names the entry, in one line: no usage of tools/train.py as if it were the sweep's
    with pytest.raises(ValueError, match="entry 'rpe-2.0-productt-ctx-1-k': argument --enc_rpe2d: .*'productt'"):
        tool('sweep').run(['--config', SMOKE, 'none', 'rpe-2.0-productt-ctx-1-k', '--output_dir', str(tmp_path)])
    with pytest.raises(ValueError, match="entry 'none': argument --epochs: expected an integer >= 0, got 'x'"):
        tool('sweep').run(flags + ['--epochs', 'x'])
    assert 'usage' not in capsys.readouterr().err
    with pytest.raises(ValueError, match="--baseline 'rpe-2.0-product-bias-1-k' is none of the entries"):
        tool('sweep').run(flags + ['--baseline', 'rpe-2.0-product-bias-1-k'])
    with pytest.raises(ValueError, match='--gpus_per_run 2 needs runs on GPUs, but they run on cpu'):
        tool('sweep').run(flags + ['--gpus_per_run', '2'])
    assert not any('train.out' in files for _, _, files in os.walk(tmp_path))  # nothing was started

# ------------------------------------------------------------------------------- statistics

ENTRIES = ['none', 'rpe-2.0-product-bias-1-k', 'rpe-2.0-product-ctx-1-k']


def write_eval(folder, bbox, epoch):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'eval.json'), 'w') as f:
        json.dump({'bbox': bbox, 'epoch': epoch}, f)


def direct_statistics(output_dir, entries, seeds, epochs, baseline):
    """Per entry and stat: the values (in %) over seeds of the final eval.json files, their mean, sample
    std, min and max; and the paired differences against `baseline` with scipy's paired t-test interval."""
    def values(entry):
        out = {}
        for s in seeds:
            path = os.path.join(output_dir, entry, f'seed{s}', 'eval.json')
            result = json.load(open(path)) if os.path.exists(path) else None
            if result and result['epoch'] == epochs - 1:
                out[s] = result['bbox']
        return out
    base = values(baseline)
    table = {}
    for entry in entries:
        runs = values(entry)
        for k, metric in enumerate(['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']):
            xs = [100 * runs[s][k] for s in seeds if s in runs and runs[s][k] >= 0]
            row = {'n': len(xs)}
            if len(xs) > 1:
                row.update(mean=statistics.mean(xs), std=statistics.stdev(xs), min=min(xs), max=max(xs))
            pairs = [s for s in seeds if s in runs and s in base and runs[s][k] >= 0 and base[s][k] >= 0]
            if entry != baseline and len(pairs) > 1:
                a, b = [100 * runs[s][k] for s in pairs], [100 * base[s][k] for s in pairs]
                ci = stats.ttest_rel(a, b).confidence_interval(0.95)
                row.update(diff=statistics.mean(a) - statistics.mean(b), low=ci.low, high=ci.high, pairs=len(pairs))
            table[entry, metric] = row
    return table


def test_sweep_table_over_seeds_matches_a_direct_computation_from_eval_json(tmp_path):
    seeds, rng = [42, 43, 44], __import__('random').Random(0)
    for e, entry in enumerate(ENTRIES):
        for s in seeds:
            bbox = [round(rng.uniform(0.1, 0.5) + 0.02 * e, 4) for _ in range(5)] + [-1.0] + [0.3] * 6
            write_eval(tmp_path / entry / f'seed{s}', bbox, epoch=0)
    os.remove(tmp_path / ENTRIES[2] / 'seed43' / 'eval.json')                      # a failed run
    write_eval(tmp_path / ENTRIES[1] / 'seed44', [0.9] * 12, epoch=3)              # not of the final epoch
    argv = ['--config', SMOKE, *ENTRIES, '--seeds', '3', '--baseline', ENTRIES[1], '--table_only',
            '--output_dir', str(tmp_path)]
    with pytest.raises(UsageError, match='2 of 9 runs have no eval.json of their final epoch'):
        tool('sweep').run(argv)
    summary = json.load(open(tmp_path / 'table.json'))
    table = (tmp_path / 'table.md').read_text().splitlines()
    direct = direct_statistics(str(tmp_path), ENTRIES, seeds, epochs=1, baseline=ENTRIES[1])
    assert summary['seeds'] == seeds and summary['baseline'] == ENTRIES[1]
    for i, entry in enumerate(summary['entries']):
        name = ENTRIES[i]
        assert entry['name'] == name and entry['finished'] == (2 if i else 3)
        row = next(line for line in table if line.startswith(f'| {i + 1} | {name} | ') and '±' in line)
        cells = [c.strip() for c in row.strip('|').split('|')]
        for k, metric in enumerate(summary['metrics']):
            want, got = direct[name, metric], entry['stats'][metric]
            assert got['n'] == want['n']
            if want['n'] > 1:
                for key in ('mean', 'std', 'min', 'max'):
                    assert got[key] == pytest.approx(want[key], abs=1e-9)
                assert cells[7 + k] == f'{want["mean"]:.1f} ± {want["std"]:.1f} ({want["min"]:.1f}–{want["max"]:.1f})'
            else:
                assert cells[7 + k] == '-'
            if 'diff' in want:
                d = entry['vs_baseline'][metric]
                assert (d['n'], d['mean'], d['low'], d['high']) == pytest.approx(
                    (want['pairs'], want['diff'], want['low'], want['high']), abs=1e-9)
        assert (entry['vs_baseline'] is None) == (name == ENTRIES[1])
    # the differences table: the ctx entry pairs with the baseline on seed 42 only (43 failed, 44 stale)
    ctx = next(line for line in table if line.startswith(f'| 3 | {ENTRIES[2]} | ') and '±' not in line)
    cells = [c.strip() for c in ctx.strip('|').split('|')]
    assert cells[2] == '1' and '[' not in cells[3]  # one pair: a difference, no interval
    none = next(line for line in table if line.startswith('| 1 | none | ') and '±' not in line)
    d = direct['none', 'AP']
    assert [c.strip() for c in none.strip('|').split('|')][3] == f'{d["diff"]:+.1f} [{d["low"]:+.1f}, {d["high"]:+.1f}]'


def test_table_only_refuses_an_entry_without_runs_and_names_the_seeds_it_leaves_out(tmp_path, capsys):
    for entry in ENTRIES[:2]:
        for s in (42, 43):
            write_eval(tmp_path / entry / f'seed{s}', [0.3] * 12, epoch=0)
    argv = ['--config', SMOKE, '--table_only', '--output_dir', str(tmp_path)]
    tool('sweep').run(argv + ENTRIES[:2] + ['--seeds', '2'])
    table = (tmp_path / 'table.md').read_text()
    # a mistyped entry, or another --output_dir: refused before the table is rewritten with failed rows
    with pytest.raises(UsageError, match=f"no runs of {ENTRIES[2]} in .*entries there: {ENTRIES[0]}, {ENTRIES[1]}"):
        tool('sweep').run(argv + [ENTRIES[0], ENTRIES[2], '--seeds', '2'])
    with pytest.raises(UsageError, match=r'no runs of none, .* \(entries there: none\)'):
        tool('sweep').run(['--config', SMOKE, '--table_only', '--output_dir', str(tmp_path / 'typo'), *ENTRIES[:2]])
    assert (tmp_path / 'table.md').read_text() == table and not (tmp_path / 'typo').exists()
    capsys.readouterr()
    tool('sweep').run(argv + ENTRIES[:2])  # one seed of two
    out = capsys.readouterr().out
    assert f"{tmp_path / 'none'} also holds seeds 43, which --seed 42 --seeds 1 leaves out" in out


def test_one_seed_keeps_the_table_of_one_ap_per_cell():
    entries = [{'name': 'none', 'abs. pos.': 'sinusoid', 'iRPE': 'none', 'buckets': '-', 'epochs': '150',
                'results': {42: [0.396, 0.6, 0.4, 0.2, 0.43, -1.0] + [0.0] * 6}},
               {'name': 'rpe-2.0-product-ctx-1-k', 'abs. pos.': 'sinusoid', 'iRPE': 'contextual', 'buckets': '9x9',
                'epochs': '150', 'results': {42: None}}]
    assert sweep.sweep_table(sweep.summarize(entries, [42])).splitlines() == [
        '| # | run | abs. pos. | iRPE | buckets | epochs | AP | AP50 | AP75 | APs | APm | APl |',
        '|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|',
        '| 1 | none | sinusoid | none | - | 150 | 39.6 | 60.0 | 40.0 | 20.0 | 43.0 | - |',
        '| 2 | rpe-2.0-product-ctx-1-k | sinusoid | contextual | 9x9 | 150 | failed |  |  |  |  |  |']


# ------------------------------------------------------------------------- a real sweep, restarted

def test_a_restart_resumes_training_finishes_a_last_epoch_cut_before_its_log_line_or_only_evaluates(tmp_path):
    from detr_irpe.checkpoint import save_checkpoint
    resume_flags = tool('sweep').resume_flags
    path = str(tmp_path / 'checkpoint.pth')
    assert resume_flags(str(tmp_path), 2) == []  # nothing to resume: a new run
    save_checkpoint({'epoch': 1, 'step': 3, 'epoch_log': None}, path)  # mid-epoch
    assert resume_flags(str(tmp_path), 2) == ['--resume', path]
    save_checkpoint({'epoch': 1, 'step': None, 'epoch_log': {'epoch': 1}}, path)  # the last epoch's end
    assert resume_flags(str(tmp_path), 2) == ['--resume', path]  # no log line yet: train.py evaluates and writes it
    with open(tmp_path / 'log.txt', 'w') as f:
        f.write(json.dumps({'epoch': 0}) + '\n' + json.dumps({'epoch': 1}) + '\n')
    assert resume_flags(str(tmp_path), 2) == ['--resume', path, '--eval', '--start_epoch', '2']  # eval.json only
    with pytest.raises(UsageError, match='has trained 2 epochs, more than the --epochs 1'):
        resume_flags(str(tmp_path), 1)


@pytest.mark.slow
def test_sweep_of_two_entries_two_seeds_trains_pairs_and_a_restart_trains_nothing_again(tmp_path, capsys):
    out = tmp_path / 'sweep'
    argv = ['--config', SMOKE, 'none', 'rpe-2.0-product-bias-1-k', '--seeds', '2', '--parallel', '4', '--threads',
            '1', '--output_dir', str(out), '--synthetic_dir', str(tmp_path / 'data')]
    table = tool('sweep').run(argv)
    assert table == (out / 'table.md').read_text().strip()
    folders = [out / e / f'seed{s}' for e in ENTRIES[:2] for s in (42, 43)]
    for folder in folders:  # each run trained with its own seed, to the end
        assert json.load(open(folder / 'run.json'))['flags']['seed'] == int(folder.name[4:])
        assert json.load(open(folder / 'eval.json'))['epoch'] == 0
    summary = json.load(open(out / 'table.json'))
    direct = direct_statistics(str(out), ENTRIES[:2], [42, 43], epochs=1, baseline='none')
    for entry in summary['entries']:
        for metric in summary['metrics']:
            want = direct[entry['name'], metric]
            assert entry['stats'][metric]['n'] == want['n']
            if want['n'] > 1:
                assert entry['stats'][metric]['mean'] == pytest.approx(want['mean'], abs=1e-9)
                assert entry['stats'][metric]['std'] == pytest.approx(want['std'], abs=1e-9)
            if 'diff' in want:
                assert entry['vs_baseline'][metric]['mean'] == pytest.approx(want['diff'], abs=1e-9)
    capsys.readouterr()

    # Started again: every run finished, nothing is trained (the checkpoints stay as they were).
    stamps = {f: os.path.getmtime(f / 'checkpoint.pth') for f in folders}
    evaluated = json.load(open(folders[1] / 'eval.json'))['bbox']
    os.remove(folders[1] / 'eval.json')  # killed during its final evaluation: only that is done again
    assert tool('sweep').run(argv) == table
    printed = capsys.readouterr().out
    assert printed.count('skipped') == 3 and printed.count('started') == 1
    assert {f: os.path.getmtime(f / 'checkpoint.pth') for f in folders} == stamps
    again = json.load(open(folders[1] / 'eval.json'))
    assert again['epoch'] == 0 and again['bbox'] == evaluated  # the final checkpoint, evaluated

    # The same folders with another recipe: refused before anything runs.
    with pytest.raises(ValueError, match='--lr 0.0001 then, 0.0003 now'):
        tool('sweep').run(argv + ['--lr', '3e-4'])

    # A longer budget: a run continues from its checkpoint, the epoch it had is not trained again.
    first_epoch = open(folders[0] / 'log.txt').readline()
    tool('sweep').run(argv[:2] + ['none', '--seeds', '1', '--epochs', '2'] + argv[6:])
    assert 'resumed from' in (folders[0] / 'train.out').read_text()
    lines = open(folders[0] / 'log.txt').read().splitlines()
    assert [json.loads(line)['epoch'] for line in lines] == [0, 1] and lines[0] + '\n' == first_epoch
    assert json.load(open(folders[0] / 'eval.json'))['epoch'] == 1


# ------------------------------------------------------------------------- curves over seeds

def write_seed_log(path, losses, aps):
    """A log.txt of tools/train.py: one record per epoch with train_loss and the COCO stats."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for epoch, (loss, ap) in enumerate(zip(losses, aps)):
            f.write(json.dumps({'epoch': epoch, 'train_loss': loss, 'test_coco_eval_bbox': [ap, 2 * ap] + [0.0] * 10})
                    + '\n')


@pytest.mark.parametrize('band', ['minmax', 'std'])
def test_plot_logs_draws_a_sweep_entry_as_the_mean_of_its_seeds_with_a_band(tmp_path, capsys, band):
    losses = {42: [5.0, 4.0, 3.5], 43: [5.5, 3.0, 2.5], 44: [6.0, 4.5]}  # seed 44 stopped after 2 epochs
    aps = {42: [0.1, 0.2, 0.3], 43: [0.0, 0.3, 0.4], 44: [0.2, 0.1]}
    for s in losses:
        write_seed_log(str(tmp_path / 'sweep' / 'ctx' / f'seed{s}' / 'log.txt'), losses[s], aps[s])
    write_seed_log(str(tmp_path / 'single' / 'log.txt'), [4.0, 3.0, 2.0], [0.1, 0.1, 0.1])
    captured = {}
    real_plot_logs = plots.plot_logs

    def keep(runs, **kwargs):
        captured['fig'] = fig = real_plot_logs(runs, **kwargs)
        captured['axes'] = {ax.get_title(): ax for ax in fig.axes}
        return fig
    module = tool('plot_logs')
    module.plot_logs = keep
    path = module.run([str(tmp_path / 'sweep' / 'ctx'), str(tmp_path / 'single'), '--band', band,
                        '--output_dir', str(tmp_path / 'out')])
    assert os.path.getsize(path) > 0
    out = capsys.readouterr().out
    assert 'ctx seed42: 3 epochs' in out and 'ctx seed44: 2 epochs' in out and 'single: 3 epochs' in out
    for title, values in (('loss', losses), ('AP (val)', aps)):
        ax = captured['axes'][title]
        mean_line, single_line = ax.get_lines()
        epochs = [0, 1]  # the epochs every seed has
        columns = [[values[s][e] for s in (42, 43, 44)] for e in epochs]
        assert list(mean_line.get_xdata()) == epochs and list(single_line.get_xdata()) == [0, 1, 2]
        assert list(mean_line.get_ydata()) == pytest.approx([statistics.mean(c) for c in columns])
        if band == 'minmax':
            low, high = [min(c) for c in columns], [max(c) for c in columns]
        else:
            low = [statistics.mean(c) - statistics.stdev(c) for c in columns]
            high = [statistics.mean(c) + statistics.stdev(c) for c in columns]
        (polygon,) = ax.collections  # one band: the single run has none
        ys = polygon.get_paths()[0].vertices[:, 1]
        assert min(ys) == pytest.approx(min(low)) and max(ys) == pytest.approx(max(high))
        for e in epochs:  # the band's edges at each epoch
            at = sorted(y for x, y in polygon.get_paths()[0].vertices if x == e)
            assert at[0] == pytest.approx(low[e]) and at[-1] == pytest.approx(high[e])
    assert 'ctx (mean of 3 seeds' in captured['axes']['loss'].get_lines()[0].get_label()


def test_plot_logs_draws_one_evaluated_epoch_of_several_seeds_as_an_error_bar_from_min_to_max():
    seeds = [[{'epoch': 0, 'train_loss': 2.0}, {'epoch': 1, 'train_loss': 1.0, 'AP': ap}] for ap in (0.1, 0.4, 0.25)]
    fig = plots.plot_logs({'ctx': seeds}, panels=(('AP', 'AP'),))
    (bar,) = [c for c in fig.axes[0].collections]
    (segment,) = bar.get_segments()
    assert segment[:, 0].tolist() == [1, 1] and sorted(segment[:, 1].tolist()) == pytest.approx([0.1, 0.4])
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == pytest.approx([0.25])
