"""Corrupted annotation files get a clear answer: the run stops with a message naming the file (and, for
invalid JSON, the line and column), or the bad entry is skipped with a warning naming the file, the image or
annotation id and the field, and a count at the end. Never a traceback or a message from inside torch.

The corruptions are generated from a valid file: each field of an image, an annotation and a category
removed, or given each wrong type; the bbox malformed; the JSON cut short at several places; an image or an
annotation listed twice; an annotation pointing at a missing image or category. What must stop and what
must be skipped is the policy of datasets/validate.py, restated here as REQUIRED / STOPS.
"""
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError
from detr_irpe_datasets import coco, validate
from detr_irpe_datasets.transforms import make_transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = [{'id': 7, 'file_name': 'a.jpg', 'width': 40, 'height': 30},
          {'id': 9, 'file_name': 'b.jpg', 'width': 32, 'height': 32},
          {'id': 12, 'file_name': 'c.jpg', 'width': 48, 'height': 36}]
CATEGORIES = [{'id': 1, 'name': 'one'}, {'id': 3, 'name': 'three'}]
ANNOTATIONS = [{'id': 101, 'image_id': 7, 'category_id': 1, 'bbox': [2, 3, 10, 8], 'area': 80, 'iscrowd': 0},
               {'id': 102, 'image_id': 7, 'category_id': 3, 'bbox': [20, 5, 12, 12], 'area': 144, 'iscrowd': 0},
               {'id': 103, 'image_id': 9, 'category_id': 1, 'bbox': [1, 1, 20, 20], 'area': 400, 'iscrowd': 0},
               {'id': 104, 'image_id': 12, 'category_id': 3, 'bbox': [5, 5, 30, 20], 'area': 600, 'iscrowd': 0}]
BASE = {'images': IMAGES, 'annotations': ANNOTATIONS, 'categories': CATEGORIES}
# The policy: a missing or wrongly typed field of these skips the entry; of a category, stops the run.
REQUIRED = {'images': ('id', 'file_name'), 'annotations': ('id', 'image_id', 'category_id', 'bbox'),
            'categories': ('id', 'name')}
OPTIONAL_CHECKED = {'annotations': ('iscrowd', 'area')}  # checked when present; missing gets a default
WRONG_VALUES = [None, 'abc', '', [], {}, -1, 1.5, True]


def good_for(section, field, value):
    """Whether `value` is a valid `field` of an entry of `section`, as the policy states it."""
    if field in ('id', 'image_id', 'category_id'):
        if section == 'categories':  # a class number
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return isinstance(value, int) and not isinstance(value, bool) and (
            field == 'id' or value in {'image_id': {i['id'] for i in IMAGES}, 'category_id': {1, 3}}[field])
    if field in ('file_name', 'name'):
        return isinstance(value, str) and (field == 'name' or value != '')
    if field == 'iscrowd':
        return value in (0, 1)  # True == 1 too, as pycocotools reads it
    if field == 'area':
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True  # width, height: not read


def corruptions():
    """(name, file text, expected) where expected is ('stop', words) or ('skip', entries, images_left, anns_left)
    or ('run',)."""
    cases = []
    for section in ('images', 'annotations', 'categories'):
        entry = BASE[section][0]
        entry_id = entry['id']
        for field in entry:
            values = [('removed', None)] + [(f'= {v!r}', v) for v in WRONG_VALUES if not good_for(section, field, v)]
            for how, value in values:
                data = copy.deepcopy(BASE)
                if how == 'removed':
                    del data[section][0][field]
                else:
                    data[section][0][field] = value
                name = f'{section}[0].{field} {how}'
                checked = field in REQUIRED[section] or field in OPTIONAL_CHECKED.get(section, ())
                if not checked or (how == 'removed' and field in OPTIONAL_CHECKED.get(section, ())):
                    cases.append((name, json.dumps(data), ('run',)))
                elif section == 'categories':
                    cases.append((name, json.dumps(data), ('stop', ['category'])))
                elif section == 'images':
                    own = [a['id'] for a in ANNOTATIONS if a['image_id'] == entry_id]  # skipped with it
                    cases.append((name, json.dumps(data), ('skip', field, 1 + len(own), len(IMAGES) - 1,
                                                           len(ANNOTATIONS) - len(own))))
                else:
                    cases.append((name, json.dumps(data), ('skip', field, 1, len(IMAGES), len(ANNOTATIONS) - 1)))
    for bbox in ([1, 2, 3], [1, 2, 3, 4, 5], ['1', 2, 3, 4], [1, 2, None, 4], [1, 2, float('nan'), 4],
                 [1, 2, float('inf'), 4]):
        data = copy.deepcopy(BASE)
        data['annotations'][1]['bbox'] = bbox
        cases.append((f'bbox {bbox}', json.dumps(data), ('skip', 'bbox', 1, len(IMAGES), len(ANNOTATIONS) - 1)))
    text = json.dumps(BASE)
    for cut in (0, 1, 13, len(text) // 2, len(text) - 1):
        cases.append((f'cut at character {cut}', text[:cut], ('stop', ['not valid JSON', 'line', 'column'])))
    stops = {
        'image listed twice': {**BASE, 'images': IMAGES + [IMAGES[0]]},
        'annotation listed twice': {**BASE, 'annotations': ANNOTATIONS + [ANNOTATIONS[0]]},
        'category listed twice': {**BASE, 'categories': CATEGORIES + [CATEGORIES[0]]},
        'no images list': {'annotations': ANNOTATIONS, 'categories': CATEGORIES},
        'images not a list': {**BASE, 'images': {'id': 7}},
        'no annotations list': {'images': IMAGES, 'categories': CATEGORIES},
        'no categories list': {'images': IMAGES, 'annotations': ANNOTATIONS},
        'a list, not an object': [IMAGES],
        'every image unusable': {**BASE, 'images': [{'id': 'x'}]},
    }
    for name, data in stops.items():
        cases.append((name, json.dumps(data), ('stop', [])))
    cases.append(('not UTF-8', b'\xff\xfe{"images"'.decode('latin-1'), ('stop', ['UTF-8'])))
    missing_image = {**BASE, 'annotations': ANNOTATIONS + [{**ANNOTATIONS[0], 'id': 200, 'image_id': 55}]}
    cases.append(('annotation of a missing image', json.dumps(missing_image),
                  ('skip', "'image_id' is 55", 1, len(IMAGES), len(ANNOTATIONS))))
    missing_category = {**BASE, 'annotations': ANNOTATIONS + [{**ANNOTATIONS[0], 'id': 201, 'category_id': 77}]}
    cases.append(('annotation of a missing category', json.dumps(missing_category),
                  ('skip', "'category_id' is 77", 1, len(IMAGES), len(ANNOTATIONS))))
    return cases


CASES = corruptions()


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    (root / 'train2017').mkdir()
    for image in IMAGES:
        colour = (120, 40, 200)
        Image.new('RGB', (image['width'], image['height']), colour).save(root / 'train2017' / image['file_name'])
    (root / 'annotations').mkdir()
    return root


def load(root, text):
    path = root / 'annotations' / 'instances_train2017.json'
    path.write_text(text, encoding='latin-1' if text.startswith('\xff') else 'utf-8')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dataset = coco.build('train', root, make_transforms('val', val_size=32, val_max_size=64))
        items = [dataset[i] for i in range(len(dataset))]
        evaluator = datasets.CocoEvaluator(dataset.coco)
        evaluator.update({int(t['image_id']): {'scores': torch.tensor([0.9]), 'labels': torch.tensor([1]),
                                                'boxes': torch.tensor([[1.0, 1.0, 9.0, 9.0]])} for _, t in items})
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.summarize()
    return dataset, items, [str(w.message) for w in caught], str(path)


def test_every_corrupted_annotation_file_gets_a_clear_answer(image_folder):
    counts = {'stop': 0, 'skip': 0, 'run': 0}
    failures = []
    for name, text, expected in CASES:
        try:
            dataset, items, messages, path = load(image_folder, text)
        except UsageError as e:  # what the tools print as one line
            message, path = str(e), str(image_folder / 'annotations' / 'instances_train2017.json')
            if expected[0] != 'stop' or path not in message or not all(w in message for w in expected[1]) \
                    or '\n' in message:
                failures.append(f'{name}: stopped with {message!r}, expected {expected}')
            counts['stop'] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- anything else reaches the user as a traceback
            failures.append(f'{name}: {type(e).__name__}: {e}')
            continue
        if expected[0] == 'stop':
            failures.append(f'{name}: ran, expected the run to stop')
            continue
        if expected[0] == 'run':
            if any('skipped' in m for m in messages):
                failures.append(f'{name}: skipped something, expected it to run: {messages}')
            counts['run'] += 1
            continue
        _, field, skipped, images_left, annotations_left = expected
        named = [m for m in messages if m.startswith(path) and field in m and 'skipped' in m and ' id ' in m
                 or m.startswith(path) and field in m and 'entry #' in m]
        summary = [m for m in messages if m.startswith(path) and f'skipped {skipped} entries' in m]
        if not named or not summary:
            failures.append(f'{name}: no warning naming the file, the entry and {field!r}, or no count of '
                            f'{skipped}: {messages}')
        if (len(dataset.coco.imgs), len(dataset.coco.anns)) != (images_left, annotations_left):
            failures.append(f'{name}: {len(dataset.coco.imgs)} images, {len(dataset.coco.anns)} annotations left, '
                            f'expected {images_left}, {annotations_left}')
        if len(items) != images_left:
            failures.append(f'{name}: {len(items)} samples read, expected {images_left}')
        counts['skip'] += 1
    print(f'\n{len(CASES)} corrupted annotation files: {counts["stop"]} stop the run with a message naming the '
          f'file, {counts["skip"]} skip the entry with a warning naming it and a count, {counts["run"]} run '
          f'(a field nothing reads)')
    assert not failures, '\n'.join(failures)


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / 'instances_val2017.json'
    path.write_text('{"images": [\n  {"id": 1,\n')
    with pytest.raises(UsageError) as e:
        validate.read_json(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(json.JSONDecodeError) as reference:  # the position json itself reports
        json.loads(path.read_text())
    assert f'line {reference.value.lineno}, column {reference.value.colno}' in str(e.value)


def test_skipped_entries_are_named_up_to_a_limit_then_counted(tmp_path):
    bad = [{**ANNOTATIONS[0], 'id': 1000 + i, 'bbox': [1, 2, 3]} for i in range(25)]
    data = {**BASE, 'annotations': ANNOTATIONS + bad}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        cleaned, skipped = validate.validate_annotations(data, 'f.json')
    messages = [str(w.message) for w in caught]
    assert skipped == 25 and len(cleaned['annotations']) == len(ANNOTATIONS)
    assert sum('annotation id 10' in m and "'bbox'" in m for m in messages) == validate.MAX_NAMED
    assert any('skipped 25 entries' in m for m in messages)


def train(*argv):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    env.pop('DETR_IRPE_DEBUG', None)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'train.py'), '--config', 'configs/smoke.yaml',
                           '--dataset_file', 'coco', '--num_classes', '4', '--batch_size', '1', *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('corruption', ['cut short', 'bbox of 3 numbers and an image without file_name'])
def test_corrupted_annotation_file_end_to_end(tmp_path, image_folder, corruption):
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    os.symlink(image_folder / 'train2017', root / 'train2017')
    os.symlink(image_folder / 'train2017', root / 'val2017')
    data = copy.deepcopy(BASE)
    (root / 'annotations' / 'instances_val2017.json').write_text(json.dumps(data))
    if corruption == 'cut short':
        text = json.dumps(data)[:40]
    else:
        data['annotations'][3]['bbox'] = [1, 2, 3]
        del data['images'][1]['file_name']
        text = json.dumps(data)
    (root / 'annotations' / 'instances_train2017.json').write_text(text)
    run = train('--coco_path', str(root), '--output_dir', str(tmp_path / 'out'), '--epochs', '0')
    assert 'Traceback' not in run.stderr, run.stderr[-3000:]
    ann_file = str(root / 'annotations' / 'instances_train2017.json')
    if corruption == 'cut short':
        last = run.stderr.strip().splitlines()[-1]
        with pytest.raises(json.JSONDecodeError) as reference:  # the position json itself reports
            json.loads(text)
        position = f'line {reference.value.lineno}, column {reference.value.colno}'
        assert run.returncode != 0 and ann_file in last and position in last, run.stderr[-2000:]
        assert not (tmp_path / 'out').exists()  # nothing half-written
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "image id 9 has no 'file_name'; skipped" in run.stderr
        assert "annotation id 104, image id 12 field 'bbox'" in run.stderr
        assert 'skipped 3 entries' in run.stderr  # image 9, its annotation 103, annotation 104
