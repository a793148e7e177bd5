"""COCO-format detection, read with pycocotools: in COCO's layout (build) or from any annotation file and image
folder (build_from_files).

    coco_path/
      train2017/ or train2017.zip (holding train2017/xxx.jpg)
      val2017/   or val2017.zip   (holding val2017/xxx.jpg)
      annotations/instances_train2017.json, annotations/instances_val2017.json

Each sample is `(image (3, H, W) float normalised, target)` with
  boxes     float32 (N, 4) cxcywh in [0, 1] of the transformed image
  labels    int64 (N,) raw COCO category ids (num_classes = max id + 1, 91 for COCO)
  image_id  int64 scalar
  area      float32 (N,) box area in pixels of the transformed image
  iscrowd   int64 (N,) zeros: crowd annotations are dropped, as in DETR, for train and val alike
  orig_size int64 (2,) [h, w] of the image file;  size int64 (2,) [h, w] after the transforms
Images without objects are kept (N = 0). Every image is decoded to 8-bit RGB by to_rgb8: grayscale, CMYK and
palette images are converted, 16-bit ones scaled to 8 bits; a float image is refused (skipped, as unreadable).

Bad data (the whole policy: datasets/validate.py; evaluation uses the annotations that passed it):
  - missing folder / annotation file: UsageError naming the path and the expected layout.
  - invalid JSON, a malformed entry: what stops the run and what is skipped (warned, counted) is in validate.py.
  - an image whose pixels are not the `width` x `height` its entry gives (where it gives both): its boxes would
    land in the wrong place (images resized after annotating; a phone photo stored sideways with an EXIF
    orientation that the annotation tool applied and training, as COCO and DETR, does not): one warning per
    image id saying which and what to do; the image is read as stored, as before.
  - unreadable, truncated or missing image: a warning naming the file, the `skipped` counter goes up, and
    the next readable image in index order is returned instead (so a DataLoader worker never dies on one bad
    file and batches keep their size). `skipped` counts failed reads, in every epoch, summed over
    DataLoader workers (it lives in shared memory). If no image at all can be read: RuntimeError.
  - box with width or height <= 0: dropped. Box reaching outside the image: clipped to it, and dropped if
    nothing is left. One warning per annotation id naming the annotation file and the id; none for a box that
    reaches out by a pixel or less (float noise of annotation tools), which is clipped alone. Evaluation's ground
    truth follows the same rule (validate.box_in_image) on each evaluated image's pixel size.
Each warning of a read is given once per dataset: over DataLoader workers and epochs (flags in shared memory).
"""
import bisect
import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors

from detr_irpe import UsageError

from .transforms import boxes_to_normalized_cxcywh
from .validate import box_in_image, load_coco

MAX_WORKERS = 256
# PIL modes of 16-bit integer pixels; PIL's convert('RGB') clips them to 255 (white), so they are scaled instead
SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def to_rgb8(image, path):
    """An opened PIL image as 8-bit RGB, decoded now (so a truncated file fails here). 16-bit grayscale (the
    SIXTEEN_BIT_MODES) is scaled from 0..65535 to 0..255; alpha is dropped. UsageError naming `path` for pixels
    with no fixed range to scale from (float 'F', 32-bit 'I' beyond 0..65535) or a mode PIL cannot convert."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise UsageError(f'{path}: {image.mode!r} pixels from {pixels.min()} to {pixels.max()} are not 16-bit, '
                             f'expected 0..65535 or 8-bit colours; convert it to an 8-bit or 16-bit PNG or JPEG.')
        gray = np.rint(pixels / 257).astype(np.uint8)  # 65535 / 255 = 257: 0 -> 0, 65535 -> 255
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    why = 'float pixels have no fixed range to scale to 8 bits' if image.mode == 'F' else None
    if why is None:
        try:
            return image.convert('RGB')
        except ValueError as e:  # a mode PIL has no conversion for (e.g. 'La')
            why = str(e)
    raise UsageError(f'{path}: PIL mode {image.mode!r} cannot be read as 8-bit RGB ({why}); expected an 8-bit or '
                     '16-bit image: convert it to an 8-bit or 16-bit PNG or JPEG.')


SIZE, BOXES = 0, 1  # the warnings given once per image (CocoDetection._warned)
EXIF_ORIENTATION = 0x0112  # the tag that tells a viewer how to turn the stored pixels; 5-8 swap width and height


def size_problem(image, entry, path):
    """None, or what is wrong when the annotation file's `width` and `height` for this opened image (where it
    gives both as numbers) are not the size of its stored pixels, with the likely cause and what to do."""
    given = entry.get('width'), entry.get('height')
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given) or given == image.size:
        return None
    (w, h), (gw, gh) = image.size, given
    if given == (h, w) and image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
        why = (f'its EXIF orientation turns the stored {w}x{h} pixels to {h}x{w} on screen: the boxes were likely '
               'drawn on the turned image, which training reads as stored (as COCO and DETR do). Store the images '
               'turned (e.g. PIL: ImageOps.exif_transpose(im).save(path); or exiftran -ai *.jpg), keeping the '
               'annotations')
    else:
        why = ('its boxes may land in the wrong place (were the images resized after annotating?): train on the '
               'images that were annotated, or correct the entry\'s width and height if only they are wrong')
    return f'{path} is {w}x{h} but its annotation entry says {gw:g}x{gh:g}; {why}'


LAYOUT = ('expected coco_path/{train2017,val2017}/ (or {train2017,val2017}.zip holding {train2017,val2017}/*.jpg) '
          'and coco_path/annotations/instances_{train,val}2017.json')


class CocoDetection(torchvision.datasets.CocoDetection):
    """`root` is an image folder or a zip file whose members are `<zip stem>/<file_name>`."""

    def __init__(self, root, ann_file, transforms=None):
        # torchvision's __init__ would read the file with pycocotools, which checks nothing: ours validates it.
        torchvision.datasets.VisionDataset.__init__(self, root)
        self.ann_file = str(ann_file)
        self.coco, self.skipped_entries, self.skipped_annotations = load_coco(
            self.ann_file, self._image_finder(), f'the image folder {root}')
        self.ids = sorted(self.coco.imgs)
        self._transforms = transforms
        # failed reads per process in shared memory (slot 0: main process, 1 + i: DataLoader worker i), so the
        # count survives workers under fork and spawn alike and needs no lock
        self._skipped = torch.zeros(1 + MAX_WORKERS, dtype=torch.int64).share_memory_()
        # per image (index in self.ids), whether its size and its boxes were warned of: shared like _skipped, so
        # workers forked anew each epoch do not warn again
        self._warned = torch.zeros(len(self.ids), 2, dtype=torch.bool).share_memory_()
        self._zip, self._zip_pid = None, None

    @property
    def skipped(self):
        """Number of image reads that failed so far (all epochs, all DataLoader workers)."""
        return int(self._skipped.sum())

    def _image_finder(self):
        """file_name -> whether the image file is there: checked once at load time, so a missing file is counted
        before the model is built, not met as a warning in the middle of training."""
        if str(self.root).endswith('.zip'):
            with zipfile.ZipFile(self.root) as archive:
                members = set(archive.namelist())
            return lambda file_name: f'{Path(self.root).stem}/{file_name}' in members
        return lambda file_name: os.path.isfile(os.path.join(self.root, file_name))

    def __getstate__(self):  # an open ZipFile cannot be pickled (DataLoader workers under spawn)
        return {**self.__dict__, '_zip': None, '_zip_pid': None}

    def _load_image(self, id):
        entry = self.coco.loadImgs(id)[0]
        if str(self.root).endswith('.zip'):
            # one handle per process: forked workers must not share a file offset
            if self._zip_pid != os.getpid():
                self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
            member = f'{Path(self.root).stem}/{entry["file_name"]}'
            opened, path = Image.open(io.BytesIO(self._zip.read(member))), f'{self.root}:{member}'
        else:
            path = os.path.join(self.root, entry['file_name'])
            opened = Image.open(path)
        with opened as image:
            problem = size_problem(image, entry, path)
            if problem and self._first_warning(id, SIZE):
                warnings.warn(f'image id {id}: {problem}')
            return to_rgb8(image, path)

    def __getitem__(self, index):
        for offset in range(len(self.ids)):
            image_id = self.ids[(index + offset) % len(self.ids)]
            try:
                image = self._load_image(image_id)
            except (OSError, KeyError, zipfile.BadZipFile, Image.DecompressionBombError, UsageError) as e:
                worker = torch.utils.data.get_worker_info()
                self._skipped[0 if worker is None else 1 + worker.id % MAX_WORKERS] += 1
                file_name = self.coco.imgs[image_id]['file_name']
                warnings.warn(f'skipping unreadable image {os.path.join(self.root, file_name)} '
                              f'(image id {image_id}): {e}')
                continue
            target = self.prepare_target(image_id, image.width, image.height)
            if self._transforms is not None:
                image, target = self._transforms(image, target)
            boxes = target['boxes']
            target['area'] = (boxes[:, 2] - boxes[:, 0]).float() * (boxes[:, 3] - boxes[:, 1]).float()
            target['size'] = torch.tensor(boxes.canvas_size, dtype=torch.int64)
            target['boxes'] = boxes_to_normalized_cxcywh(boxes)
            return image, target
        raise UsageError(f'none of the {len(self.ids)} images under {self.root} could be read')

    def _first_warning(self, image_id, kind):
        """Whether the warning `kind` (SIZE, BOXES) of this image is due: not yet given by any process."""
        flag = self._warned[bisect.bisect_left(self.ids, image_id), kind]
        due = not flag
        flag.fill_(True)
        return due

    def prepare_target(self, image_id, width, height):
        """Annotations of one image -> target with XYXY pixel `BoundingBoxes`, before any transform."""
        boxes, labels, problems = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann['iscrowd']:
                continue
            box, problem = box_in_image(ann['bbox'], width, height)
            if problem:
                problems.append(f'{self.ann_file}: annotation id {ann["id"]} {problem}')
            if box is not None:
                boxes.append(box)
                labels.append(ann['category_id'])
        if problems and self._first_warning(image_id, BOXES):
            for problem in problems:
                warnings.warn(problem)
        return {
            'boxes': tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format='XYXY', canvas_size=(height, width)),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'iscrowd': torch.zeros(len(labels), dtype=torch.int64),
            'image_id': torch.tensor(image_id, dtype=torch.int64),
            'orig_size': torch.tensor([height, width], dtype=torch.int64),
        }


def build(image_set, coco_path, transforms):
    """image_set 'train' or 'val' of the COCO-layout folder `coco_path`."""
    if coco_path is None:
        raise UsageError(f'--dataset_file coco reads --coco_path ({LAYOUT}) or, in any layout, --{image_set}_json '
                         f'FILE --{image_set}_images FOLDER; or use --dataset_file synthetic for the built-in dataset')
    root = Path(coco_path)
    if not root.is_dir():
        raise UsageError(f'--coco_path {root} is not a folder; {LAYOUT}')
    ann_file = root / 'annotations' / f'instances_{image_set}2017.json'
    if not ann_file.is_file():
        raise UsageError(f'annotation file {ann_file} not found; {LAYOUT}{layout_hint(root)}')
    img_folder = root / f'{image_set}2017'
    if not img_folder.is_dir():
        img_folder = root / f'{image_set}2017.zip'
        if not img_folder.is_file():
            raise UsageError(f'neither image folder {root / f"{image_set}2017"} nor {img_folder} found; '
                                    f'{LAYOUT}')
    return CocoDetection(img_folder, ann_file, transforms)


# Roboflow's COCO export: a folder per split holding its images and _annotations.coco.json.
EXPORT_SPLITS = {'train': ('train',), 'val': ('valid', 'val', 'validation')}


def layout_hint(root):
    """For a --coco_path folder in another layout: the four data flags of a Roboflow export, else the JSON files
    found in it and one level down (CVAT's annotations/instances_default.json, Label Studio's result.json, ...)."""
    splits = {}
    for split, names in EXPORT_SPLITS.items():
        folders = [root / name for name in names if (root / name / '_annotations.coco.json').is_file()]
        if folders:
            splits[split] = folders[0]
    if len(splits) == 2:
        flags = ' '.join(f'--{split}_json {folder / "_annotations.coco.json"} --{split}_images {folder}'
                         for split, folder in splits.items())
        return f'. {root} holds a split per folder (a Roboflow export); pass instead of --coco_path: {flags}'
    found = sorted(str(p) for p in [*root.glob('*.json'), *root.glob('*/*.json')])
    if found:
        shown = ', '.join(found[:5]) + (f', ... ({len(found)} in all)' if len(found) > 5 else '')
        return (f'. JSON files in {root}: {shown}; for annotation files in another layout pass --train_json FILE '
                '--train_images FOLDER --val_json FILE --val_images FOLDER instead of --coco_path')
    return ''


def build_from_files(image_set, ann_file, images, transforms):
    """image_set 'train' or 'val' from an annotation file and the folder (or zip) its file_names are relative to,
    wherever each lies (--train_json / --train_images, --val_json / --val_images)."""
    json_flag, images_flag = f'--{image_set}_json', f'--{image_set}_images'
    if ann_file is None and images is None:
        raise UsageError(f'{json_flag} FILE and {images_flag} FOLDER are needed for the {image_set} split: the data '
                         'is given by file (--train_json ... --val_images), so --coco_path is not read')
    if ann_file is None or images is None:
        given, missing = (json_flag, images_flag) if images is None else (images_flag, json_flag)
        raise UsageError(f'{given} needs {missing} too: the annotation file and the folder its file_names are '
                         'relative to')
    if not os.path.isfile(ann_file):
        raise UsageError(f'{json_flag} {ann_file} is not a file; expected a COCO-format annotation file')
    if not (os.path.isdir(images) or (str(images).endswith('.zip') and os.path.isfile(images))):
        raise UsageError(f'{images_flag} {images} is not a folder (nor a .zip); expected the folder that the '
                         f'file_names of {ann_file} are relative to')
    return CocoDetection(images, ann_file, transforms)
