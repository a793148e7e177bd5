"""CocoEvaluator: COCO bbox AP from predictions in original-image pixels."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detr_irpe_datasets.coco_eval import CocoEvaluator

CATEGORIES = [{'id': 3, 'name': 'cat'}, {'id': 11, 'name': 'dog'}]
# medium-sized boxes (area between 32^2 and 96^2), xywh
GT = [
    {'id': 1, 'image_id': 10, 'category_id': 3, 'bbox': [10, 10, 50, 40]},
    {'id': 2, 'image_id': 10, 'category_id': 11, 'bbox': [100, 80, 60, 60]},
    {'id': 3, 'image_id': 25, 'category_id': 3, 'bbox': [0, 0, 40, 80]},
]


def coco_gt():
    anns = [{**a, 'area': a['bbox'][2] * a['bbox'][3], 'iscrowd': 0} for a in GT]
    coco = COCO()
    coco.dataset = {'images': [{'id': 10, 'width': 200, 'height': 150}, {'id': 25, 'width': 100, 'height': 100}],
                    'annotations': anns, 'categories': CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def xyxy(x, y, w, h):
    return [x, y, x + w, y + h]


def evaluate(predictions):
    evaluator = CocoEvaluator(coco_gt())
    for image_id, pred in predictions.items():
        evaluator.update({image_id: pred})
    evaluator.synchronize_between_processes()  # no process group: nothing to gather
    return evaluator, evaluator.summarize()


def perfect_predictions():
    preds = {}
    for image_id in (10, 25):
        anns = [a for a in GT if a['image_id'] == image_id]
        preds[image_id] = {'scores': torch.ones(len(anns)), 'labels': torch.tensor([a['category_id'] for a in anns]),
                           'boxes': torch.tensor([xyxy(*a['bbox']) for a in anns], dtype=torch.float32)}
    return preds


def test_perfect_predictions_give_ap_one(capsys):
    _, stats = evaluate(perfect_predictions())
    assert len(stats['bbox']) == 12
    ap, ap50, ap75, ap_small, ap_medium, ap_large = stats['bbox'][:6]
    assert [ap, ap50, ap75, ap_medium] == pytest.approx([1.0] * 4)
    assert ap_small == ap_large == -1.0  # no small or large ground truth
    assert stats['per_category_ap'] == pytest.approx({'cat': 1.0, 'dog': 1.0})
    out = capsys.readouterr().out
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]' in out
    assert out.count('Average Recall') == 6 and out.count('Average Precision') == 6
    assert 'cat' in out and 'dog' in out


def test_an_image_given_twice_counts_once():
    # the loader gives the next image in place of an unreadable one: its detections twice scored as duplicates, false
    # positives at their scores (here above image 10's true cat: cat AP 0.83 instead of 1)
    evaluator = CocoEvaluator(coco_gt())
    predictions = perfect_predictions()
    predictions[10]['scores'] = torch.full((2,), 0.8)
    for image_id in (10, 25, 25):
        evaluator.update({image_id: predictions[image_id]})
    evaluator.synchronize_between_processes()
    assert evaluator.img_ids == [10, 25] and len(evaluator.results()) == 3
    assert evaluator.summarize()['bbox'][0] == pytest.approx(1.0)


def test_no_detections_give_finite_numbers():
    empty = {'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64), 'boxes': torch.zeros(0, 4)}
    evaluator, stats = evaluate({10: empty, 25: empty})
    assert len(stats['bbox']) == 12 and all(math.isfinite(s) for s in stats['bbox'])
    assert stats['bbox'][0] == 0.0 and stats['per_category_ap'] == {'cat': 0.0, 'dog': 0.0}
    assert evaluator.results() == []


def test_never_updated_evaluator_still_summarizes():
    stats = CocoEvaluator(coco_gt()).summarize()
    assert len(stats['bbox']) == 12 and all(math.isfinite(s) for s in stats['bbox'])


def test_ap_over_iou_thresholds_by_hand(capsys):
    """One ground truth, one detection at IoU 0.62: a hit at thresholds 0.50, 0.55, 0.60 of the ten
    0.50:0.05:0.95, so AP = 3/10, AP50 = 1, AP75 = 0."""
    gt = [0, 0, 40, 80]  # image 25, area 3200
    box = [0, 0, 40, 80 * 0.62]  # inside the ground truth: IoU = its area / 3200
    _, stats = evaluate({25: {'scores': torch.tensor([0.9]), 'labels': torch.tensor([3]),
                              'boxes': torch.tensor([xyxy(*box)])}})
    assert box[3] * box[2] / (gt[2] * gt[3]) == pytest.approx(0.62)
    ap, ap50, ap75 = stats['bbox'][:3]
    assert [ap, ap50, ap75] == pytest.approx([0.3, 1.0, 0.0])
    assert stats['per_category_ap']['cat'] == pytest.approx(0.3)
    assert stats['per_category_ap']['dog'] == -1.0  # only image 25 was evaluated, and it has no dog
    table = capsys.readouterr().out.splitlines()[-3:]
    assert table == ['category  AP@[.5:.95]', 'cat       0.300',
                     'dog       -      (no annotation in the images evaluated)']


def test_results_are_coco_dicts_with_xywh_boxes():
    evaluator = CocoEvaluator(coco_gt())
    evaluator.update({25: {'scores': np.array([0.5, 0.25]), 'labels': np.array([3, 11]),
                           'boxes': np.array([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 6.5, 9.0]])}})
    expected = [
        {'image_id': 25, 'category_id': 3, 'bbox': [1.0, 2.0, 10.0, 20.0], 'score': 0.5},
        {'image_id': 25, 'category_id': 11, 'bbox': [5.0, 5.0, 1.5, 4.0], 'score': 0.25},
    ]
    assert evaluator.results() == expected
    evaluator.summarize()
    assert evaluator.results() == expected  # evaluating leaves them as they were


def test_evaluator_does_not_touch_the_datasets_coco_object():
    gt = coco_gt()
    before = [dict(a) for a in gt.dataset['annotations']]
    evaluator = CocoEvaluator(gt)
    evaluator.update(perfect_predictions())
    evaluator.summarize()
    assert gt.dataset['annotations'] == before


def test_synchronize_gathers_through_torch_distributed(tmp_path):
    """With a (one-process) process group the predictions go through all_gather_object unchanged."""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        evaluator = CocoEvaluator(coco_gt())
        evaluator.update(perfect_predictions())
        before = evaluator.results()
        evaluator.synchronize_between_processes()
        assert evaluator.results() == before and sorted(evaluator.img_ids) == [10, 25]
        assert evaluator.summarize()['bbox'][0] == pytest.approx(1.0)
    finally:
        dist.destroy_process_group()
