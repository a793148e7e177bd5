"""Box format conversions used by the matcher, the criterion and the post-processor.

DETR predicts boxes as normalised (cx, cy, w, h); IoU-type costs and outputs in pixels
need corners (x1, y1, x2, y2). Everything else (IoU, GIoU, areas) comes from torchvision.ops.
"""
from torch import Tensor
from torchvision.ops import box_convert


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    return box_convert(boxes, in_fmt='cxcywh', out_fmt='xyxy')


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    return box_convert(boxes, in_fmt='xyxy', out_fmt='cxcywh')
