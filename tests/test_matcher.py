"""Hungarian matching: the assignment of minimal total cost (DETR Eq. 1), checked by brute force."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from detr_irpe.matcher import HungarianMatcher, build_matcher


def corners(box):
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def giou(a, b):
    """Generalised IoU of two cxcywh boxes, from its definition (Rezatofighi et al. 2019)."""
    ax1, ay1, ax2, ay2 = corners(a)
    bx1, by1, bx2, by2 = corners(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def pair_cost(logits, box, label, tgt_box, w_class, w_bbox, w_giou):
    exp = [math.exp(v) for v in logits]
    prob = exp[label] / sum(exp)
    l1 = sum(abs(p - t) for p, t in zip(box, tgt_box))
    return w_bbox * l1 - w_class * prob - w_giou * giou(box, tgt_box)


def brute_force_min_cost(logits, boxes, labels, tgt_boxes, weights):
    """Minimum over every way of giving each target its own query."""
    Q, N = len(boxes), len(labels)
    best = math.inf
    for queries in itertools.permutations(range(Q), N):
        best = min(best, sum(pair_cost(logits[q], boxes[q], labels[j], tgt_boxes[j], *weights)
                             for j, q in enumerate(queries)))
    return best if N else 0.0


def random_case(sizes, num_queries=4, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def boxes(n):
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        size = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
        return torch.cat([centre, size], dim=1)

    outputs = {'pred_logits': torch.randn(len(sizes), num_queries, num_classes + 1, generator=g),
               'pred_boxes': boxes(len(sizes) * num_queries).view(len(sizes), num_queries, 4)}
    targets = [{'labels': torch.randint(0, num_classes, (n,), generator=g), 'boxes': boxes(n)} for n in sizes]
    return outputs, targets


@pytest.mark.parametrize('sizes, weights, seed', [
    ([3], (1, 5, 2), 0),
    ([3, 4, 1, 2], (1, 5, 2), 1),
    ([3, 0, 2], (2, 1, 0), 2),     # no GIoU term
    ([4, 3], (0, 0, 1), 3),        # GIoU only
])
def test_matching_has_brute_force_minimal_cost(sizes, weights, seed):
    outputs, targets = random_case(sizes, seed=seed)
    matcher = HungarianMatcher(*weights)
    indices = matcher(outputs, targets)
    assert len(indices) == len(sizes)
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        n = len(target['labels'])
        assert src.dtype == tgt.dtype == torch.int64
        assert len(src) == len(tgt) == n
        assert sorted(tgt.tolist()) == list(range(n)) and len(set(src.tolist())) == n
        logits = outputs['pred_logits'][b].double().tolist()
        boxes = outputs['pred_boxes'][b].double().tolist()
        labels, tgt_boxes = target['labels'].tolist(), target['boxes'].double().tolist()
        cost = sum(pair_cost(logits[q], boxes[q], labels[j], tgt_boxes[j], *weights)
                   for q, j in zip(src.tolist(), tgt.tolist()))
        assert cost == pytest.approx(brute_force_min_cost(logits, boxes, labels, tgt_boxes, weights), abs=1e-5)


def test_images_without_targets_match_nothing():
    outputs, targets = random_case([0, 0])
    for src, tgt in HungarianMatcher(1, 5, 2)(outputs, targets):
        assert src.shape == tgt.shape == (0,) and src.dtype == tgt.dtype == torch.int64


def test_obvious_case_matches_the_box_on_top_of_each_target():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.3, 0.1, 0.2]]])
    outputs = {'pred_logits': torch.zeros(1, 3, 3), 'pred_boxes': boxes}
    targets = [{'labels': torch.tensor([0, 1]), 'boxes': boxes[0, [2, 0]]}]
    (src, tgt), = HungarianMatcher(1, 5, 2)(outputs, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 2, 1: 0}


def test_build_matcher_reads_set_cost_flags():
    matcher = build_matcher(SimpleNamespace(set_cost_class=1, set_cost_bbox=5, set_cost_giou=2))
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (1, 5, 2)


def test_all_zero_costs_are_refused():
    with pytest.raises(ValueError, match='set_cost'):
        HungarianMatcher(0, 0, 0)
