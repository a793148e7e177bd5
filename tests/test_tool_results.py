"""What the inference tools' results mean: predict numbers and labels its images against the val data asked for
and pads as tools/eval.py does, so both give one model's detections; load_detector gives the size eval resizes
to; tools/export.py keeps no file that computes another model; eval.json says what it scored, and no result of
one run is lost or written over by another. One tiny untrained checkpoint of configs/smoke.yaml serves them all."""
import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe import UsageError, build_model, export, load_detector
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.postprocess import coco_results
from detr_irpe_datasets.build import ensure_synthetic, make_transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')
CPU = ['--device', 'cpu']


def tool(name):
    """The module of tools/<name>.py: its get_parser() and run(argv)."""
    return importlib.import_module(f'detr_irpe.cli.{name}')


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """An untrained configs/smoke.yaml model (val size 64, at most 96) over its synthetic data in root/data, and
    checkpoint(**flags): the path of it saved as tools/train.py saves it (data paths absolute, category names),
    with these flags changed in its args. Class 0, which names no category, never wins (its logit's bias -30):
    predict's labels (the model's categories only) and eval's (every class) are then the same."""
    root = tmp_path_factory.mktemp('results')
    args = parse_args_with_config(get_args_parser(), ['--config', SMOKE, '--num_classes', '4',
                                                      '--synthetic_dir', str(root / 'data')])
    val = ensure_synthetic(args) / 'val2017'
    annotations = json.loads((root / 'data' / 'annotations' / 'instances_val2017.json').read_text())
    names = {c['id']: c['name'] for c in annotations['categories']}
    assert 0 not in names
    torch.manual_seed(0)
    state = build_model(args)[0].state_dict()
    state['class_embed.bias'][0] = -30.0
    made = {}

    def checkpoint(**flags):
        key = repr(sorted(flags.items()))
        if key not in made:
            folder = root / f'run{len(made)}'
            folder.mkdir()
            torch.save({'model': state, 'args': {**vars(args), **flags}, 'category_names': names},
                       folder / 'checkpoint.pth')
            made[key] = str(folder / 'checkpoint.pth')
        return made[key]
    return {'root': root, 'val': val, 'annotations': annotations, 'names': names, 'state': state,
            'checkpoint': checkpoint}


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---- 1: the val data predict numbers and labels its images against ----

def test_predict_refuses_val_data_the_command_line_names_and_cannot_read(smoke, tmp_path):
    # a typo (--coco_path /data/cocoo) numbered the images 1, 2, ... silently: detections.json scored another image
    out = tmp_path / 'out'
    typo = str(tmp_path / 'cocoo')
    with pytest.raises(UsageError, match=f'--coco_path {typo} is not a folder'):
        tool('predict').run(['--resume', smoke['checkpoint'](), str(smoke['val'] / '000001.jpg'), '--coco_path', typo,
                             '--output_dir', str(out)] + CPU)
    assert not (out / 'detections.json').exists()


def test_predict_says_it_leaves_out_the_checkpoints_moved_val_data_and_numbers_from_1(smoke, tmp_path, capsys):
    moved = str(tmp_path / 'coco_moved_since')
    checkpoint = smoke['checkpoint'](dataset_file='coco', coco_path=moved)
    images = [smoke['val'] / '000003.jpg', smoke['val'] / '000001.jpg']
    out = tmp_path / 'out'
    tool('predict').run(['--resume', checkpoint, *map(str, images), '--output_dir', str(out)] + CPU)
    said = capsys.readouterr().out
    line = next(line for line in said.splitlines() if moved in line and 'cannot be read' in line)
    assert 'numbered from 1' in line and "the checkpoint's category names" in line
    assert 'labels are category ids' not in said  # the stored names label them
    assert [img['id'] for img in read_json(out / 'images.json')] == [1, 2]
    labels = {d['category_id'] for d in read_json(out / 'detections.json')}
    assert labels <= set(smoke['names'])


# ---- 2: load_detector's size ----

def test_load_detector_gives_the_size_the_checkpoint_is_evaluated_at_and_predicts_detections(smoke, tmp_path):
    checkpoint = smoke['checkpoint']()
    model, postprocessors = load_detector(checkpoint)
    assert model.size_flags == {'val_size': 64, 'val_max_size': 96}  # configs/smoke.yaml's
    path = smoke['val'] / '000002.jpg'
    tool('predict').run(['--resume', checkpoint, str(path), '--output_dir', str(tmp_path / 'out')] + CPU)
    expected = read_json(tmp_path / 'out' / 'detections.json')
    image = Image.open(path).convert('RGB')
    with torch.no_grad():
        outputs = model([make_transforms('val', **model.size_flags)(image)])
    detections = postprocessors['bbox'](outputs, [(image.height, image.width)])[0]
    got = coco_results(expected[0]['image_id'], detections)
    assert [d['category_id'] for d in got] == [d['category_id'] for d in expected]
    np.testing.assert_allclose([d['score'] for d in got], [d['score'] for d in expected], atol=1e-4)
    np.testing.assert_allclose([d['bbox'] for d in got], [d['bbox'] for d in expected], atol=0.011)


def test_load_detector_of_a_file_without_data_flags_gives_detrs_size(smoke, tmp_path):
    torch.save({'model': smoke['state']}, tmp_path / 'detr.pth')  # a model-zoo file: weights only
    # the heads and the iRPE method: no tensor's shape states them
    model, _ = load_detector(tmp_path / 'detr.pth', nheads=2, enc_rpe2d='rpe-2.0-product-ctx-1-k')
    assert model.size_flags == {'val_size': 800, 'val_max_size': 1333}


# ---- 3: export checks the file it writes ----

def test_an_export_that_disagrees_with_pytorch_fails_and_leaves_the_output_as_it_was(smoke, tmp_path, monkeypatch,
                                                                                        capsys):
    run_exported = export.run_exported

    def off_by_a_hundredth(path, fmt, images, mask):  # a wrong operator: every box moves by 1% of the image
        logits, boxes = run_exported(path, fmt, images, mask)
        return logits, boxes + 0.01
    monkeypatch.setattr(export, 'run_exported', off_by_a_hundredth)
    output = tmp_path / 'detr.pt2'
    output.write_bytes(b'a previous export')
    with pytest.raises(RuntimeError) as e:
        tool('export').run(['--resume', smoke['checkpoint'](), '--output', str(output)])
    # boxes lie in [0, 1]: their bound is 1e-3, and 0.01 (rounded in float32) is beyond it
    assert 'by 1.00e-02 in pred_boxes' in str(e.value) and 'bound 1.0e-03' in str(e.value)
    assert str(output) in str(e.value) and 'not written' in str(e.value)
    assert output.read_bytes() == b'a previous export' and os.listdir(tmp_path) == ['detr.pt2']
    assert 'wrote' not in capsys.readouterr().out


# ---- 4 and 5: eval's files ----

def test_eval_refuses_a_results_json_it_cannot_write_before_any_work(tmp_path):
    (tmp_path / 'runs' / 'eval').mkdir(parents=True)
    missing = str(tmp_path / 'not_read.pth')  # not even the checkpoint is read first
    with pytest.raises(UsageError, match=r"--results_json '.*eval/?' is a folder; give a file name"):
        tool('eval').run(['--resume', missing, '--results_json', str(tmp_path / 'runs' / 'eval') + os.sep,
                          '--output_dir', str(tmp_path / 'out')] + CPU)
    assert not (tmp_path / 'out').exists()


def synthetic_record(smoke, **sizes):
    """What eval.json should record of the smoke data: the synthetic set's parameters, then the sizes."""
    args = parse_args_with_config(get_args_parser(), ['--config', SMOKE])
    data = {k: v for k, v in vars(args).items() if k.startswith('synthetic_') and k not in ('synthetic_dir',
                                                                                              'synthetic_train')}
    return {'dataset_file': 'synthetic', **data, 'val_size': 64, 'val_max_size': 96, 'size_divisibility': 1,
            **sizes}


def test_eval_json_records_its_data_and_is_replaced_only_by_an_evaluation_of_the_same(smoke, tmp_path,
                                                                                          monkeypatch):
    checkpoint = smoke['checkpoint']()
    out = tmp_path / 'eval'
    flags = ['--resume', checkpoint, '--output_dir', str(out), '--num_workers', '0'] + CPU
    tool('eval').run(flags)
    first = read_json(out / 'eval.json')
    assert first['data'] == synthetic_record(smoke)
    before = (out / 'eval.json').read_bytes()
    with pytest.raises(UsageError) as e:
        tool('eval').run(flags + ['--val_size', '48'])
    assert "val_size: 64 there, 48 here" in str(e.value) and 'another --output_dir' in str(e.value)
    assert (out / 'eval.json').read_bytes() == before
    tool('eval').run(flags + ['--synthetic_train', '3'])  # the same val images (the train split's size aside): replaced
    assert read_json(out / 'eval.json')['data'] == first['data']
    # COCO-format data: its files, absolute whatever the command line gave
    monkeypatch.chdir(smoke['root'])
    tool('eval').run(['--resume', checkpoint, '--coco_path', 'data', '--output_dir', str(tmp_path / 'coco'),
                      '--num_workers', '0'] + CPU)
    data = smoke['root'] / 'data'
    assert read_json(tmp_path / 'coco' / 'eval.json')['data'] == {
        'dataset_file': 'coco', 'val_json': str(data / 'annotations' / 'instances_val2017.json'),
        'val_images': str(data / 'val2017'), 'val_size': 64, 'val_max_size': 96, 'size_divisibility': 1}


# ---- 6 and 7: predict's flags and files ----

def test_predict_runs_pytorch_on_the_threads_asked_for(smoke, tmp_path):
    threads = torch.get_num_threads()
    asked = 1 if threads != 1 else 2
    try:
        tool('predict').run(['--resume', smoke['checkpoint'](), str(smoke['val'] / '000001.jpg'),
                             '--threads', str(asked), '--output_dir', str(tmp_path / 'out')] + CPU)
        assert torch.get_num_threads() == asked
    finally:
        torch.set_num_threads(threads)


def test_predict_refuses_to_write_a_picture_over_an_input_image(smoke, tmp_path):
    images = tmp_path / 'imgs'
    images.mkdir()
    Image.open(smoke['val'] / '000001.jpg').save(images / 'street.png')
    shutil.copy(smoke['val'] / '000002.jpg', images / 'park.jpg')  # its picture park.png is no input
    original = (images / 'street.png').read_bytes()
    with pytest.raises(UsageError) as e:
        tool('predict').run(['--resume', smoke['checkpoint'](), str(images), '--output_dir', str(images)] + CPU)
    assert str(images / 'street.png') in str(e.value) and 'another --output_dir' in str(e.value)
    assert (images / 'street.png').read_bytes() == original
    assert sorted(os.listdir(images)) == ['park.jpg', 'street.png']  # nothing written, park.png neither


# ---- 8: predict's detections are eval's ----

def test_predict_pads_as_the_checkpoints_run_and_gives_evals_detections(smoke, tmp_path):
    # --size_divisibility 128 pads the 64 x 64 val images to 128 x 128: other features at the borders
    checkpoint = smoke['checkpoint'](size_divisibility=128)
    results = tmp_path / 'eval' / 'detections.json'
    tool('eval').run(['--resume', checkpoint, '--output_dir', str(tmp_path / 'eval'), '--results_json', str(results),
                      '--num_workers', '0'] + CPU)
    images = [smoke['val'] / '000002.jpg', smoke['val'] / '000005.jpg']
    tool('predict').run(['--resume', checkpoint, *map(str, images), '--output_dir', str(tmp_path / 'out')] + CPU)
    def by_image(detections):  # sorted is stable: each image's detections stay in query order
        return sorted(detections, key=lambda d: d['image_id'])
    predicted = by_image(read_json(tmp_path / 'out' / 'detections.json'))
    ids = {img['id'] for img in read_json(tmp_path / 'out' / 'images.json')}
    evaluated = by_image(d for d in read_json(results) if d['image_id'] in ids)
    assert len(ids) == 2 and len(predicted) == len(evaluated) == 2 * 5  # every query of each image, in query order
    assert [(d['image_id'], d['category_id']) for d in predicted] == [(d['image_id'], d['category_id'])
                                                                      for d in evaluated]
    # predict's file rounds scores to 1e-4 and boxes to 0.01 px
    np.testing.assert_allclose([d['score'] for d in predicted], [d['score'] for d in evaluated], atol=5e-5 + 1e-6)
    np.testing.assert_allclose([d['bbox'] for d in predicted], [d['bbox'] for d in evaluated], atol=5e-3 + 1e-4)
