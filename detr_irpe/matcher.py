"""Bipartite matching between predictions and ground truth (DETR, Sec. 3.1, Eq. 1).

The matching cost of query i and target j is
    cost_bbox * ||b_i - b_j||_1  -  cost_class * p_i(c_j)  -  cost_giou * GIoU(b_i, b_j),
with boxes in normalised cxcywh for the L1 term and in xyxy for GIoU; the assignment of minimal
total cost is found per image by the Hungarian algorithm. Unmatched queries predict "no object".
"""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from .box_ops import box_cxcywh_to_xyxy


class NonFiniteCostError(FloatingPointError):
    """The matching costs hold nan or inf, so the predictions do: the Hungarian algorithm cannot take them."""


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("All matching costs are 0; set at least one of "
                             "--set_cost_class, --set_cost_bbox, --set_cost_giou")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: 'pred_logits' (B, Q, num_classes + 1), 'pred_boxes' (B, Q, 4) cxcywh.
        targets: B dicts with 'labels' (N_b,) int64 and 'boxes' (N_b, 4) cxcywh.
        Returns B pairs (query indices, target indices), each int64 of length min(Q, N_b),
        with query i matched to target j. Raises NonFiniteCostError for predictions with nan or inf."""
        return self.match_layers(outputs['pred_logits'][None], outputs['pred_boxes'][None], targets)[0]

    @torch.no_grad()
    def match_layers(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]) -> list[list[tuple]]:
        """forward for D decoder layers at once: logits (D, B, Q, num_classes + 1), boxes (D, B, Q, 4); one cost
        computation and one copy to the host for all of them (each copy waits for the GPU). Returns D lists as
        forward returns."""
        D, B, Q = logits.shape[:3]
        # All layers and images at once: a (D*B*Q, sum N_b) cost matrix, then split per layer and image.
        prob = logits.flatten(0, 2).softmax(-1)
        out_boxes = boxes.flatten(0, 2)
        tgt_labels = torch.cat([t['labels'] for t in targets])
        tgt_boxes = torch.cat([t['boxes'] for t in targets])

        cost_class = -prob[:, tgt_labels]
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(D, B, Q, -1).cpu()
        if not torch.isfinite(cost).all():  # checked on the host's copy: no wait for the GPU of its own
            raise NonFiniteCostError('the matching costs hold nan or inf: the predicted logits or boxes are not finite')

        sizes = [len(t['boxes']) for t in targets]
        return [[tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(c[b]))
                 for b, c in enumerate(layer.split(sizes, -1))] for layer in cost]


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
