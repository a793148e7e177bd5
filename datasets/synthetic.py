"""A built-in detection dataset of drawn shapes, written once to disk in the COCO layout.

Filled shapes (circle, square, triangle, cross, ring, diamond, star, hexagon; the first `num_classes` are
used, category ids 1..num_classes) in bright random colours on a dark, noisy, shaded background; each fills a
box whose size sqrt(w h) is drawn in `object_size` (fractions of the image side) and whose aspect ratio is in
3/4..4/3. Objects overlap by less than a quarter of the smaller box (a placement failing 50 tries is given up,
so an image may hold fewer than `objects[0]`); boxes are tight around the drawn pixels. Every
image and annotation follows from (seed, split, image index) alone, so two generations are byte-identical.
The folder is read back through datasets.coco exactly like COCO, so a demo run exercises the real path.

`meta.json` in the folder stores the settings; a folder made with other settings is regenerated.
"""
import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'cross', 'ring', 'diamond', 'star', 'hexagon')
GENERATOR_VERSION = 1  # bump when the drawing changes, so old caches are regenerated
MAX_OVERLAP = 0.25  # of the smaller box's area, so no object is hidden behind another


def polygon(kind, x0, y0, x1, y1):
    """Vertices of a shape filling the box (x0, y0, x1, y1)."""
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == 'triangle':
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == 'diamond':
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if kind in ('star', 'hexagon'):
        n, inner = (5, 0.45) if kind == 'star' else (6, 1.0)
        angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n
        radius = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radius)]
    if kind == 'cross':
        tx, ty = rx / 3, ry / 3
        return [(cx - tx, y0), (cx + tx, y0), (cx + tx, cy - ty), (x1, cy - ty), (x1, cy + ty), (cx + tx, cy + ty),
                (cx + tx, y1), (cx - tx, y1), (cx - tx, cy + ty), (x0, cy + ty), (x0, cy - ty), (cx - tx, cy - ty)]
    raise ValueError(kind)


def draw_shape(kind, size, box):
    """Binary mask (H, W) of one shape filling `box` = (x0, y0, x1, y1) in an image of `size` = (W, H)."""
    mask = Image.new('L', size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if kind in ('circle', 'ring'):
        draw.ellipse(box, fill=255)
        if kind == 'ring':
            tx, ty = (x1 - x0) * 0.22, (y1 - y0) * 0.22
            draw.ellipse((x0 + tx, y0 + ty, x1 - tx, y1 - ty), fill=0)
    elif kind == 'square':
        draw.rectangle(box, fill=255)
    else:
        draw.polygon(polygon(kind, *box), fill=255)
    return np.asarray(mask) > 0


def overlap(a, b):
    """Intersection of boxes a and b over the area of the smaller one."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def make_image(rng, image_size, num_classes, objects, object_size):
    """One image (H, W, 3) uint8 and its objects [(category_id, mask)] drawn back to front."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    base = rng.uniform(20, 90, size=3)
    tilt = rng.uniform(-30, 30, size=(2, 3))
    image = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1] + rng.normal(0, 8, size=(s, s, 3))
    placed = []
    for _ in range(rng.integers(objects[0], objects[1] + 1)):
        for _attempt in range(50):
            side = rng.uniform(*object_size) * s
            aspect = np.sqrt(rng.uniform(0.75, 1.33))  # w / h = aspect ** 2
            w, h = min(side * aspect, s - 1), min(side / aspect, s - 1)
            x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(overlap(box, other) < MAX_OVERLAP for _, other in placed):
                placed.append((int(rng.integers(1, num_classes + 1)), box))
                break
    objects_out = []
    for category_id, box in placed:
        mask = draw_shape(SHAPES[category_id - 1], (s, s), box)
        hue = rng.uniform(0, 1)
        colour = 255 * np.array([np.clip(abs(6 * hue - 3) - 1, 0, 1), np.clip(2 - abs(6 * hue - 2), 0, 1),
                                 np.clip(2 - abs(6 * hue - 4), 0, 1)])  # fully saturated hue
        colour = 0.35 * 255 + 0.65 * colour  # brighter than any background
        image[mask] = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
        objects_out.append((category_id, mask))
    return np.clip(image, 0, 255).round().astype(np.uint8), objects_out


def write_split(root, split, split_index, num_images, settings):
    folder = root / f'{split}2017'
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([settings['seed'], split_index, i])
        pixels, objects = make_image(rng, settings['image_size'], settings['num_classes'],
                                     settings['objects'], settings['object_size'])
        image_id = i + 1
        file_name = f'{image_id:06d}.jpg'
        Image.fromarray(pixels).save(folder / file_name, quality=95)
        images.append({'id': image_id, 'file_name': file_name, 'width': pixels.shape[1], 'height': pixels.shape[0]})
        for category_id, mask in objects:
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            # the box covers whole pixels: right edge is the last column + 1
            x, y = int(xs.min()), int(ys.min())
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id, 'category_id': category_id,
                                'bbox': [x, y, int(xs.max()) + 1 - x, int(ys.max()) + 1 - y],
                                'area': int(mask.sum()), 'iscrowd': 0})
    categories = [{'id': k + 1, 'name': SHAPES[k], 'supercategory': 'shape'} for k in range(settings['num_classes'])]
    (root / 'annotations').mkdir(exist_ok=True)
    with open(root / 'annotations' / f'instances_{split}2017.json', 'w') as f:
        json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f, sort_keys=True)


def ensure_synthetic_coco(root, num_train=1000, num_val=100, image_size=128, num_classes=4, objects=(1, 3),
                          object_size=(0.2, 0.45), seed=0):
    """Make (or reuse) the dataset at `root` in the COCO layout and return `root` as a Path."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f'synthetic_classes {num_classes} must be between 1 and {len(SHAPES)} ({", ".join(SHAPES)})')
    if not 0 <= objects[0] <= objects[1]:
        raise ValueError(f'synthetic_objects {objects} must be min max with 0 <= min <= max')
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f'synthetic_object_size {object_size} must be min max fractions of the image side, '
                         f'0 < min <= max <= 1')
    settings = {'version': GENERATOR_VERSION, 'num_train': int(num_train), 'num_val': int(num_val),
                'image_size': int(image_size), 'num_classes': int(num_classes),
                'objects': [int(v) for v in objects], 'object_size': [float(v) for v in object_size],
                'seed': int(seed)}
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # One process at a time makes or checks the folder (e.g. the runs of a parallel sweep): the others
    # wait here, then find it made. Without this, a later process replaced the folder another was reading.
    with open(root.with_name(f'{root.name}.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = root / 'meta.json'
        if meta.is_file() and json.loads(meta.read_text()) == settings:
            return root
        if root.exists() and not meta.is_file() and any(root.iterdir()):
            raise FileExistsError(f'synthetic_dir {root} is not empty and was not made by this generator (no '
                                  f'meta.json); refusing to overwrite it, choose another --synthetic_dir')
        # Generate next to the target and move it in place, so that an interrupted run never leaves a
        # half-written folder that looks complete.
        tmp = root.with_name(f'{root.name}.tmp{os.getpid()}')
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_split(tmp, 'train', 0, num_train, settings)
        write_split(tmp, 'val', 1, num_val, settings)
        (tmp / 'meta.json').write_text(json.dumps(settings, sort_keys=True))
        shutil.rmtree(root, ignore_errors=True)  # made with other settings
        os.rename(tmp, root)
    return root
