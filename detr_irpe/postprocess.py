"""Turn DETR's outputs into detections in image pixels (the format of the COCO evaluator)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    def __init__(self, category_ids=None):
        """category_ids: the labels a detection may take (a dataset's category ids); None: every class."""
        super().__init__()
        self.category_ids = None if category_ids is None else sorted(category_ids)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """outputs: 'pred_logits' (B, Q, num_classes + 1), 'pred_boxes' (B, Q, 4) normalised cxcywh.
        target_sizes: (B, 2) as [h, w] of each original image (a tensor, or B pairs as transformers takes them).
        Returns B dicts with 'scores' (Q,), 'labels' (Q,) — the most likely real class (of category_ids), the
        no-object class excluded — and 'boxes' (Q, 4) xyxy in pixels: every query, unsorted, as DETR's; keep
        those with a score above a threshold."""
        if not isinstance(target_sizes, Tensor):  # pairs, or (2,) tensors such as targets' 'orig_size'
            target_sizes = torch.tensor([[int(v) for v in size] for size in target_sizes])
        target_sizes = target_sizes.to(outputs['pred_boxes'].device)
        if target_sizes.shape != (len(outputs['pred_logits']), 2):
            raise ValueError(f"target_sizes has shape {tuple(target_sizes.shape)} for {len(outputs['pred_logits'])} "
                             "images' predictions; expected (B, 2), each image's [height, width].")
        prob = F.softmax(outputs['pred_logits'], -1)[..., :-1]
        if self.category_ids is not None:  # the other classes' probabilities out of the running
            outside = [i for i in self.category_ids if not 0 <= i < prob.shape[-1]]
            if outside:
                raise ValueError(f'category ids {outside} outside the {prob.shape[-1]} classes of the model')
            keep = torch.zeros(prob.shape[-1], dtype=torch.bool, device=prob.device)
            keep[self.category_ids] = True
            prob = prob.masked_fill(~keep, 0.0)
        scores, labels = prob.max(-1)

        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (B, 4)
        boxes = box_cxcywh_to_xyxy(outputs['pred_boxes']) * scale[:, None, :]
        return [{'scores': s, 'labels': l, 'boxes': b} for s, l, b in zip(scores, labels, boxes)]


def coco_results(image_id, detections, min_score=0.0, rounded=True):
    """COCO results entries (image_id, category_id, bbox [x, y, w, h], score) of one image's detections
    ('scores', 'labels', 'boxes' xyxy in pixels, as PostProcess returns them), those with score >= min_score.

    rounded: bbox to 0.01 px and score to 4 decimals, for files people read; the evaluator keeps full precision.
    """
    out = []
    for score, label, (x0, y0, x1, y1) in zip(detections['scores'].tolist(), detections['labels'].tolist(),
                                              detections['boxes'].tolist()):
        if score >= min_score:
            bbox, score = [x0, y0, x1 - x0, y1 - y0], float(score)
            if rounded:
                bbox, score = [round(v, 2) for v in bbox], round(score, 4)
            out.append({'image_id': int(image_id), 'category_id': int(label), 'bbox': bbox, 'score': score})
    return out
