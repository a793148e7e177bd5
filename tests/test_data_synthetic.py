"""The synthetic shapes dataset: deterministic, cached by settings, read back as COCO."""
import argparse
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import detr_irpe_datasets.build as datasets
from detr_irpe.cli.flags import add_data_args
from detr_irpe_datasets.synthetic import SHAPES, ensure_synthetic_coco

SMALL = dict(num_train=6, num_val=3, image_size=64, num_classes=3, objects=(1, 3), object_size=(0.25, 0.4), seed=5)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_same_seed_gives_byte_identical_datasets(tmp_path):
    a = files(ensure_synthetic_coco(tmp_path / 'a', **SMALL))
    b = files(ensure_synthetic_coco(tmp_path / 'b', **SMALL))
    assert a == b
    assert {'annotations/instances_train2017.json', 'annotations/instances_val2017.json', 'meta.json',
            'train2017/000001.jpg', 'val2017/000003.jpg'} <= set(a)
    c = files(ensure_synthetic_coco(tmp_path / 'c', **{**SMALL, 'seed': 6}))
    assert c['annotations/instances_train2017.json'] != a['annotations/instances_train2017.json']


def test_cache_is_reused_for_same_settings_and_regenerated_for_others(tmp_path):
    root = ensure_synthetic_coco(tmp_path / 's', **SMALL)
    ann = root / 'annotations' / 'instances_train2017.json'
    stamp = ann.stat().st_mtime_ns
    ensure_synthetic_coco(root, **SMALL)
    assert ann.stat().st_mtime_ns == stamp
    ensure_synthetic_coco(root, **{**SMALL, 'num_classes': 5, 'num_train': 4})
    data = json.loads(ann.read_text())
    assert [c['id'] for c in data['categories']] == [1, 2, 3, 4, 5]
    assert len(data['images']) == 4 and len(list((root / 'train2017').iterdir())) == 4


def test_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / 'precious.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='meta.json'):
        ensure_synthetic_coco(tmp_path, **SMALL)
    assert (tmp_path / 'precious.txt').read_text() == 'keep me'


CONCURRENT_READER = """
import json, sys, time
from pathlib import Path
from detr_irpe_datasets.synthetic import ensure_synthetic_coco
root = Path(sys.argv[1])
settings = json.loads(sys.argv[2])
settings['objects'], settings['object_size'] = tuple(settings['objects']), tuple(settings['object_size'])
ensure_synthetic_coco(root, **settings)
end = time.time() + 3
while time.time() < end:  # keep reading, as a training run would, while the other processes start
    for split in ('train', 'val'):
        data = json.loads((root / 'annotations' / f'instances_{split}2017.json').read_text())
        assert all((root / f'{split}2017' / im['file_name']).is_file() for im in data['images'])
"""


def test_processes_making_the_same_folder_at_once_never_pull_it_from_under_each_other(tmp_path):
    import os
    import subprocess
    import sys
    root = tmp_path / 'shared'
    settings = json.dumps({**SMALL, 'num_train': 60})
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, '-c', CONCURRENT_READER, str(root), settings], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert json.loads((root / 'meta.json').read_text())['num_train'] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ['shared', 'shared.lock']  # no stray tmp folders


def test_annotations_follow_the_settings(tmp_path):
    settings = {**SMALL, 'num_train': 30}
    root = ensure_synthetic_coco(tmp_path, **settings)
    data = json.loads((root / 'annotations' / 'instances_train2017.json').read_text())
    assert data['categories'] == [{'id': k + 1, 'name': SHAPES[k], 'supercategory': 'shape'} for k in range(3)]
    per_image = np.bincount([a['image_id'] for a in data['annotations']], minlength=31)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 3
    for a in data['annotations']:
        x, y, w, h = a['bbox']
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        # the box's size sqrt(w h) is 0.25..0.4 of the image side (give or take the pixel grid),
        # its aspect ratio 3/4..4/3
        assert 0.25 * 64 - 1.5 <= (w * h) ** 0.5 <= 0.4 * 64 + 1.5
        assert 0.75 * 0.9 <= w / h <= 1.33 / 0.9
        assert 1 <= a['category_id'] <= 3


def test_boxes_are_tight_around_the_drawn_shapes(tmp_path):
    """Shapes are bright and saturated on a dark background: threshold the pixels and compare boxes."""
    root = ensure_synthetic_coco(tmp_path, **{**SMALL, 'num_train': 20, 'objects': (1, 1)})
    data = json.loads((root / 'annotations' / 'instances_train2017.json').read_text())
    for a in data['annotations']:
        pixels = np.asarray(Image.open(root / 'train2017' / f'{a["image_id"]:06d}.jpg').convert('RGB'), float)
        ys, xs = np.nonzero(pixels.max(axis=2) > 180)
        found = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        np.testing.assert_allclose(found, a['bbox'], atol=2)


def test_build_dataset_reads_synthetic_through_the_coco_loader(tmp_path):
    args = add_data_args(argparse.ArgumentParser()).parse_args(['--dataset_file', 'synthetic', '--synthetic_dir', str(tmp_path / 'syn'),
                              '--synthetic_train', '4', '--synthetic_val', '2', '--synthetic_image_size', '64',
                              '--synthetic_classes', '3', '--val_size', '64', '--val_max_size', '100'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # clean data: no warnings at all
        dataset = datasets.build_dataset('val', args)
        image, target = dataset[0]
    assert len(dataset) == 2 and image.shape == (3, 64, 64)
    assert datasets.num_classes_for(args) == datasets.num_classes_for(dataset) == 4
    data = json.loads((tmp_path / 'syn' / 'annotations' / 'instances_val2017.json').read_text())
    anns = [a for a in data['annotations'] if a['image_id'] == int(target['image_id'])]
    expected = torch.tensor([[(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64] for x, y, w, h in
                             (a['bbox'] for a in anns)], dtype=torch.float32)
    torch.testing.assert_close(target['boxes'], expected)
    assert target['labels'].tolist() == [a['category_id'] for a in anns]


def test_targets_scaled_back_to_original_pixels_score_ap_one(tmp_path):
    """The contract with the post-processing: cxcywh in [0, 1] times orig_size gives the annotation boxes."""
    root = ensure_synthetic_coco(tmp_path, **SMALL)
    dataset = datasets.coco.build('val', root, datasets.make_transforms('val', val_size=100, val_max_size=200))
    evaluator = datasets.CocoEvaluator(datasets.get_coco_api_from_dataset(dataset))
    for _, target in (dataset[i] for i in range(len(dataset))):
        h, w = target['orig_size'].tolist()
        cx, cy, bw, bh = (target['boxes'] * torch.tensor([w, h, w, h])).unbind(1)
        evaluator.update({int(target['image_id']): {
            'scores': torch.ones(len(cx)), 'labels': target['labels'],
            'boxes': torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)}})
    stats = evaluator.summarize()
    assert stats['bbox'][0] == pytest.approx(1.0)
