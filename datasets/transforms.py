"""DETR's image and box augmentation, built from torchvision.transforms.v2.

Inputs are `(PIL image, target)` with `target['boxes']` a `tv_tensors.BoundingBoxes` in XYXY pixels;
torchvision moves the boxes with the image. Outputs are `(image (3, H, W) float normalised with ImageNet
mean/std, target)` with boxes still in XYXY pixels of the transformed image (the dataset turns them into
normalised cxcywh at the very end).

Training (Carion et al. 2020, Sec. 4): horizontal flip with p=0.5, then with p=0.5 either
  - resize the shorter side to a random s in `train_scales` (longer side at most `train_max_size`), or
  - resize the shorter side to a random s in `crop_scales`, crop a random h x w patch with h, w drawn in
    `crop_size` (capped by the image), then the same random resize as above.
Validation: shorter side `val_size`, longer side at most `val_max_size`.
"""
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class RandomSizeCrop(v2.Transform):
    """DETR's RandomSizeCrop: crop height and width each drawn uniformly from [min_size, max_size]
    (capped by the image side), at a uniformly random position. torchvision's RandomCrop has a fixed size
    and RandomResizedCrop resizes afterwards, hence this class; the crop itself is torchvision's, which
    also clips the boxes to the crop."""

    def __init__(self, min_size, max_size):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs):
        h, w = query_size(flat_inputs)
        crop_h = int(torch.randint(min(self.min_size, h), min(self.max_size, h) + 1, ()))
        crop_w = int(torch.randint(min(self.min_size, w), min(self.max_size, w) + 1, ()))
        top = int(torch.randint(0, h - crop_h + 1, ()))
        left = int(torch.randint(0, w - crop_w + 1, ()))
        return dict(top=top, left=left, height=crop_h, width=crop_w)

    def transform(self, inpt, params):
        return self._call_kernel(F.crop, inpt, **params)


def random_resize(scales, max_size=None):
    """Shorter side to a random s in `scales`; if the longer side would exceed max_size, it becomes max_size."""
    return v2.RandomChoice([resize(s, max_size) for s in scales])


def resize(size, max_size=None):
    """Shorter side to `size`, the longer at most max_size: no random draw (validation must not move the global
    generator that training's dropout draws from, or a run resumed after an evaluation would differ)."""
    if max_size is not None and max_size <= size:
        raise ValueError(f'the maximum size {max_size} must be larger than the resize scale {size}; '
                         f'raise the maximum size or lower the scales')
    return Resize(size, max_size)


class Resize(v2.Transform):
    """The image and its boxes to resized_size: the published code's sizes. torchvision's Resize(size, max_size)
    rounds a capped image otherwise (640x360 at 800 / 1333: 1333x749 there, 1333x750 here and in DETR)."""

    def __init__(self, size, max_size=None):
        super().__init__()
        self.size, self.max_size = size, max_size

    def make_params(self, flat_inputs):
        return dict(size=list(resized_size(*query_size(flat_inputs), self.size, self.max_size)))

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, size=params['size'])


def resized_size(height, width, size, max_size=None):
    """(height, width) with the shorter side `size` and the longer in proportion, rounded down; where the longer
    would pass max_size, the shorter becomes round(max_size * shorter / longer) first (Python's round, half to
    even), so the longer may end a pixel below max_size. An image whose shorter side is `size` keeps its size.
    Beyond 2:1, where that rounding went up, the published code's longer side passes max_size by a pixel or more:
    here it stops at max_size, as the flags promise (a learned position encoding has no row for more)."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    longer = int(size * long / short)
    if max_size is not None:
        longer = min(longer, max_size)
    return (longer, size) if width < height else (size, longer)


def normalize():
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def drop_empty_boxes(image, target):
    """The boxes a crop left without width or height go, with their labels and iscrowd: the published code's rule.
    (torchvision's SanitizeBoundingBoxes also drops those under a pixel, which DETR trains on.)"""
    boxes = target['boxes']
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if bool(keep.all()):
        return image, target
    return image, {**target, 'boxes': tv_tensors.wrap(boxes[keep], like=boxes), 'labels': target['labels'][keep],
                   'iscrowd': target['iscrowd'][keep]}


def make_transforms(image_set, train_scales=tuple(range(480, 801, 32)), train_max_size=1333,
                    crop_scales=(400, 500, 600), crop_size=(384, 600), val_size=800, val_max_size=1333):
    if image_set == 'train':
        return v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomChoice([
                random_resize(train_scales, train_max_size),
                v2.Compose([
                    random_resize(crop_scales),
                    RandomSizeCrop(*crop_size),
                    random_resize(train_scales, train_max_size),
                ]),
            ]),
            drop_empty_boxes,
            normalize(),
        ])
    if image_set == 'val':
        return v2.Compose([resize(val_size, val_max_size), normalize()])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")


def boxes_to_normalized_cxcywh(boxes: tv_tensors.BoundingBoxes):
    """(N, 4) boxes in pixels of their canvas -> plain float32 (N, 4) cxcywh in [0, 1] of that canvas."""
    h, w = boxes.canvas_size
    cxcywh = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    return cxcywh.as_subclass(torch.Tensor).float() / torch.tensor([w, h, w, h], dtype=torch.float32)
