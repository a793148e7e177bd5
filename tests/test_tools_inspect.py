"""Inspection tools: bucket maps, the iRPE term b_ij, predictions, log plots; and the files they write (sweeps: test_sweep.py)."""
import json
import math
import importlib
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from detr_irpe import UsageError, build_model
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.postprocess import coco_results
from detr_irpe.lab.plots import bucket_map, drawing_scale, irpe_logit_terms, read_log, uniform_reference_positions


def tool(name):
    """The module of tools/<name>.py: its get_parser() and run(argv)."""
    return importlib.import_module(f'detr_irpe.cli.{name}')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')
TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '2', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5',
        '--device', 'cpu', '--num_classes', '4', '--dropout', '0']


def png_size(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == 'PNG'
        return im.size


# ---------------------------------------------------------------------------------- bucket maps

def g(x, ratio):
    """Eq. 18 written out: the piecewise index function (alpha:beta:gamma = 1:2:8 times ratio)."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    if abs(x) <= alpha:
        return round(x)
    far = min(beta, round(alpha + math.log(abs(x) / alpha) / math.log(gamma / alpha) * (beta - alpha)))
    return int(math.copysign(int(far), x))


@pytest.mark.parametrize('reference', [(0, 0), (7, 7), (13, 2)])
@pytest.mark.parametrize('ratio', [1.9, 3.5])
def test_product_bucket_map_is_eq18_on_rows_times_columns(reference, ratio):
    side = 2 * int(2 * ratio) + 1
    got = bucket_map('product', reference, 14, 14, ratio)
    r0, c0 = reference
    for r in range(14):
        for c in range(14):
            expected = (g(r0 - r, ratio) + side // 2) * side + g(c0 - c, ratio) + side // 2
            assert got[r, c] == expected, (r, c)


def test_clip_euclidean_bucket_map_is_clipped_rounded_distance():
    got = bucket_map('euc', (7, 7), 14, 14, ratio=1.9, index_func='clip')
    for r in range(14):
        for c in range(14):
            assert got[r, c] == 3 + min(3, round(math.hypot(7 - r, 7 - c))), (r, c)


def test_bucket_map_reference_outside_the_map_is_refused():
    with pytest.raises(ValueError, match='outside the 14x14 map'):
        bucket_map('product', (14, 0))


def test_reference_positions_are_centres_of_an_n_by_n_grid():
    assert uniform_reference_positions(14, 10, 5) == [(r, c) for r in (1, 4, 7, 9, 12) for c in (1, 3, 5, 7, 9)]
    small = uniform_reference_positions(2, 3, 5)
    assert len(small) == 25 and all(0 <= r < 2 and 0 <= c < 3 for r, c in small)


def test_visualize_buckets_writes_one_png_of_the_grid(tmp_path):
    path = tool('visualize_buckets').run(['--output_dir', str(tmp_path), '--dpi', '50'])
    w, h = png_size(path)
    # 4 columns (piecewise / clip x two references) of 5 method rows; the empty margin is cropped.
    assert 0.8 * 50 * 4 * 3.1 < w <= 50 * 4 * 3.1 + 1 and 0.8 * 50 * 5 * 3.3 < h <= 50 * 5 * 3.3 + 1


# ------------------------------------------------------------------------------------- b_ij

def tiny_model(rpe):
    torch.manual_seed(0)
    model = build_model(get_args_parser().parse_args(TINY + ['--enc_rpe2d', rpe]))[0].eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lookup_table' in name:  # tables start at zero: give them values to find
                p.copy_(torch.randn_like(p))
    return model


def encoder_inputs(model, image):
    """(src, pos, h, w): the first encoder layer's input tokens (L, E) and position encoding, from the
    public pieces of the model."""
    features, mask, pos = model.backbone(image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool))
    src = model.input_proj(features)[0]
    h, w = src.shape[1:]
    return src.flatten(1).T, pos[0].flatten(1).T, h, w


def test_irpe_term_on_keys_is_query_dot_table_entry_of_the_bucket():
    model = tiny_model('rpe-2.0-product-ctx-1-k')
    image = torch.randn(3, 160, 224, generator=torch.Generator().manual_seed(1))
    b, h, w = irpe_logit_terms(model, [image], layer=0)
    src, pos, H, W = encoder_inputs(model, image)
    assert (h, w) == (H, W) == (5, 7) and b.shape == (1, 2, 35, 35)
    attn = model.transformer.encoder.layers[0].self_attn
    E, d = 32, 16
    q = (src + pos) @ attn.in_proj_weight[:E].T + attn.in_proj_bias[:E]
    table = attn.rpe_k.lookup_table_weight[0]  # (d, 81), shared by both heads
    for head in range(2):
        qh = q[:, head * d:(head + 1) * d] * d ** -0.5
        for i in (0, 17, 34):
            for j in range(35):
                (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
                bucket = (g(ri - rj, 2.0) + 4) * 9 + g(ci - cj, 2.0) + 4
                assert b[0, head, i, j].item() == pytest.approx((qh[i] @ table[:, bucket]).item(), abs=1e-5)


def test_irpe_bias_term_on_queries_and_keys_sums_both_tables():
    model = tiny_model('rpe-2.0-product-bias-1-qk')
    b, h, w = irpe_logit_terms(model, [torch.randn(3, 128, 128)], layer=1)
    attn = model.transformer.encoder.layers[1].self_attn
    for i in range(h * w):
        for j in range(h * w):
            (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
            # rpe_q is indexed by (key - query): transposed, its bucket is that of (j, i).
            bk = (g(ri - rj, 2.0) + 4) * 9 + g(ci - cj, 2.0) + 4
            bq = (g(rj - ri, 2.0) + 4) * 9 + g(cj - ci, 2.0) + 4
            expected = attn.rpe_k.lookup_table_bias[0, bk] + attn.rpe_q.lookup_table_bias[0, bq]
            assert b[0, 0, i, j].item() == pytest.approx(expected.item(), abs=1e-6)


def test_model_without_irpe_has_no_term_to_show():
    model = build_model(get_args_parser().parse_args(TINY))[0].eval()
    with pytest.raises(ValueError, match='no iRPE'):
        irpe_logit_terms(model, [torch.randn(3, 64, 64)])
    with pytest.raises(ValueError, match='--layer 5 does not exist'):
        irpe_logit_terms(tiny_model('rpe-2.0-product-ctx-1-k'), [torch.randn(3, 64, 64)], layer=5)


# ------------------------------------------------------------------------------ detections, logs

def test_coco_results_are_xywh_with_python_numbers():
    detections = {'scores': torch.tensor([0.9, 0.2]), 'labels': torch.tensor([3, 1]),
                  'boxes': torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0]])}
    assert coco_results(7, detections, min_score=0.5) == [
        {'image_id': 7, 'category_id': 3, 'bbox': [10.0, 20.0, 40.0, 60.0], 'score': 0.9}]
    assert len(coco_results(7, detections)) == 2


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return str(path)


def record(epoch, loss, ap=None):
    r = {'epoch': epoch, 'train_loss': loss, 'train_loss_ce': loss / 2, 'train_loss_bbox': loss / 4,
         'train_loss_giou': loss / 4, 'train_loss_bbox_unscaled': loss / 20, 'train_loss_giou_unscaled': loss / 8,
         'time': 1.0}
    if ap is not None:
        r['test_coco_eval_bbox'] = [ap, ap + 0.1, ap / 2, 0.0, ap, -1.0] + [0.0] * 6
    return r


def test_read_log_keeps_the_last_record_of_a_resumed_epoch_and_names_the_stats(tmp_path):
    path = write_log(tmp_path / 'run' / 'log.txt', [record(0, 5.0, 0.1), record(1, 4.0), record(1, 3.0, 0.3)])
    records = read_log(path)
    assert [r['epoch'] for r in records] == [0, 1]
    assert records[1]['train_loss'] == 3.0 and records[1]['AP'] == 0.3 and records[1]['AP50'] == pytest.approx(0.4)
    (tmp_path / 'bad.txt').write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(ValueError, match='bad.txt:2'):
        read_log(str(tmp_path / 'bad.txt'))


def test_plot_logs_of_a_missing_path_or_a_file_of_no_log_is_a_usage_error(tmp_path):
    (tmp_path / 'table.json').write_text('[{"entry": "none"},\n {"entry": "k"}]')  # a sweep's table, no JSON lines
    with pytest.raises(UsageError, match=r'table.json:1 is not a JSON line'):
        tool('plot_logs').run([str(tmp_path / 'table.json')])
    with pytest.raises(UsageError, match=r'nope: no such file or folder'):
        tool('plot_logs').run([str(tmp_path / 'nope')])
    # JSON lines of nothing drawn: matplotlib's "number sections must be larger than 0" traceback
    empty = write_log(tmp_path / 'empty' / 'log.txt', [{'epoch': 0}, {'epoch': 1, 'time': 2.0}])
    with pytest.raises(UsageError, match=r'empty/log.txt: none of its 2 lines has a field to draw \(train_loss, '):
        tool('plot_logs').run([empty, '--output_dir', str(tmp_path / 'out')])


def test_plot_logs_of_a_run_without_the_first_panels_field_still_has_a_legend(tmp_path):
    # a log of evaluations only (no train_loss): the legend came from the first panel alone, empty: a traceback
    evals = write_log(tmp_path / 'evals' / 'log.txt', [{'epoch': e, 'test_coco_eval_bbox': [0.1 * e] * 12}
                                                       for e in range(3)])
    path = tool('plot_logs').run([evals, '--output_dir', str(tmp_path / 'out')])
    assert png_size(path)[0] > 600


def test_plot_logs_writes_one_png_for_several_runs(tmp_path, capsys):
    a = write_log(tmp_path / 'detr' / 'log.txt', [record(e, 5.0 - e, 0.1 * e) for e in range(4)])
    b = write_log(tmp_path / 'detr_irpe' / 'log.txt', [record(e, 4.5 - e, 0.12 * e) for e in range(4)])
    path = tool('plot_logs').run([a, str(tmp_path / 'detr_irpe'), '--output_dir', str(tmp_path / 'out')])
    w, h = png_size(path)
    assert w > 600 and h > 300
    out = capsys.readouterr().out
    assert 'detr: 4 epochs' in out and 'detr_irpe: 4 epochs' in out
    with pytest.raises(ValueError, match='2 logs'):
        tool('plot_logs').run([a, b, '--labels', 'one'])


def tool_process(name, *argv):
    """tools/<name>.py run as a user runs it, in a process of its own: the CompletedProcess."""
    env = {**os.environ, 'PYTHONPATH': ROOT}
    env.pop('DETR_IRPE_DEBUG', None)  # it would show the traceback of a usage error
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', f'{name}.py'), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('given, needles', [('nope.png', ['nope.png', 'does not exist', '.png', 'folders']),
                                            ('some.json', ['some.json', 'as an image', '.jpg'])])
def test_predict_on_a_missing_file_or_no_image_is_a_one_line_usage_error(tmp_path, given, needles):
    args = get_args_parser().parse_args(TINY)
    checkpoint = str(tmp_path / 'checkpoint.pth')
    torch.save({'model': build_model(args)[0].state_dict(), 'args': vars(args)}, checkpoint)
    (tmp_path / 'some.json').write_text('{"images": []}')
    run = tool_process('predict', '--resume', checkpoint, str(tmp_path / given), '--output_dir', str(tmp_path / 'out'))
    assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and all(n in lines[0] for n in needles), lines


@pytest.mark.parametrize('name', ['visualize_buckets', 'visualize_rpe', 'predict', 'plot_logs', 'sweep'])
def test_every_tool_has_help_with_an_example(name):
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', f'{name}.py'), '--help'], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f'python tools/{name}.py ' in out.stdout


# ------------------------------------------------------------------ tools on configs/smoke.yaml

@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    """A checkpoint of one epoch on configs/smoke.yaml, with its synthetic data, in a temporary folder."""
    root = tmp_path_factory.mktemp('smoke')
    flags = ['--config', SMOKE, '--output_dir', str(root / 'run'), '--synthetic_dir', str(root / 'data')]
    subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'train.py'), *flags], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    return root, ['--config', SMOKE, '--resume', str(root / 'run' / 'checkpoint.pth'),
                  '--synthetic_dir', str(root / 'data')]


@pytest.mark.slow
def test_predict_writes_labelled_pngs_and_coco_results(smoke_run, tmp_path):
    root, flags = smoke_run
    val = root / 'data' / 'val2017'
    files = sorted(os.listdir(val))
    out = tmp_path / 'predict'
    tool('predict').run(flags + [str(val), '--output_dir', str(out), '--threshold', '0'])
    annotations = json.load(open(root / 'data' / 'annotations' / 'instances_val2017.json'))
    ids = {img['file_name']: img['id'] for img in annotations['images']}
    for name in files:
        with Image.open(val / name) as im:
            w, h = im.size
        s = drawing_scale(w, h)
        assert png_size(out / (os.path.splitext(name)[0] + '.png')) == (w * s, h * s)
    results = json.load(open(out / 'detections.json'))
    assert len(results) == 5 * len(files)  # every query of every image (num_queries 5)
    for r in results:
        assert set(r) == {'image_id', 'category_id', 'bbox', 'score'}
        assert isinstance(r['image_id'], int) and isinstance(r['category_id'], int)
        assert len(r['bbox']) == 4 and all(isinstance(v, float) for v in r['bbox'])
        assert isinstance(r['score'], float) and 0 <= r['score'] <= 1
    assert {r['image_id'] for r in results} == {ids[os.path.basename(f)] for f in files}
    images = json.load(open(out / 'images.json'))
    assert [os.path.basename(i['file_name']) for i in images] == files


@pytest.mark.slow
def test_visualize_rpe_writes_the_grid_of_a_trained_layer(smoke_run, tmp_path):
    root, flags = smoke_run
    image = root / 'data' / 'val2017' / sorted(os.listdir(root / 'data' / 'val2017'))[0]
    path = tool('visualize_rpe').run(flags + ['--image', str(image), '--val_size', '320', '--val_max_size', '480',
                                               '--output_dir', str(tmp_path), '--dpi', '60'])
    assert os.path.basename(path) == f'rpe_{image.stem}_layer0.png'
    w, h = png_size(path)
    assert w > h > 200  # the image beside a 5 x 5 grid of maps
    with pytest.raises(UsageError, match=r'--layer 5 does not exist: the encoder has 1 layers'):
        tool('visualize_rpe').run(flags + ['--image', str(image), '--layer', '5', '--output_dir', str(tmp_path)])


def test_visualize_rpe_takes_only_the_flags_it_uses_and_seeds_its_untrained_model(tmp_path):
    """Training's flags (--lr, --epochs, --amp, ...) would do nothing here: they are no flags of the tool. Without
    --resume the iRPE tables are drawn with --seed (one picture per seed); with --resume the flags of the untrained
    model are refused, as the checkpoint has its weights."""
    parser = tool('visualize_rpe').get_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert not flags & {'--lr', '--epochs', '--amp', '--batch_size', '--compile', '--world_size', '--train_json'}
    assert {'--enc_rpe2d', '--val_size', '--rpe_init', '--backbone_weights', '--seed'} <= flags
    image = tmp_path / 'picture.jpg'
    Image.new('RGB', (96, 64), (120, 60, 30)).save(image)
    tiny = [flag for flag in TINY if flag not in ('--dropout', '0')]
    untrained = tiny + ['--enc_rpe2d', 'rpe-2.0-product-ctx-1-k', '--image', str(image), '--val_size', '128',
                        '--val_max_size', '192', '--dpi', '20']
    pictures = []
    for seed in (1, 1, 2):
        path = tool('visualize_rpe').run(untrained + ['--seed', str(seed), '--output_dir', str(tmp_path / str(len(pictures)))])
        pictures.append(open(path, 'rb').read())
    assert pictures[0] == pictures[1] and pictures[0] != pictures[2]
    for given in (['--rpe_init', 'zero'], ['--seed', '3']):
        with pytest.raises(UsageError, match=f'{given[0]} shape the untrained model built without --resume'):
            tool('visualize_rpe').run(untrained + given + ['--resume', str(image)])
