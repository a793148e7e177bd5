"""DETR's set prediction loss (Sec. 3.1, Eq. 2): Hungarian-match predictions to targets, then
classification loss on every query and box losses on the matched ones.

Logged, not trained on: 'class_error' (top-1 error in % on matched queries) and
'cardinality_error' (L1 between the number of predicted objects and of targets).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from .matcher import build_matcher


class SetCriterion(nn.Module):
    """losses: a subset of ('labels', 'boxes', 'cardinality'). weight_dict maps loss names to
    weights; it is kept here for the training loop and not applied in forward."""

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict, eos_coef: float,
                 losses: list[str]):
        super().__init__()
        unknown = set(losses) - {'labels', 'boxes', 'cardinality'}
        if unknown:
            raise ValueError(f"Unknown losses {sorted(unknown)}; expected 'labels', 'boxes', 'cardinality'")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        # The no-object class (index num_classes) is down-weighted: most queries are empty.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer('empty_weight', empty_weight)

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        """outputs: 'pred_logits' (B, Q, num_classes + 1), 'pred_boxes' (B, Q, 4) normalised cxcywh,
        optionally 'aux_outputs': a list of such dicts, one per intermediate decoder layer.
        targets: B dicts with 'labels' (N_b,) int64 and 'boxes' (N_b, 4) normalised cxcywh.
        Returns a dict of scalar losses; those of aux_outputs[i] carry the suffix `_{i}`.

        Every decoder layer is matched on its own, but all layers' losses are computed together, stacked as
        (D, B, Q, ...): a few hundred GPU kernels a step instead of a few thousand (the step is bound by
        the host launching them, docs/performance.md)."""
        layers = outputs.get('aux_outputs', []) + [outputs]  # the final layer last
        logits = torch.stack([o['pred_logits'] for o in layers])  # (D, B, Q, num_classes + 1)
        boxes = torch.stack([o['pred_boxes'] for o in layers])  # (D, B, Q, 4)
        matched = self.matched(self.matcher.match_layers(logits, boxes, targets), targets, logits.device)
        num_boxes = self.average_num_boxes(targets, logits.device)
        tgt_labels = torch.cat([t['labels'] for t in targets])
        per_layer = {}
        if 'labels' in self.losses:
            per_layer.update(self.loss_labels(logits, tgt_labels, matched))
        if 'boxes' in self.losses:
            per_layer.update(self.loss_boxes(boxes, torch.cat([t['boxes'] for t in targets]), matched, num_boxes))
        if 'cardinality' in self.losses:
            per_layer.update(self.loss_cardinality(logits, targets))
        D = len(layers)
        losses = {f'{k}_{i}' if i < D - 1 else k: v[i] for k, v in per_layer.items() for i in range(D)}
        if 'labels' in self.losses:  # the final layer's pairs: the last of D equal runs (no boolean mask: no sync)
            _, image, query, target = matched[:, matched.shape[1] - matched.shape[1] // D:]
            losses['class_error'] = 100 - top1_accuracy(logits[-1][image, query], tgt_labels[target])
        return losses

    @staticmethod
    def matched(indices, targets, device) -> Tensor:
        """(4, P) int64 on device: layer, image, query and target (an index into the targets of all images
        concatenated) of every matched pair, layer by layer, images in order; one copy from the host."""
        offsets = [0]
        for t in targets[:-1]:
            offsets.append(offsets[-1] + len(t['labels']))
        rows = [torch.stack([torch.full_like(i, d), torch.full_like(i, b), i, j + offsets[b]])
                for d, layer in enumerate(indices) for b, (i, j) in enumerate(layer)]
        return torch.cat(rows, 1).to(device)

    def loss_labels(self, logits, tgt_labels, matched) -> dict:
        """Cross-entropy over all queries of each layer (weighted mean, as F.cross_entropy's); unmatched queries
        target the no-object class."""
        layer, image, query, target = matched
        target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[layer, image, query] = tgt_labels[target]
        nll = F.cross_entropy(logits.flatten(0, 2), target_classes.flatten(), self.empty_weight, reduction='none')
        weights = self.empty_weight[target_classes]
        return {'loss_ce': nll.view(len(logits), -1).sum(1) / weights.view(len(logits), -1).sum(1)}

    @torch.no_grad()
    def loss_cardinality(self, logits, targets) -> dict:
        """L1 error between the number of non-empty predictions and of targets, per image, averaged."""
        # counted on the device: a tensor copied from the host's pageable memory would wait for the GPU
        num_targets = torch.stack([torch.full((), len(t['labels']), device=logits.device) for t in targets])
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1)  # (D, B)
        return {'cardinality_error': (num_predicted.float() - num_targets.float()).abs().mean(1)}

    def loss_boxes(self, boxes, tgt_boxes, matched, num_boxes) -> dict:
        """L1 on normalised cxcywh and 1 - GIoU, summed over each layer's matched pairs, divided by num_boxes.
        Every layer matches the same number of pairs, so a layer's pairs are one row of a (D, P) view."""
        layer, image, query, target = matched
        D = len(boxes)
        src_boxes, target_boxes = boxes[layer, image, query], tgt_boxes[target]
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction='none').view(D, -1).sum(1)
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        return {'loss_bbox': loss_bbox / num_boxes, 'loss_giou': (1 - giou).view(D, -1).sum(1) / num_boxes}

    @staticmethod
    def average_num_boxes(targets, device) -> float | Tensor:
        """Number of target boxes per process, averaged over processes, at least 1: a float in one process, else a
        0-dim tensor on device, reduced on the collective's device and never read back (a read waits for the GPU)."""
        num_boxes = float(sum(len(t['labels']) for t in targets))
        if not distributed.is_distributed():
            return max(num_boxes, 1.0)
        # made by a fill, not copied from the host: a copy from pageable memory would wait for the GPU
        reduced = distributed.all_reduce_mean_(torch.full((), num_boxes, device=distributed.process_device()))
        return reduced.clamp(min=1).to(device)


def top1_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Percentage of rows of logits (N, C) whose argmax is labels (N,); 0 when N == 0 (as DETR)."""
    if labels.numel() == 0:
        return torch.zeros([], device=logits.device)
    return (logits.argmax(-1) == labels).float().mean() * 100


def build_criterion(args, num_classes: int) -> SetCriterion:
    """num_classes: the number of real classes (the no-object class is added on top)."""
    final = {'loss_ce': 1, 'loss_bbox': args.bbox_loss_coef, 'loss_giou': args.giou_loss_coef}
    weight_dict = dict(final)
    if args.aux_loss:  # one copy per intermediate decoder layer
        weight_dict.update({f'{k}_{i}': v for i in range(args.dec_layers - 1) for k, v in final.items()})
    return SetCriterion(num_classes, build_matcher(args), weight_dict, eos_coef=args.eos_coef,
                        losses=['labels', 'boxes', 'cardinality'])
