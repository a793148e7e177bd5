"""DETR's set prediction loss (Sec. 3.1, Eq. 2): Hungarian-match predictions to targets, then
classification loss on every query and box losses on the matched ones.

Logged, not trained on: 'class_error' (top-1 error in % on matched queries) and
'cardinality_error' (L1 between the number of predicted objects and of targets).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from . import distributed
from .box_ops import box_cxcywh_to_xyxy
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

    @staticmethod
    def matched_queries(indices) -> tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched prediction, images in order."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True) -> dict:
        """Cross-entropy over all queries; unmatched queries target the no-object class."""
        logits = outputs['pred_logits']  # (B, Q, num_classes + 1)
        idx = self.matched_queries(indices)
        matched_labels = torch.cat([t['labels'][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[idx] = matched_labels
        losses = {'loss_ce': F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            losses['class_error'] = 100 - top1_accuracy(logits[idx], matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes) -> dict:
        """L1 error between the number of non-empty predictions and of targets, per image."""
        logits = outputs['pred_logits']
        num_targets = torch.as_tensor([len(t['labels']) for t in targets], device=logits.device)
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {'cardinality_error': F.l1_loss(num_predicted.float(), num_targets.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict:
        """L1 on normalised cxcywh and 1 - GIoU, summed over matched pairs, divided by num_boxes."""
        idx = self.matched_queries(indices)
        src_boxes = outputs['pred_boxes'][idx]
        target_boxes = torch.cat([t['boxes'][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction='none')
        # diag of the pairwise GIoU, not generalized_box_iou_loss: the latter adds an epsilon
        # that published DETR does not have.
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {'loss_bbox': loss_bbox.sum() / num_boxes, 'loss_giou': (1 - giou).sum() / num_boxes}

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs) -> dict:
        fn = {'labels': self.loss_labels, 'cardinality': self.loss_cardinality, 'boxes': self.loss_boxes}[loss]
        return fn(outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        """outputs: 'pred_logits' (B, Q, num_classes + 1), 'pred_boxes' (B, Q, 4) normalised cxcywh,
        optionally 'aux_outputs': a list of such dicts, one per intermediate decoder layer.
        targets: B dicts with 'labels' (N_b,) int64 and 'boxes' (N_b, 4) normalised cxcywh.
        Returns a dict of scalar losses; those of aux_outputs[i] carry the suffix `_{i}`."""
        final_outputs = {k: v for k, v in outputs.items() if k != 'aux_outputs'}
        indices = self.matcher(final_outputs, targets)
        num_boxes = self.average_num_boxes(targets)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        for i, aux_outputs in enumerate(outputs.get('aux_outputs', [])):
            indices = self.matcher(aux_outputs, targets)
            for loss in self.losses:
                kwargs = {'log': False} if loss == 'labels' else {}
                aux_losses = self.get_loss(loss, aux_outputs, targets, indices, num_boxes, **kwargs)
                losses.update({f'{k}_{i}': v for k, v in aux_losses.items()})
        return losses

    @staticmethod
    def average_num_boxes(targets) -> float:
        """Number of target boxes per process, averaged over processes, at least 1."""
        # Through distributed.all_reduce_mean: its tensor is on the process's device (CUDA under nccl).
        num_boxes = float(sum(len(t['labels']) for t in targets))
        return max(distributed.all_reduce_mean({'num_boxes': num_boxes})['num_boxes'], 1.0)


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
