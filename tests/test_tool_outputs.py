"""What the tools write and where: output paths checked before any work, figure formats, pretrain_backbone's
inputs, plot_logs on what is not one run's log (a sweep's folder, a binary file, a cut-off last line)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from detr_irpe import UsageError
from detr_irpe.lab.plots import plot_logs, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name):
    return importlib.import_module(f'detr_irpe.cli.{name}')


def no_work(*args, **kwargs):
    raise AssertionError('the work started before the flags were checked')


def write_log(path, epochs, cut_off=''):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps({'epoch': e, 'train_loss': 5.0 - e, 'test_coco_eval_bbox': [0.1 * e] * 12})
                            + '\n' for e in epochs) + cut_off)
    return str(path)


@pytest.fixture
def places(tmp_path):
    """A folder and a regular file, to give where a file or a folder is expected."""
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'afile').write_text('x')
    return tmp_path / 'folder', tmp_path / 'afile'


# ------------------------------------------------------------------------------- pretrain_backbone

def test_pretrain_backbone_default_output_cannot_replace_the_shipped_weights():
    default = tool('pretrain_backbone').get_parser().get_default('output')
    assert default.split('/')[0] == 'outputs' and not default.startswith('configs')


@pytest.mark.parametrize('flags, needles', [
    (['--images', '4', '--batch_size', '16'], ['--batch_size 16', '--images 4']),
    (['--objects', '0', '0'], ['--objects 0 0', 'MAX']),
    (['--output', '{folder}'], ['--output', 'is a folder', 'synthetic_resnet18.pth']),
    (['--output', '{afile}/x.pth'], ['--output', 'is a file, not a folder']),
])
def test_pretrain_backbone_refuses_bad_input_before_any_work(monkeypatch, places, flags, needles):
    folder, afile = places
    module = tool('pretrain_backbone')
    monkeypatch.setattr(module, 'make_images', no_work)
    argv = [f.format(folder=folder, afile=afile) for f in flags]
    with pytest.raises(UsageError) as e:
        module.run(argv)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_pretrain_backbone_under_10_steps_and_images_without_objects_train(tmp_path, capsys):
    out = tmp_path / 'w' / 'r18.pth'  # its folder is made
    tool('pretrain_backbone').run(['--images', '3', '--batch_size', '3', '--steps', '2', '--image_size', '32',
                                   '--scales', '32', '--objects', '0', '1', '--seed', '3', '--threads', '1',
                                   '--output', str(out)])
    printed = capsys.readouterr().out
    assert out.is_file() and 'offset/size' in printed and 'nan' not in printed, printed


# ------------------------------------------------------------------------------------------ benchmark

@pytest.mark.parametrize('given, needle', [('{folder}', 'is a folder'), ('{afile}/x.json', 'is a file, not a folder')])
def test_benchmark_json_path_is_checked_before_measuring(monkeypatch, places, given, needle):
    folder, afile = places
    module = tool('benchmark')
    monkeypatch.setattr(module, 'run_benchmark', no_work)
    with pytest.raises(UsageError, match=f'--json .*{needle}'):
        module.run(['--json', given.format(folder=folder, afile=afile)])


def test_benchmark_sizes_line_describes_only_the_parts_that_ran():
    from detr_irpe.lab.benchmark import QUICK, describe_sizes
    sizes = {'images': QUICK['images'], 'attention_map': QUICK['attention_map'], 'dc5_image': QUICK['dc5_image'],
             'irpe_k': 'k', 'irpe_qkv': 'qkv', 'repeats': QUICK['repeats'], 'attention_repeats': 5,
             'op_repeats': QUICK['op_repeats'], 'dc5_steps': 2, 'dc5_rounds': 1}
    op_only = describe_sizes({'sizes': sizes, 'rpe_index_vs_gather': {}})
    assert f"rpe_index B=2 H=8 L=950 K=81 (the bucket ids of iRPE-K on 25x38, and random ids), medians of " \
           f"{QUICK['op_repeats']} repeats" in op_only
    assert 'DETR-R50' not in op_only and 'attention layer' not in op_only and 'DC5' not in op_only
    both = describe_sizes({'sizes': sizes, 'model_seconds': {}, 'attention_seconds': {}})
    assert f"medians of {QUICK['repeats']} interleaved" in both and 'medians of 5 interleaved' in both
    assert 'rpe_index' not in both


# ---------------------------------------------------------------------------------- visualize_buckets

@pytest.mark.parametrize('flags, needles', [
    (['--size', '5', '--reference', '10', '10'], ['--reference 10 10', '5x5', '0..4']),
    (['--size', '5', '8', '--reference', '2', '8'], ['--reference 2 8', '5x8', '0..7']),
    (['--name', 'foo'], ['--name', '.png', '.jpg']),
    (['--name', 'foo.txt'], ['--name', '.png', '.jpg']),
    (['--output_dir', '{afile}'], ['--output_dir', 'is a file, not a folder']),
    (['--output_dir', '{folder}', '--name', 'sub.png'], ['--name', 'is a folder']),
])
def test_visualize_buckets_refuses_bad_input_before_drawing(monkeypatch, places, flags, needles):
    folder, afile = places
    (folder / 'sub.png').mkdir()
    module = tool('visualize_buckets')
    monkeypatch.setattr(module, 'plot_bucket_maps', no_work)
    with pytest.raises(UsageError) as e:
        module.run([f.format(folder=folder, afile=afile) for f in flags])
    assert all(n in str(e.value) for n in needles), str(e.value)


@pytest.mark.parametrize('name, fmt', [('maps.jpg', 'JPEG'), ('maps.JPEG', 'JPEG'), ('maps.png', 'PNG')])
def test_visualize_buckets_writes_png_and_jpeg(tmp_path, name, fmt):
    path = tool('visualize_buckets').run(['--size', '3', '--index_func', 'clip', '--dpi', '20', '--name', name,
                                          '--output_dir', str(tmp_path / 'new')])
    with Image.open(path) as im:
        assert im.format == fmt
    assert os.listdir(tmp_path / 'new') == [name]  # no temporary file left


# ------------------------------------------------------------------------------------------ plot_logs

def test_read_log_skips_a_cut_off_last_line_with_a_warning_but_not_a_broken_one_elsewhere(tmp_path, capsys):
    cut = write_log(tmp_path / 'cut' / 'log.txt', [0, 1], cut_off='{"epoch": 2, "train_lo')
    assert [r['epoch'] for r in read_log(cut)] == [0, 1]
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith('warning: ') and 'log.txt:3' in warning[0]
    middle = tmp_path / 'middle.txt'
    middle.write_text('{"epoch": 0}\n{"epoch": 1, "trai\n{"epoch": 2}\n')
    with pytest.raises(UsageError, match='middle.txt:2 is not a JSON line'):
        read_log(str(middle))


def test_plot_logs_of_a_binary_file_is_a_usage_error(tmp_path):
    binary = tmp_path / 'checkpoint.pth'
    binary.write_bytes(b'PK\x03\x04\xff\xfe\x00\x81' * 64)
    with pytest.raises(UsageError, match='checkpoint.pth is not a text file; expected .*log.txt'):
        tool('plot_logs').run([str(binary)])


def test_plot_logs_of_a_sweep_root_names_its_entry_folders(tmp_path):
    for entry in ('none', 'k'):
        write_log(tmp_path / 'sweep' / entry / 'seed0' / 'log.txt', [0, 1])
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'plot_logs.py'), str(tmp_path / 'sweep')],
                         cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT, 'DETR_IRPE_DEBUG': ''},
                         capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), run.stderr
    assert str(tmp_path / 'sweep' / 'k') in lines[0] and str(tmp_path / 'sweep' / 'none') in lines[0]


def test_plot_logs_of_a_folder_without_log_is_a_usage_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UsageError, match=r"empty holds no log.txt; expected .*run folders or a sweep entry"):
        tool('plot_logs').run([str(tmp_path / 'empty')])


def test_plot_logs_warns_of_seed_folders_without_a_log(tmp_path, capsys):
    write_log(tmp_path / 'entry' / 'seed0' / 'log.txt', [0, 1])
    (tmp_path / 'entry' / 'seed1').mkdir()
    tool('plot_logs').run([str(tmp_path / 'entry'), '--dpi', '20'])
    out = capsys.readouterr().out
    assert 'warning: ' in out and 'seed1' in out and 'drawing seed0 only' in out, out


@pytest.mark.parametrize('name', ['x.txt', 'noext'])
def test_plot_logs_refuses_a_name_it_cannot_write_before_reading(monkeypatch, tmp_path, name):
    log = write_log(tmp_path / 'run' / 'log.txt', [0])
    module = tool('plot_logs')
    monkeypatch.setattr(module, 'read_log', no_work)
    with pytest.raises(UsageError, match=r"--name .*\.png, \.jpg, \.jpeg"):
        module.run([log, '--name', name])


def test_plot_logs_writes_a_jpeg(tmp_path):
    log = write_log(tmp_path / 'run' / 'log.txt', [0, 1])
    path = tool('plot_logs').run([log, '--name', 'curves.jpg', '--dpi', '20'])
    with Image.open(path) as im:
        assert im.format == 'JPEG'


def test_single_epoch_plot_has_integer_epoch_ticks():
    fig = plot_logs({'run': [{'epoch': 0, 'train_loss': 1.0, 'AP': 0.2}]})
    for ax in fig.axes[:2]:  # a drawn panel (loss) and one without values (classification loss)
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown), shown
