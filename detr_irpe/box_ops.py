"""Box format conversions used by the matcher, the criterion and the post-processor.

DETR predicts boxes as normalised (cx, cy, w, h); IoU-type costs and outputs in pixels
need corners (x1, y1, x2, y2). Everything else (IoU, GIoU, areas) comes from torchvision.ops.
"""
import torch
from torch import Tensor
from torchvision.ops import box_convert


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    return box_convert(boxes, in_fmt='cxcywh', out_fmt='xyxy')


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    return box_convert(boxes, in_fmt='xyxy', out_fmt='cxcywh')


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of boxes1[k] and boxes2[k], (N, 4) float corner boxes each: the diagonal of torchvision's
    generalized_box_iou(boxes1, boxes2), by the same arithmetic (the same bits), without its N x N matrix."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    whi = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    areai = whi[:, 0] * whi[:, 1]
    return iou - (areai - union) / areai
