"""Evaluation scores the boxes training uses, and the data checks around it say what is true.

The reference numbers come from pycocotools' COCOeval run directly on small annotation files written by hand: the
boxes a reader expects evaluation to score, given as a COCO file, with the same detections."""
import argparse
import contextlib
import importlib.util
import io
import json
import random
import warnings

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError
from detr_irpe.detr import MAX_CLASSES
from detr_irpe_datasets import coco
from detr_irpe_datasets.validate import evaluated_annotations

CATEGORIES = [{'id': 1, 'name': 'one'}, {'id': 4, 'name': 'four'}]
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None,
                                                        reason=f'{name} not installed'))
            for name in ('pycocotools', 'faster_coco_eval')]


def write_dataset(root, sizes, annotations, categories=CATEGORIES, sized=True):
    """An image folder of blank images of `sizes` ({image id: (width, height)}) and its annotation file, whose
    image entries give their size unless `sized` is False; returns the file's path."""
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, (width, height) in sizes.items():
        Image.new('RGB', (width, height), (90, 120, 30)).save(root / f'{image_id}.png')
        images.append({'id': image_id, 'file_name': f'{image_id}.png',
                       **({'width': width, 'height': height} if sized else {})})
    path = root / 'annotations.json'
    path.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': categories}))
    return path


def load(path):
    """(dataset of annotation file `path`, its load warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dataset = coco.build_from_files('val', str(path), str(path.parent), None)
    return dataset, [str(w.message) for w in caught]


def ann(ann_id, image_id, bbox, category_id=1, **extra):
    return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': bbox, **extra}


def detections_of(boxes_by_image):
    """{image id: [(category id, [x, y, w, h]), ...]} -> the evaluator's predictions (xyxy, score 1 - a little
    less for each next box, so that the order is fixed)."""
    return {image_id: {'scores': torch.tensor([1 - i / 1000 for i in range(len(boxes))], dtype=torch.float64),
                       'labels': torch.tensor([c for c, _ in boxes], dtype=torch.int64),
                       'boxes': torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in boxes],
                                             dtype=torch.float64).reshape(-1, 4)}
            for image_id, boxes in boxes_by_image.items()}


def evaluator_stats(coco_gt, boxes_by_image, backend):
    evaluator = datasets.CocoEvaluator(coco_gt, backend=backend)
    evaluator.update(detections_of(boxes_by_image))
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.summarize()['bbox']


def reference_stats(tmp_path, images, annotations, boxes_by_image):
    """pycocotools' 12 stats for a ground-truth file of `annotations` (each with 'area' and 'iscrowd') written to
    disk and read back, as COCO's own evaluation reads one."""
    path = tmp_path / 'reference.json'
    path.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': CATEGORIES}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        results = [{'image_id': image_id, 'category_id': c, 'bbox': box, 'score': 1 - i / 1000}
                   for image_id, boxes in boxes_by_image.items() for i, (c, box) in enumerate(boxes)]
        evaluation = COCOeval(gt, gt.loadRes(results), iouType='bbox')
        evaluation.params.imgIds = sorted(boxes_by_image)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(s) for s in evaluation.stats]


def image_entries(sizes):
    return [{'id': i, 'file_name': f'{i}.png', 'width': w, 'height': h} for i, (w, h) in sizes.items()]


@pytest.mark.parametrize('backend', BACKENDS)
def test_boxes_training_drops_are_not_scored(tmp_path, backend):
    # a zero-width box cost a perfect detector half its AP (0.505)
    sizes = {1: (100, 100)}
    kept = ann(1, 1, [10, 10, 30, 30], area=900, iscrowd=0)
    dropped = [ann(2, 1, [50, 50, 0, 20]), ann(3, 1, [20, 20, 30, -5]), ann(4, 1, [130, 10, 20, 20])]
    dataset, _ = load(write_dataset(tmp_path / 'data', sizes, [kept, *dropped]))
    detections = {1: [(1, kept['bbox'])]}
    expected = reference_stats(tmp_path, image_entries(sizes), [kept], detections)
    assert expected[0] == pytest.approx(1.0)  # the detection is perfect once the dropped boxes are gone
    assert evaluator_stats(dataset.coco, detections, backend) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize('backend', BACKENDS)
def test_boxes_training_clips_are_scored_clipped_keeping_a_given_area(tmp_path, backend):
    # [-60, 0, 100, 100]: training learns [0, 0, 40, 100]; a detection of just that scored AP 0
    sizes = {1: (100, 100), 2: (100, 100)}
    given_area = ann(1, 1, [-60, 0, 100, 100], area=100 * 100, iscrowd=0)  # large, as given, though clipped
    derived_area = ann(2, 2, [50, 0, 150, 80])  # clipped to [50, 0, 50, 80]: 4000 px, medium, where 12000 is large
    dataset, _ = load(write_dataset(tmp_path / 'data', sizes, [given_area, derived_area]))
    clipped = [ann(1, 1, [0, 0, 40, 100], area=100 * 100, iscrowd=0),
               ann(2, 2, [50, 0, 50, 80], area=50 * 80, iscrowd=0)]
    detections = {a['image_id']: [(1, a['bbox'])] for a in clipped}
    expected = reference_stats(tmp_path, image_entries(sizes), clipped, detections)
    assert evaluator_stats(dataset.coco, detections, backend) == pytest.approx(expected, abs=1e-9)


def scored_ground_truth(dataset, targets=()):
    """{annotation id: annotation} as evaluation scores them, given the targets' pixel sizes as engine.evaluate
    gives them (no detections: every image is evaluated)."""
    evaluator = datasets.CocoEvaluator(dataset.coco, backend='pycocotools')
    evaluator.update({}, {int(t['image_id']): t['orig_size'].tolist() for t in targets})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    return {a['id']: a for a in evaluator.coco_gt.anns.values()}


def test_boxes_are_clipped_to_the_pixels_as_read_where_the_entry_has_no_size_or_another(tmp_path):
    """Training clips to the image's pixels; so does evaluation, whatever the entry says (warned of when read)."""
    boxes = [ann(1, 1, [50, 40, 50, 50], area=2500), ann(2, 2, [150, 10, 20, 20], area=400)]
    for sized in (False, True):  # none; 80x60 and 200x100 files whose entries say 60x80 and 100x200 (turned)
        root = tmp_path / str(sized)
        path = write_dataset(root, {1: (80, 60), 2: (200, 100)}, boxes, sized=False)
        if sized:
            data = json.loads(path.read_text())
            for image, (w, h) in zip(data['images'], [(60, 80), (100, 200)]):
                image.update(width=w, height=h)
            path.write_text(json.dumps(data))
        dataset, _ = load(path)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            targets = [dataset[i][1] for i in range(len(dataset))]
        scored = scored_ground_truth(dataset, targets)
        assert {i: a['bbox'] for i, a in scored.items()} == {1: [50, 40, 80 - 50, 60 - 40], 2: [150, 10, 20, 20]}
        for target in targets:  # and those are training's boxes
            (learned,) = pixel_boxes(target).tolist()
            x, y, w, h = scored[int(target['image_id'])]['bbox']
            assert learned == pytest.approx([x, y, x + w, y + h], abs=1e-3)



def test_evaluate_gives_the_evaluator_each_images_pixel_size(tmp_path):
    """engine.evaluate passes the sizes the loader read (the entries here say none): the ground truth is clipped to
    the right and bottom edges too."""
    from torch.utils.data import DataLoader

    from detr_irpe import engine
    from detr_irpe.postprocess import PostProcess
    dataset, _ = load(write_dataset(tmp_path / 'data', {1: (80, 60), 2: (50, 70)},
                                    [ann(1, 1, [50, 40, 50, 50], area=2500), ann(2, 2, [10, 60, 20, 30], area=600)],
                                    sized=False))
    dataset._transforms = datasets.make_transforms('val', val_size=32, val_max_size=64)

    def model(images, mask):  # one detection of category 1 per image, in the middle
        logits = torch.tensor([[[-5.0, 5.0, -5.0]]]).expand(len(images), 1, 3)
        return {'pred_logits': logits, 'pred_boxes': torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]).expand(len(images), 1, 4)}
    model.eval = lambda: None
    evaluator = datasets.CocoEvaluator(dataset.coco, backend='pycocotools')
    loader = DataLoader(dataset, batch_size=2, collate_fn=datasets.collate_fn)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the boxes reaching out, warned of when read
        engine.evaluate(model, {'bbox': PostProcess()}, loader, evaluator, 'cpu')
    assert evaluator.pixel_sizes == {1: (80, 60), 2: (50, 70)}
    assert {a['id']: a['bbox'] for a in evaluator.coco_gt.anns.values()} == {1: [50, 40, 30, 20], 2: [10, 60, 20, 10]}

def pixel_boxes(target):
    """The target's normalised cxcywh boxes as [x1, y1, x2, y2] in the image's pixels."""
    h, w = target['orig_size'].tolist()
    cx, cy, bw, bh = (target['boxes'].double() * torch.tensor([w, h, w, h], dtype=torch.float64)).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def test_evaluation_scores_the_boxes_training_learns_and_the_warnings_say_so(tmp_path):
    """Boxes inside, out by float noise, out by more, partly and wholly outside, of no size, on images of several
    sizes: evaluation's non-crowd boxes are training's targets, and what the read warnings call dropped or clipped
    is dropped or clipped in evaluation too."""
    rng = random.Random(0)
    sizes = {i: (rng.randint(40, 120), rng.randint(40, 120)) for i in range(1, 7)}
    annotations = []
    for image_id, (width, height) in sizes.items():
        for _ in range(8):
            x, y = rng.uniform(-width / 2, width * 1.2), rng.uniform(-height / 2, height * 1.2)
            w, h = rng.choice([0, -3, rng.uniform(0.5, width), rng.uniform(0.5, width)]), rng.uniform(0.5, height)
            annotations.append(ann(len(annotations) + 1, image_id, [x, y, w, h], iscrowd=int(rng.random() < 0.1)))
        noisy = [width - 10, 0, 10.5, height + 0.5]  # out by half a pixel: an annotation tool's float noise
        annotations.append(ann(len(annotations) + 1, image_id, noisy, iscrowd=0))
    dataset, _ = load(write_dataset(tmp_path / 'data', sizes, annotations))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        targets = {int(t['image_id']): t for t in (dataset[i][1] for i in range(len(dataset)))}
    said = [str(w.message) for w in caught]
    scored = scored_ground_truth(dataset, targets.values())
    by_id = {a['id']: a for a in annotations}
    dropped = {i for i in by_id if any(f'annotation id {i} ' in m and 'dropped' in m for m in said)}
    clipped = {i for i in by_id if any(f'annotation id {i} ' in m and 'clipped' in m for m in said)}
    assert dropped and clipped  # the random boxes hold both
    assert all('evaluation' in m for m in said if 'dropped' in m or 'clipped' in m)
    assert not dropped & set(scored)
    assert all(scored[i]['bbox'] != by_id[i]['bbox'] for i in clipped)
    unremarked = {i for i in scored if i not in clipped}
    assert all(scored[i]['bbox'] == by_id[i]['bbox'] for i in unremarked)

    for image_id, target in targets.items():
        # training's boxes in the file's order (no transform reorders them), the crowd regions left out
        ids = [a['id'] for a in annotations if a['image_id'] == image_id and a['id'] in scored and not a['iscrowd']]
        evaluated = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (scored[i]['bbox'] for i in ids)],
                                 dtype=torch.float64).reshape(-1, 4)
        learned = pixel_boxes(target)
        assert evaluated.shape == learned.shape, image_id
        # training clips a box out by float noise alone (a pixel at most) without a word; evaluation keeps it
        noise = torch.tensor([1.0 if i in unremarked else 1e-3 for i in ids], dtype=torch.float64)[:, None]
        assert ((evaluated - learned).abs() <= noise).all(), (image_id, evaluated, learned)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_file_of_boxes_inside_their_images_is_scored_as_written(tmp_path, backend):
    """COCO's own files (boxes inside, out by float noise at most, crowd regions, areas of the masks): evaluation's
    ground truth is the file's, and its numbers are those of COCOeval run on the file."""
    rng = random.Random(1)
    sizes = {i: (rng.randint(60, 400), rng.randint(60, 400)) for i in range(1, 9)}
    annotations, detections = [], {}
    for image_id, (width, height) in sizes.items():
        detections[image_id] = []
        for _ in range(rng.randint(0, 6)):
            w, h = rng.uniform(2, width / 2), rng.uniform(2, height / 2)
            bbox = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            category = rng.choice(CATEGORIES)['id']
            annotations.append(ann(len(annotations) + 1, image_id, bbox, category, area=w * h * rng.uniform(0.4, 1),
                                   iscrowd=int(rng.random() < 0.1), segmentation=[[1, 2, 3, 4, 5, 6]]))
            if rng.random() < 0.8:
                detections[image_id].append((category, [v + rng.uniform(-2, 2) for v in bbox]))
        annotations.append(ann(len(annotations) + 1, image_id, [width - 20, 0, 20.4, height], area=9, iscrowd=0))
    dataset, _ = load(write_dataset(tmp_path / 'data', sizes, annotations))
    assert sorted(evaluated_annotations(dataset.coco.dataset), key=lambda a: a['id']) == annotations
    expected = reference_stats(tmp_path, image_entries(sizes), annotations, detections)
    assert evaluator_stats(dataset.coco, detections, backend) == pytest.approx(expected, abs=1e-9)


def grid(image_id, count, first_id):
    """`count` 10x10 boxes in rows of 20 on a 300x300 image."""
    return [ann(first_id + k, image_id, [15 * (k % 20), 15 * (k // 20), 10, 10], area=100, iscrowd=0)
            for k in range(count)]


def test_the_advice_on_queries_says_when_cocos_ap_counts_fewer_detections_than_objects(tmp_path):
    max_dets = Params(iouType='bbox').maxDets[-1]
    crowded = max_dets + 20
    for count in (8, crowded):
        dataset, _ = load(write_dataset(tmp_path / str(count), {1: (300, 300)}, grid(1, count, 1)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            datasets.warn_objects_beyond_queries({'val': dataset}, 5)
        [message] = [str(w.message) for w in caught]
        assert f'pass --num_queries {count} or more' in message
        says_coco_caps = f"COCO's AP counts at most {max_dets} detections an image whatever --num_queries is" in message
        assert says_coco_caps == (count > max_dets), message
    # and what it says is so: every object detected exactly, yet COCO's recall stops at max_dets of them
    gt = grid(1, crowded, 1)
    stats = reference_stats(tmp_path, image_entries({1: (300, 300)}), gt, {1: [(1, a['bbox']) for a in gt]})
    assert stats[8] == pytest.approx(max_dets / crowded)  # AR@100


def categories(ids):
    return [{'id': i, 'name': f'class {i}'} for i in ids]


def test_category_ids_beyond_the_class_bound_are_refused_saying_what_to_do(tmp_path):
    ids = [1, 2, MAX_CLASSES + 5]
    dataset, _ = load(write_dataset(tmp_path / 'data', {1: (32, 32)}, [], categories(ids)))
    for call in (lambda: datasets.num_classes_for(dataset),
                 lambda: datasets.check_against_training_set(
                     dataset, argparse.Namespace(num_classes=10, batch_size=1, dataset_file='coco'))):
        with pytest.raises(UsageError) as error:
            call()
        message = str(error.value)
        assert str(max(ids)) in message and f'{len(ids)} category ids' in message and str(MAX_CLASSES) in message
        assert 'renumber the categories' in message and 'annotation files' in message


def test_sparse_category_ids_are_warned_of_naming_the_class_heads_size(tmp_path):
    coco_like = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80 of 90
    for ids, warned in (([1, 2, 5000], True), (coco_like, False), ([5, 900], False)):
        dataset, _ = load(write_dataset(tmp_path / str(len(ids)), {1: (32, 32)}, [], categories(ids)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert datasets.num_classes_for(dataset) == max(ids) + 1
        said = [str(w.message) for w in caught]
        assert len(said) == warned, said
        if warned:
            assert f'{max(ids) + 1} outputs' in said[0] and f'{len(ids)} category ids' in said[0]
            assert 'renumber the categories' in said[0]


def test_a_set_whose_annotations_were_all_skipped_says_so_not_that_it_has_none(tmp_path):
    args = argparse.Namespace(dataset_file='coco')
    without_id = [{'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 5, 5]}, {'image_id': 1, 'category_id': 4,
                                                                          'bbox': [2, 2, 5, 5]}]
    dataset, said = load(write_dataset(tmp_path / 'skipped', {1: (32, 32)}, without_id))
    assert sum("has no 'id'" in m for m in said) == len(without_id)
    with pytest.raises(UsageError) as error:
        datasets.check_annotated(dataset, args, 'val')
    message = str(error.value)
    assert f'all {len(without_id)} annotation entries were skipped as invalid' in message
    assert 'warnings above' in message and "fill its 'annotations' list" not in message
    empty, _ = load(write_dataset(tmp_path / 'empty', {1: (32, 32)}, []))
    with pytest.raises(UsageError, match="no annotations: .*fill its 'annotations' list"):
        datasets.check_annotated(empty, args, 'val')
