"""Turn DETR's outputs into detections in image pixels (the format of the COCO evaluator)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """outputs: 'pred_logits' (B, Q, num_classes + 1), 'pred_boxes' (B, Q, 4) normalised cxcywh.
        target_sizes: (B, 2) as [h, w] of each original image.
        Returns B dicts with 'scores' (Q,), 'labels' (Q,) — the most likely real class, the
        no-object class excluded — and 'boxes' (Q, 4) xyxy in pixels."""
        if len(outputs['pred_logits']) != len(target_sizes):
            raise ValueError(f"{len(outputs['pred_logits'])} predictions but {len(target_sizes)} target sizes")
        prob = F.softmax(outputs['pred_logits'], -1)
        scores, labels = prob[..., :-1].max(-1)

        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (B, 4)
        boxes = box_cxcywh_to_xyxy(outputs['pred_boxes']) * scale[:, None, :]
        return [{'scores': s, 'labels': l, 'boxes': b} for s, l, b in zip(scores, labels, boxes)]
