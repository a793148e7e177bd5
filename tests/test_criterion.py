"""DETR's set loss on cases small enough to compute by hand."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr_irpe.criterion import build_criterion
from detr_irpe.matcher import HungarianMatcher

ARGS = dict(set_cost_class=1, set_cost_bbox=5, set_cost_giou=2, bbox_loss_coef=5, giou_loss_coef=2,
            eos_coef=0.1, aux_loss=True, dec_layers=3)


def criterion(num_classes=2, **overrides):
    return build_criterion(SimpleNamespace(**{**ARGS, **overrides}), num_classes)


def log_softmax(row):
    log_sum = math.log(sum(math.exp(v) for v in row))
    return [v - log_sum for v in row]


# Two queries, two real classes (+ no-object at index 2), one target of class 0.
LOGITS = [[2.0, 0.0, 1.0],   # query 0: says class 0
          [0.0, 1.0, 3.0]]   # query 1: says no object
PRED_BOXES = [[0.45, 0.5, 0.2, 0.3],   # query 0: x 0.35..0.55, y 0.35..0.65
              [0.1, 0.1, 0.1, 0.1]]
TARGET_BOX = [0.5, 0.5, 0.2, 0.2]      # x 0.4..0.6, y 0.4..0.6


def hand_case():
    outputs = {'pred_logits': torch.tensor([LOGITS], requires_grad=True),
               'pred_boxes': torch.tensor([PRED_BOXES], requires_grad=True)}
    targets = [{'labels': torch.tensor([0]), 'boxes': torch.tensor([TARGET_BOX])}]
    return outputs, targets


def test_losses_on_hand_computed_case():
    outputs, targets = hand_case()
    losses = criterion()(outputs, targets)

    # query 0 is matched to the target (class 0); query 1 must say no-object, weighted by eos_coef
    eos = 0.1
    ce = (-log_softmax(LOGITS[0])[0] - eos * log_softmax(LOGITS[1])[2]) / (1 + eos)
    l1 = abs(0.45 - 0.5) + abs(0.3 - 0.2)
    inter, union, hull = 0.15 * 0.2, 0.2 * 0.3 + 0.2 * 0.2 - 0.15 * 0.2, 0.25 * 0.3
    giou = inter / union - (hull - union) / hull
    assert losses['loss_ce'].item() == pytest.approx(ce, abs=1e-6)
    assert losses['loss_bbox'].item() == pytest.approx(l1, abs=1e-6)
    assert losses['loss_giou'].item() == pytest.approx(1 - giou, abs=1e-6)
    assert losses['class_error'].item() == 0      # query 0's best class is the target's
    assert losses['cardinality_error'].item() == 0  # one object predicted, one present
    assert set(losses) == {'loss_ce', 'loss_bbox', 'loss_giou', 'class_error', 'cardinality_error'}

    sum(losses[k] for k in ('loss_ce', 'loss_bbox', 'loss_giou')).backward()
    assert outputs['pred_logits'].grad.abs().sum() > 0 and outputs['pred_boxes'].grad[0, 0].abs().sum() > 0
    assert outputs['pred_boxes'].grad[0, 1].abs().sum() == 0  # unmatched box gets no box loss


def test_box_losses_are_divided_by_number_of_targets_in_batch():
    g = torch.Generator().manual_seed(0)
    outputs = {'pred_logits': torch.randn(2, 5, 4, generator=g),
               'pred_boxes': 0.3 + 0.4 * torch.rand(2, 5, 4, generator=g)}
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {'labels': torch.tensor([0, 2]), 'boxes': torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.7, 0.4, 0.1, 0.3]])}]
    crit = criterion(num_classes=3)
    losses = crit(outputs, targets)
    indices = crit.matcher(outputs, targets)
    l1 = sum((outputs['pred_boxes'][b, src] - t['boxes'][tgt]).abs().sum()
             for b, ((src, tgt), t) in enumerate(zip(indices, targets)))
    assert losses['loss_bbox'].item() == pytest.approx(l1.item() / 3, abs=1e-6)


def test_batch_without_targets():
    outputs, _ = hand_case()
    losses = criterion()(outputs, [{'labels': torch.zeros(0, dtype=torch.int64), 'boxes': torch.zeros(0, 4)}])
    # every query should say no-object; the weights cancel in the weighted mean
    ce = -(log_softmax(LOGITS[0])[2] + log_softmax(LOGITS[1])[2]) / 2
    assert losses['loss_ce'].item() == pytest.approx(ce, abs=1e-6)
    assert losses['loss_bbox'].item() == 0 and losses['loss_giou'].item() == 0
    assert losses['class_error'].item() == 100   # as DETR: no matched query counts as all wrong
    assert losses['cardinality_error'].item() == 1  # query 0 predicts an object that is not there


def test_aux_outputs_get_their_own_matching_and_suffixed_losses():
    outputs, targets = hand_case()
    swapped = {'pred_logits': outputs['pred_logits'].flip(1), 'pred_boxes': outputs['pred_boxes'].flip(1)}
    outputs['aux_outputs'] = [swapped, dict(swapped)]
    crit = criterion()
    losses = crit(outputs, targets)
    alone = crit({k: v for k, v in outputs.items() if k != 'aux_outputs'}, targets)
    final = ['loss_ce', 'loss_bbox', 'loss_giou', 'cardinality_error']
    assert set(losses) == set(alone) | {f'{k}_{i}' for k in final for i in (0, 1)}
    for k in final:
        assert losses[k] == alone[k]
        # the queries are swapped in the aux outputs, so the matching follows and the losses agree
        torch.testing.assert_close(losses[f'{k}_0'], alone[k])
        torch.testing.assert_close(losses[f'{k}_1'], alone[k])


def test_weight_dict_and_no_object_weight():
    crit = criterion(num_classes=4)
    assert crit.weight_dict == {
        'loss_ce': 1, 'loss_bbox': 5, 'loss_giou': 2,
        'loss_ce_0': 1, 'loss_bbox_0': 5, 'loss_giou_0': 2,
        'loss_ce_1': 1, 'loss_bbox_1': 5, 'loss_giou_1': 2}
    assert crit.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.1])
    assert 'empty_weight' in crit.state_dict()
    assert isinstance(crit.matcher, HungarianMatcher)
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (1, 5, 2)
    assert criterion(aux_loss=False).weight_dict == {'loss_ce': 1, 'loss_bbox': 5, 'loss_giou': 2}


def distributed_worker(rank, init_file, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        n = 1 if rank == 0 else 3
        outputs = {'pred_logits': torch.zeros(1, 4, 3), 'pred_boxes': torch.full((1, 4, 4), 0.5)}
        boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).repeat(n, 1)
        boxes[:, 0] = 0.4  # each matched pair has L1 = 0.1
        targets = [{'labels': torch.zeros(n, dtype=torch.int64), 'boxes': boxes}]
        results[rank] = criterion()(outputs, targets)['loss_bbox'].item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch
def test_num_boxes_averaged_over_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(distributed_worker, args=(str(tmp_path / 'init'), results), nprocs=2)
    # 1 and 3 targets: 2 boxes per process on average
    assert results[0] == pytest.approx(0.1 * 1 / 2, abs=1e-6)
    assert results[1] == pytest.approx(0.1 * 3 / 2, abs=1e-6)


def _layer_losses_one_at_a_time(crit, logits, boxes, targets):
    """Each decoder layer's losses as published DETR computes them, one layer at a time: its own matching,
    F.cross_entropy with the no-object weight, L1 and the diagonal of torchvision's pairwise GIoU."""
    from torchvision.ops import generalized_box_iou

    from detr_irpe.box_ops import box_cxcywh_to_xyxy
    num_boxes = sum(len(t['labels']) for t in targets)
    out = []
    for d in range(len(logits)):
        indices = crit.matcher({'pred_logits': logits[d], 'pred_boxes': boxes[d]}, targets)
        image = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(indices)])
        query = torch.cat([i for i, _ in indices])
        labels = torch.cat([t['labels'][j] for t, (_, j) in zip(targets, indices)])
        classes = torch.full(logits.shape[1:3], crit.num_classes, dtype=torch.int64)
        classes[image, query] = labels
        src = boxes[d][image, query]
        tgt = torch.cat([t['boxes'][j] for t, (_, j) in zip(targets, indices)])
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        num_predicted = (logits[d].argmax(-1) != crit.num_classes).sum(1).float()
        num_targets = torch.tensor([len(t['labels']) for t in targets], dtype=torch.float)
        out.append({'loss_ce': torch.nn.functional.cross_entropy(logits[d].transpose(1, 2), classes, crit.empty_weight),
                    'loss_bbox': (src - tgt).abs().sum() / num_boxes, 'loss_giou': (1 - giou).sum() / num_boxes,
                    'cardinality_error': (num_predicted - num_targets).abs().mean(),
                    'class_error': 100 - 100 * (logits[d][image, query].argmax(-1) == labels).float().mean()})
    return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_all_layers_at_once_equal_each_layer_alone_with_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    D, B, Q, C = 4, 3, 7, 5
    logits = torch.randn(D, B, Q, C + 1, generator=g, requires_grad=True)
    boxes = (0.2 + 0.6 * torch.rand(D, B, Q, 4, generator=g)).requires_grad_()
    targets = [{'labels': torch.randint(0, C, (n,), generator=g),
                'boxes': torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g), 0.1 + 0.3 * torch.rand(n, 2, generator=g)], 1)}
               for n in (2, 0, 5)]  # an image without targets in the middle
    crit = criterion(num_classes=C, dec_layers=D)
    outputs = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1],
               'aux_outputs': [{'pred_logits': logits[d], 'pred_boxes': boxes[d]} for d in range(D - 1)]}
    losses = crit(outputs, targets)
    expected = _layer_losses_one_at_a_time(crit, logits.detach(), boxes.detach(), targets)
    for d, layer in enumerate(expected):
        for k, v in layer.items():
            if k == 'class_error' and d < D - 1:
                assert f'{k}_{d}' not in losses  # logged for the final layer only
                continue
            torch.testing.assert_close(losses[k if d == D - 1 else f'{k}_{d}'], v, rtol=1e-6,
                                       atol=1e-4 if k == 'class_error' else 1e-7)  # a percentage
    total = sum(losses[k] * w for k, w in crit.weight_dict.items())
    grads = torch.autograd.grad(total, (logits, boxes))
    leaves = (logits.detach().requires_grad_(), boxes.detach().requires_grad_())
    expected = _layer_losses_one_at_a_time(crit, *leaves, targets)
    total = sum(layer[k] * crit.weight_dict[k] for layer in expected for k in ('loss_ce', 'loss_bbox', 'loss_giou'))
    for got, want in zip(grads, torch.autograd.grad(total, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
