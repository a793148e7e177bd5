"""--eval_backend: faster-coco-eval (the default where installed) gives pycocotools' numbers."""
import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO

from detr_irpe_datasets import coco_eval
from detr_irpe_datasets.coco_eval import CocoEvaluator

pytest.importorskip('faster_coco_eval')  # pinned in the Makefile; a plain `pip install -e .` may lack it


def synthetic_ground_truth(num_images=40, seed=0):
    """Images of several sizes, objects of all three COCO area ranges, a few crowd boxes, and one
    category without any object (its AP is -1)."""
    g = torch.Generator().manual_seed(seed)
    categories = [{'id': i, 'name': f'class{i}'} for i in (1, 2, 3, 5, 8, 13)]
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = [int(x) for x in torch.randint(200, 640, (2,), generator=g)]
        images.append({'id': image_id, 'height': h, 'width': w, 'file_name': f'{image_id}.jpg'})
        for _ in range(int(torch.randint(0, 12, (), generator=g))):
            side = float(torch.empty(()).uniform_(8, 180, generator=g))
            bw, bh = side * float(torch.empty(()).uniform_(0.5, 1.5, generator=g)), side
            x, y = float(torch.rand((), generator=g)) * (w - bw), float(torch.rand((), generator=g)) * (h - bh)
            cat = categories[int(torch.randint(0, 5, (), generator=g))]['id']  # class13 never occurs
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id, 'category_id': cat,
                                'bbox': [x, y, bw, bh], 'area': bw * bh,
                                'iscrowd': int(torch.rand((), generator=g) < 0.05)})
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': annotations, 'categories': categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def generated_detections(coco, seed=1):
    """{image_id: scores, labels, boxes xyxy}: jittered copies of most objects (some with the wrong class),
    random false positives, and on a few images more than 100 detections."""
    g = torch.Generator().manual_seed(seed)
    cat_ids = sorted(coco.cats)
    predictions = {}
    for image_id, image in coco.imgs.items():
        boxes, labels = [], []
        for ann in coco.imgToAnns[image_id]:
            if torch.rand((), generator=g) < 0.85:
                x, y, w, h = ann['bbox']
                jitter = torch.randn(4, generator=g) * 0.08 * torch.tensor([w, h, w, h])
                boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                wrong = torch.rand((), generator=g) < 0.1
                labels.append(cat_ids[int(torch.randint(0, len(cat_ids), (), generator=g))] if wrong else ann['category_id'])
        extra = 130 if image_id % 13 == 0 else int(torch.randint(0, 6, (), generator=g))
        for _ in range(extra):
            x, y = float(torch.rand((), generator=g)) * image['width'], float(torch.rand((), generator=g)) * image['height']
            size = float(torch.empty(()).uniform_(5, 120, generator=g))
            boxes.append([x, y, x + size, y + size * 0.8])
            labels.append(cat_ids[int(torch.randint(0, len(cat_ids), (), generator=g))])
        n = len(boxes)
        predictions[image_id] = {'scores': torch.rand(n, generator=g, dtype=torch.float64),
                                 'labels': torch.tensor(labels, dtype=torch.int64),
                                 'boxes': torch.tensor(boxes, dtype=torch.float64).reshape(n, 4)}
    return predictions


def evaluate(coco, predictions, backend):
    evaluator = CocoEvaluator(coco, backend=backend)
    evaluator.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = evaluator.summarize()
    return summary, printed.getvalue()


@pytest.fixture(scope='module')
def gt_and_detections():
    coco = synthetic_ground_truth()
    return coco, generated_detections(coco)


def test_both_backends_give_the_same_12_stats_and_per_category_ap(gt_and_detections):
    coco, predictions = gt_and_detections
    fast, fast_table = evaluate(coco, predictions, 'faster_coco_eval')
    reference, reference_table = evaluate(coco, predictions, 'pycocotools')
    assert len(reference['bbox']) == 12 and 0.05 < reference['bbox'][0] < 0.95  # neither trivial nor empty
    assert fast['bbox'] == pytest.approx(reference['bbox'], abs=1e-12)
    assert fast['per_category_ap'].keys() == reference['per_category_ap'].keys()
    for name, ap in reference['per_category_ap'].items():
        assert fast['per_category_ap'][name] == pytest.approx(ap, abs=1e-12), name
    assert reference['per_category_ap']['class13'] == -1.0
    assert fast_table == reference_table


def test_a_subset_of_images_is_evaluated_alike(gt_and_detections):
    coco, predictions = gt_and_detections
    subset = {i: p for i, p in predictions.items() if i % 3 == 0}
    fast, _ = evaluate(coco, subset, 'faster_coco_eval')
    reference, _ = evaluate(coco, subset, 'pycocotools')
    assert fast['bbox'] == pytest.approx(reference['bbox'], abs=1e-12)


@pytest.mark.parametrize('backend', coco_eval.BACKENDS)
def test_detections_equal_to_the_ground_truth_score_ap_1(backend):
    coco = synthetic_ground_truth(num_images=10, seed=3)
    predictions = {}
    for image_id in coco.imgs:
        anns = [a for a in coco.imgToAnns[image_id] if not a['iscrowd']]
        predictions[image_id] = {'scores': torch.ones(len(anns)), 'labels': torch.tensor([a['category_id'] for a in anns]),
                                 'boxes': torch.tensor([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                                                         a['bbox'][1] + a['bbox'][3]] for a in anns]).reshape(-1, 4)}
    summary, table = evaluate(coco, predictions, backend)
    assert summary['bbox'][0] == pytest.approx(1.0) and summary['bbox'][1] == pytest.approx(1.0)
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000' in table


@pytest.mark.parametrize('backend', coco_eval.BACKENDS)
def test_no_detections_at_all_give_zero_ap(backend):
    coco = synthetic_ground_truth(num_images=5, seed=4)
    summary, _ = evaluate(coco, {}, backend)
    assert summary['bbox'][0] == 0.0 and summary['bbox'][8] == 0.0


def test_default_is_faster_coco_eval_where_installed_and_unknown_backends_are_refused(monkeypatch):
    assert coco_eval.default_backend() == 'faster_coco_eval'
    with pytest.raises(ValueError, match="'detectron2'.*faster_coco_eval, pycocotools"):
        CocoEvaluator(synthetic_ground_truth(2), backend='detectron2')
    find_spec = coco_eval.importlib.util.find_spec
    monkeypatch.setattr(coco_eval.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'faster_coco_eval' else find_spec(name, *a))
    assert coco_eval.default_backend() == 'pycocotools'
    with pytest.raises(ValueError, match='faster-coco-eval is not installed.*--eval_backend pycocotools'):
        CocoEvaluator(synthetic_ground_truth(2), backend='faster_coco_eval')


def test_images_evaluated_by_two_processes_count_once(gt_and_detections, monkeypatch):
    """The distributed sampler pads with repeated images; the main process must not count them twice."""
    coco, predictions = gt_and_detections
    ids = sorted(predictions)
    parts = [{i: predictions[i] for i in ids[0::2] + ids[1:3]}, {i: predictions[i] for i in ids[1::2]}]
    evaluators = [CocoEvaluator(coco, backend='pycocotools') for _ in parts]
    for evaluator, part in zip(evaluators, parts):
        evaluator.update(part)
    gathered = [(e.img_ids, e.results(), e.pixel_sizes) for e in evaluators]
    monkeypatch.setattr(coco_eval.distributed, 'gather_to_main', lambda obj: gathered)
    evaluators[0].synchronize_between_processes()
    assert sorted(evaluators[0].img_ids) == ids
    with contextlib.redirect_stdout(io.StringIO()):
        merged = evaluators[0].summarize()
    reference, _ = evaluate(coco, predictions, 'pycocotools')
    assert merged == reference
