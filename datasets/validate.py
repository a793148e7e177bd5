"""What a COCO annotation file must hold, and what happens when it does not: the one place of that policy.

The run stops (UsageError naming the file and what to fix) when the file as a whole cannot be trusted:
  - it is not valid JSON (file, line, column), not UTF-8, or not a JSON object;
  - it has no list under 'images', 'annotations' or 'categories';
  - a category lacks an integer 'id' (0 or more) or a string 'name', or two categories share an id (the label
    space);
  - two image entries share an id, or two annotations do (ids are what training and evaluation match by);
  - no valid image entry is left.
One entry is skipped, with a warning naming the file, the image or annotation id and the field, and a count
of all skipped entries at the end (the first MAX_NAMED problems are named one by one):
  - an image entry whose 'id' is not an integer, whose 'file_name' is not a non-empty string, or whose file is
    not in the image folder (its annotations are skipped with it);
  - an annotation whose 'id', 'image_id' or 'category_id' is not an integer, whose 'bbox' is not a list of 4
    finite numbers [x, y, w, h], whose 'iscrowd' is not 0 or 1, or whose 'area' is not a finite number;
  - an annotation of an image that is not in 'images', or of a category that is not in 'categories'.
A missing 'iscrowd' is 0; a missing 'area' is w * h of the box as evaluation scores it (evaluated_annotations;
pycocotools' evaluation reads it for its small / medium / large ranges). Other fields ('segmentation', ...) are
passed on unread. When a quarter or more of the boxes reach past their image's 'width' or 'height' by over a pixel,
one warning says they look like [x1, y1, x2, y2] corners (such boxes do so about half the time or more; COCO's own,
almost never).

Each box follows one rule (box_in_image) in training's targets and in evaluation's ground truth alike: a box with
zero or negative width or height is dropped, one reaching outside the image is clipped to it (dropped if nothing is
left); evaluation keeps crowd regions, which training skips, and boxes out by float noise alone as given. Training
warns of each once per annotation id when it reads the image (datasets/coco.py), none where a box reaches out by
OUTSIDE_TOLERANCE or less. Also checked then: an image whose 'width' and 'height' (where given) are not its pixels'
size gets one warning naming the likely cause (an EXIF orientation the annotation tool applied, a resize) and is
read as stored; an image file that exists but cannot be read is skipped with a warning naming the file and counted.
"""
import contextlib
import io
import json
import math
import os
import warnings

from pycocotools.coco import COCO

from detr_irpe import UsageError

MAX_NAMED = 10  # problems named one by one; the rest are only counted
OUTSIDE_TOLERANCE = 1  # pixels a box may reach past its image unremarked: annotation tools' float noise


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path):
    """The parsed JSON of `path`; invalid JSON is a UsageError naming the file, line and column."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f'annotation file {path} is not valid JSON: {e.msg}: line {e.lineno}, column {e.colno} '
                         f'(character {e.pos}); a file cut short (an interrupted download or copy) looks like this: '
                         f'get it again') from None
    except UnicodeDecodeError as e:
        raise UsageError(f'annotation file {path} is not UTF-8 text (byte {e.start}); expected a COCO JSON '
                         f'file') from None


def image_problem(image):
    """Why an image entry cannot be used, naming the field, or None."""
    if not isinstance(image, dict):
        return f'is a {type(image).__name__}, expected an object'
    if 'id' not in image:
        return "has no 'id'"
    if not is_int(image['id']):
        return f"field 'id' is {image['id']!r}, expected an integer"
    if 'file_name' not in image:
        return "has no 'file_name'"
    if not isinstance(image['file_name'], str) or not image['file_name']:
        return f"field 'file_name' is {image['file_name']!r}, expected a non-empty string"
    return None


def annotation_problem(ann, image_ids, category_ids):
    """Why an annotation cannot be used, naming the field, or None."""
    if not isinstance(ann, dict):
        return f'is a {type(ann).__name__}, expected an object'
    for field in ('id', 'image_id', 'category_id', 'bbox'):
        if field not in ann:
            return f'has no {field!r}'
    for field in ('id', 'image_id', 'category_id'):
        if not is_int(ann[field]):
            return f'field {field!r} is {ann[field]!r}, expected an integer'
    bbox = ann['bbox']
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return f"field 'bbox' is {bbox!r}, expected [x, y, width, height]: 4 finite numbers"
    if 'iscrowd' in ann and ann['iscrowd'] not in (0, 1):
        return f"field 'iscrowd' is {ann['iscrowd']!r}, expected 0 or 1"
    if 'area' in ann and not is_number(ann['area']):
        return f"field 'area' is {ann['area']!r}, expected a finite number"
    if ann['image_id'] not in image_ids:
        return f"field 'image_id' is {ann['image_id']}, the id of no image in 'images' (or of one skipped)"
    if ann['category_id'] not in category_ids:
        return f"field 'category_id' is {ann['category_id']}, the id of no category in 'categories'"
    return None


def has_size(image):
    """Whether an image entry gives its 'width' and 'height' as positive numbers."""
    return all(is_number(image.get(side)) and image[side] > 0 for side in ('width', 'height'))


def box_in_image(bbox, width, height):
    """The rule for a box [x, y, w, h] in a `width` x `height` image, which training's targets and evaluation's
    ground truth both follow: (box, problem). box: (x1, y1, x2, y2) clipped to the image, or None where the box is
    dropped (zero or negative width or height, or nothing left inside); problem: what to warn of, or None (a box
    inside, or reaching out by OUTSIDE_TOLERANCE or less)."""
    x, y, w, h = bbox
    x1, y1 = min(max(x, 0), width), min(max(y, 0), height)
    x2, y2 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    if w <= 0 or h <= 0:
        return None, f'has zero or negative size (bbox {bbox}); dropped from training and evaluation'
    if x2 <= x1 or y2 <= y1:
        return None, f'lies outside the {width}x{height} image (bbox {bbox}); dropped from training and evaluation'
    if max(-x, -y, x + w - width, y + h - height) > OUTSIDE_TOLERANCE:
        return (x1, y1, x2, y2), (f'reaches outside the {width}x{height} image (bbox {bbox}); clipped to it in '
                                  'training and evaluation')
    return (x1, y1, x2, y2), None


def evaluated_annotations(data, pixel_sizes=None):
    """The annotations of the validated COCO dict `data` as evaluation scores them, by box_in_image on each image's
    pixel size as training reads it (pixel_sizes: {image_id: (width, height)}; else the entry's 'width' and 'height';
    else the top and left edges alone): a box training drops is left out, one it clips is clipped. Crowd regions,
    which training skips, are COCOeval's to ignore detections in: kept as given. A given 'area' is kept (COCO's small /
    medium / large ranges read it); a missing one is the scored box's."""
    sizes = {image['id']: (image['width'], image['height']) for image in data['images'] if has_size(image)}
    sizes.update(pixel_sizes or {})
    scored = []
    for ann in data['annotations']:
        bbox = ann['bbox']
        if not ann.get('iscrowd'):
            box, problem = box_in_image(bbox, *sizes.get(ann['image_id'], (math.inf, math.inf)))
            if box is None:
                continue
            if problem:  # one out by float noise alone is scored as given: COCO's own ground truth stays as published
                bbox = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
        scored.append({'area': bbox[2] * bbox[3], **ann, 'bbox': bbox})
    return scored


def entry_name(kind, entry, position):
    """'image id 7' when the entry has a usable id, else 'image entry #3' (its position in the list)."""
    if isinstance(entry, dict) and is_int(entry.get('id')):
        return f"{kind} id {entry['id']}"
    return f'{kind} entry #{position} (no usable id)'


def validate_annotations(data, path, image_found=None, image_folder='the image folder'):
    """(a COCO dict holding only the valid entries, number of entries skipped) for the parsed file `data`.
    Raises UsageError where the policy above stops the run; warns for each skipped entry. image_found: file_name ->
    whether the image file exists in image_folder (named in messages); an entry whose file does not is skipped with
    its annotations."""
    if not isinstance(data, dict):
        raise UsageError(f'annotation file {path} holds a JSON {type(data).__name__}; expected an object with '
                         f"'images', 'annotations' and 'categories' lists (the COCO format)")
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            got = 'is missing' if key not in data else f'is a {type(data[key]).__name__}'
            raise UsageError(f"annotation file {path}: {key!r} {got}; expected a list (the COCO format: 'images', "
                             f"'annotations', 'categories')")
    category_ids = set()
    for position, cat in enumerate(data['categories']):
        if not (isinstance(cat, dict) and is_int(cat.get('id')) and isinstance(cat.get('name'), str)):
            raise UsageError(f'annotation file {path}: category entry #{position} ({cat!r:.80}) needs an integer '
                             f"'id' and a string 'name'; fix the categories list (the run stops: it defines the "
                             f'labels)')
        if cat['id'] < 0:
            raise UsageError(f"annotation file {path}: category {cat['name']!r} has id {cat['id']}; ids are the "
                             "model's class numbers, 0 or more: renumber the categories (and their annotations)")
        if cat['id'] in category_ids:
            raise UsageError(f"annotation file {path}: category id {cat['id']} is listed twice; ids must be unique")
        category_ids.add(cat['id'])

    skipped = []  # one line per skipped entry
    images, image_ids, first_problem = [], set(), None
    for position, image in enumerate(data['images']):
        problem = image_problem(image)
        if problem is None and image_found is not None and not image_found(image['file_name']):
            problem = f"file {image['file_name']!r} is not in {image_folder}"
            if '\\' in image['file_name'] and os.sep == '/':
                problem += " (its '\\' separates folders on Windows only: write '/')"
        if problem:
            first_problem = first_problem or f'{entry_name("image", image, position)} {problem}'
            skipped.append(f'{entry_name("image", image, position)} {problem}; skipped with its annotations')
            continue
        if image['id'] in image_ids:
            raise UsageError(f"annotation file {path}: image id {image['id']} is listed twice (the second time as "
                             f"{image['file_name']!r}); ids must be unique: the run stops, as the annotations of that "
                             f'id cannot be told apart')
        image_ids.add(image['id'])
        images.append(image)
    if not images:
        first = f', e.g. {first_problem}' if first_problem else ''
        raise UsageError(f"annotation file {path}: no usable image entry (of {len(data['images'])}){first}; every "
                         f"image needs an integer 'id' and a 'file_name' found in {image_folder}")

    annotations, annotation_ids = [], set()
    for position, ann in enumerate(data['annotations']):
        problem = annotation_problem(ann, image_ids, category_ids)
        if problem:
            image = f", image id {ann['image_id']}" if isinstance(ann, dict) and is_int(ann.get('image_id')) else ''
            skipped.append(f'{entry_name("annotation", ann, position)}{image} {problem}; skipped')
            continue
        if ann['id'] in annotation_ids:
            raise UsageError(f"annotation file {path}: annotation id {ann['id']} is listed twice; ids must be unique")
        annotation_ids.add(ann['id'])
        if 'iscrowd' not in ann:  # COCO's own files have it: no copy for them
            ann = {'iscrowd': 0, **ann}
        annotations.append(ann)

    warn_if_corner_boxes(images, annotations, path)
    for line in skipped[:MAX_NAMED]:
        warnings.warn(f'{path}: {line}')
    if skipped:
        more = f' (the first {MAX_NAMED} named above)' if len(skipped) > MAX_NAMED else ''
        warnings.warn(f"{path}: skipped {len(skipped)} entries{more}: {len(images)} of {len(data['images'])} images "
                      f"and {len(annotations)} of {len(data['annotations'])} annotations are used; see "
                      f'datasets/validate.py for what each entry needs')
    return {**data, 'images': images, 'annotations': annotations}, len(skipped)


def warn_if_corner_boxes(images, annotations, path):
    """One warning when a quarter or more of the boxes reach past their image's width or height (as the file gives
    them) by over a pixel: the mark of boxes written [x1, y1, x2, y2] where COCO's bbox is [x, y, width, height]."""
    sizes = {image['id']: (image['width'], image['height']) for image in images
             if is_number(image.get('width')) and is_number(image.get('height'))}
    sized = [ann for ann in annotations if ann['image_id'] in sizes]
    past = [ann for ann in sized if ann['bbox'][0] + ann['bbox'][2] > sizes[ann['image_id']][0] + OUTSIDE_TOLERANCE
            or ann['bbox'][1] + ann['bbox'][3] > sizes[ann['image_id']][1] + OUTSIDE_TOLERANCE]
    if past and len(past) >= len(sized) / 4:
        first = past[0]
        width, height = sizes[first['image_id']]
        warnings.warn(f"{path}: {len(past)} of {len(sized)} boxes reach past their image's width or height (e.g. "
                      f"annotation id {first['id']}: bbox {first['bbox']} in image id {first['image_id']}, "
                      f'{width}x{height}); COCO\'s bbox is [x, y, width, height], and boxes written as corners '
                      '[x1, y1, x2, y2] look like this: if yours are, convert them (width = x2 - x1, height = y2 - y1)')


def load_coco(path, image_found=None, image_folder='the image folder'):
    """(pycocotools COCO object of the valid entries of annotation file `path`, number of entries skipped, number of
    annotation entries among them); image_found and image_folder as for validate_annotations."""
    given = read_json(path)
    data, skipped = validate_annotations(given, path, image_found, image_folder)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco, skipped, len(given['annotations']) - len(data['annotations'])
