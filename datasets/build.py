"""Data for DETR: COCO-layout datasets (real COCO or the built-in synthetic shapes), collate, evaluation.

The folder datasets/ is installed as the package detr_irpe_datasets (setup.py); this module is its entry:

    import detr_irpe_datasets.build as datasets
    dataset = datasets.build_dataset('train', args)    # (image (3, H, W) normalised, target) pairs
    loader = DataLoader(dataset, collate_fn=collate_fn, ...)
    evaluator = CocoEvaluator(get_coco_api_from_dataset(dataset))
"""
import os
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.utils.data

from detr_irpe import UsageError
from detr_irpe.backbone import FrozenFeatures
from detr_irpe.detr import DEFAULT_NUM_CLASSES, MAX_CLASSES, batch_images
from detr_irpe.from_checkpoint import class_key

from . import coco, synthetic
from .coco_eval import MAX_DETECTIONS, CocoEvaluator
from .transforms import make_transforms

__all__ = ['DATA_LOCATION_FLAGS', 'build_dataset', 'category_names', 'check_against_training_set', 'check_annotated',
           'classes_needed', 'collate_fn', 'describe', 'files_given', 'get_coco_api_from_dataset', 'num_classes_for',
           'warn_objects_beyond_queries', 'warn_val_classes_never_trained', 'warn_val_size_outside_training_scales',
           'CocoEvaluator', 'FrozenBackboneCollate', 'make_transforms']


def ensure_synthetic(args):
    # resolved, so that '.' or 'runs/..' has a name to put the lock and the temporary folder beside
    root = Path(args.synthetic_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise UsageError(f'--synthetic_dir {args.synthetic_dir} is a file; expected a folder (made when missing)')
    try:
        return synthetic.ensure_synthetic_coco(
            root, num_train=args.synthetic_train, num_val=args.synthetic_val,
            image_size=args.synthetic_image_size, num_classes=args.synthetic_classes,
            objects=args.synthetic_objects, object_size=args.synthetic_object_size, seed=args.synthetic_seed)
    except FileExistsError as e:  # a folder of other files: refused, not overwritten
        raise UsageError(f'--synthetic_dir {args.synthetic_dir}: {e}') from None


# Where --dataset_file coco finds its data: COCO's layout, or each split's annotation file and image folder.
DATA_LOCATION_FLAGS = ('coco_path', 'train_json', 'train_images', 'val_json', 'val_images')


def files_given(args):
    """Whether the data is given by file (--train_json ... --val_images) rather than by --coco_path."""
    return any(getattr(args, flag, None) for flag in DATA_LOCATION_FLAGS[1:])


def build_dataset(image_set, args):
    """image_set 'train' or 'val' of args.dataset_file: 'coco' from --coco_path's layout or from
    --{image_set}_json and --{image_set}_images, or 'synthetic'."""
    if args.dataset_file == 'coco':
        root = args.coco_path
    elif args.dataset_file == 'synthetic':
        root = ensure_synthetic(args)
    else:
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    if image_set == 'train':
        transforms = make_transforms('train', train_scales=args.train_scales, train_max_size=args.train_max_size,
                                     crop_scales=args.crop_scales, crop_size=args.crop_size)
    else:  # the inference tools have no training-transform flags
        transforms = make_transforms(image_set, val_size=args.val_size, val_max_size=args.val_max_size)
    if args.dataset_file == 'coco' and files_given(args):
        return coco.build_from_files(image_set, getattr(args, f'{image_set}_json', None),
                                     getattr(args, f'{image_set}_images', None), transforms)
    return coco.build(image_set, root, transforms)


def category_names(dataset):
    """{category id: name} of a dataset's annotation file."""
    return {c['id']: c['name'] for c in get_coco_api_from_dataset(dataset).dataset['categories']}


def describe(args, splits, num_classes):
    """The one start-up line of the data a run uses: dataset, files, images, annotations, categories, num_classes.
    splits: {'train': dataset, 'val': dataset}."""
    parts = []
    for name, dataset in splits.items():
        base = unwrap(dataset)
        parts.append(f'{name} {base.ann_file} (images {base.root}): {len(base.coco.imgs)} images, '
                     f'{len(base.coco.anns)} annotations')
    names = category_names(next(iter(splits.values())))
    shown = ', '.join(f'{i} {n}' for i, n in list(names.items())[:10]) + (', ...' if len(names) > 10 else '')
    return (f"data: {args.dataset_file}; {'; '.join(parts)}; {len(names)} categories ({shown}); "
            f'num_classes {num_classes}')


def target_annotations(dataset):
    """The annotations DETR trains on and is scored by: crowd ones left out, as CocoDetection.prepare_target does."""
    return [a for a in get_coco_api_from_dataset(dataset).anns.values() if not a.get('iscrowd', 0)]


def warn_objects_beyond_queries(splits, num_queries):
    """One warning when images hold more objects than queries: DETR predicts at most num_queries boxes an image, so
    in training the objects beyond go unmatched (no loss) and in evaluation undetected; beyond MAX_DETECTIONS objects
    more queries do not help COCO's AP, which counts that many detections an image. splits: {name: dataset}."""
    parts, most = [], 0
    for name, dataset in splits.items():
        over = [c for c in Counter(a['image_id'] for a in target_annotations(dataset)).values() if c > num_queries]
        if over:
            parts.append(f'{len(over)} of the {len(get_coco_api_from_dataset(dataset).imgs)} {name} images')
            most = max(most, *over)
    if parts:
        boxes = f'{num_queries} box{"es" if num_queries > 1 else ""}'
        advice = f'pass --num_queries {most} or more'
        if most > MAX_DETECTIONS:
            advice += (f" to train on them all; COCO's AP counts at most {MAX_DETECTIONS} detections an image "
                       f'whatever --num_queries is, so beyond {MAX_DETECTIONS} objects its AP misses some all the same')
        warnings.warn(f'{" and ".join(parts)} hold more objects than --num_queries {num_queries} (up to {most}): DETR '
                      f'predicts at most {boxes} an image, so the objects beyond go unmatched in training and '
                      f'undetected in evaluation; {advice}')


def warn_val_classes_never_trained(dataset_train, dataset_val):
    """A warning naming the categories that val annotates and training does not: the model cannot learn them, and
    their AP (about 0) counts in the mean over categories."""
    in_val = Counter(a['category_id'] for a in target_annotations(dataset_val))
    missing = sorted(set(in_val) - {a['category_id'] for a in target_annotations(dataset_train)})
    if missing:
        names = category_names(dataset_val)
        listed = ', '.join(f'{i} {names[i]!r} ({in_val[i]} in val)' for i in missing[:5])
        more = ' ...' if len(missing) > 5 else ''
        warnings.warn(f'{len(missing)} of the {len(in_val)} categories annotated in {unwrap(dataset_val).ann_file} '
                      f'have no annotation in the training set: {listed}{more}; the model cannot learn them, and their '
                      f'AP (about 0) counts in the mean AP: move some of their images into the training set')


def warn_val_images_in_training(dataset_train, dataset_val):
    """A warning when val lists image files that training lists too (a split by hand, one file given for both): the
    val AP would count images the model trained on."""
    def files(dataset):
        base = unwrap(dataset)
        root = os.path.abspath(str(base.root))
        return {os.path.normpath(os.path.join(root, entry['file_name'])) for entry in base.coco.imgs.values()}
    val = files(dataset_val)
    shared = sorted(val & files(dataset_train))
    if shared:
        warnings.warn(f'{len(shared)} of the {len(val)} val images are training images too (the same file, e.g. '
                      f'{shared[0]}): the val AP counts images the model trains on; give each image to one split')


def warn_val_size_outside_training_scales(args):
    """A warning when evaluation resizes to a shorter side training never drew (DETR: 800, its largest)."""
    scales = args.train_scales
    if not min(scales) <= args.val_size <= max(scales):
        trained = f'{min(scales)}-{max(scales)}' if len(scales) > 1 else f'{scales[0]}'
        warnings.warn(f'--val_size {args.val_size} lies outside the training scales (--train_scales {trained}): '
                      f'evaluation resizes images to a size the model never trained at; pass a --val_size (and '
                      f'--val_max_size) within them, as DETR evaluates at its largest')


def check_against_training_set(dataset, args):
    """A UsageError naming the flag when the flags do not fit the training set: not one full batch
    (--batch_size per process x processes; batches are full ones, as DETR, so no step would run), or a
    --num_classes not above every category id (the classifier would have no output for some labels)."""
    num_classes = getattr(args, 'num_classes', None)
    if num_classes is not None:
        needed = classes_needed(dataset)
        if needed > num_classes:
            raise UsageError(f'--num_classes {num_classes} is too small for category id {needed - 1} of the training '
                             f'set: pass at least --num_classes {needed} (largest category id + 1), or leave '
                             f'it out to take it from the data')
    check_annotated(dataset, args, 'train')
    world_size = getattr(args, 'world_size', 1) or 1
    if args.batch_size * world_size > len(dataset):
        processes = f' x {world_size} processes (--world_size)' if world_size > 1 else ''
        source = (f'--synthetic_train {args.synthetic_train}' if getattr(args, 'dataset_file', None) == 'synthetic'
                  else f'in {unwrap(dataset).ann_file}')
        raise UsageError(f'--batch_size {args.batch_size}{processes} is more than the {len(dataset)} training '
                         f'images ({source}): no full batch, so no training step would run; lower --batch_size')


def check_annotated(dataset, args, split):
    """A UsageError when a split has no annotations: nothing to learn from, or to score (COCO's AP is -1)."""
    if get_coco_api_from_dataset(dataset).anns:
        return
    role, nothing = {'train': ('training', 'nothing to learn'),
                     'val': ('val', "nothing to score (COCO's AP would be -1 at every evaluation)")}[split]
    if getattr(args, 'dataset_file', None) == 'synthetic':
        raise UsageError(f'--synthetic_objects {" ".join(map(str, args.synthetic_objects))} put no object in the '
                         f'{len(dataset)} {role} images: {nothing}; pass a MAX of 1 or more')
    skipped = unwrap(dataset).skipped_annotations
    if skipped:
        raise UsageError(f'the {role} set {unwrap(dataset).ann_file} has {len(dataset)} images and no usable '
                         f'annotations: all {skipped} annotation entries were skipped as invalid (the warnings above '
                         f"say why): {nothing}; fix them (COCO format: id, image_id, category_id, bbox)")
    unlabelled = '' if split == 'train' else ', or run tools/predict.py for the detections on images without boxes'
    raise UsageError(f'the {role} set {unwrap(dataset).ann_file} has {len(dataset)} images and no annotations: '
                     f"{nothing}; fill its 'annotations' list (COCO format: image_id, category_id, bbox){unlabelled}")


def check_categories(dataset, names, num_classes, against):
    """A UsageError when the categories of `dataset` do not fit the model's: a category the model has no class
    for (id >= num_classes), or a name that `names` ({id: name} of `against`: the training set, the checkpoint) has
    under another id. Its detections would be scored under other ids, silently (AP 0 for those classes). A warning
    where `against` names another class at an id (names compared as from_checkpoint.class_key compares them): a
    synonym ('motorbike', 'motorcycle') is the same class, another class is scored as this one."""
    problems, renamed = [], []
    names = names or {}
    by_name = {}  # two names alike (e.g. 'cat', 'Cat') are two ids of one key
    for i, name in names.items():
        by_name.setdefault(class_key(name), []).append(i)
    for i, name in category_names(dataset).items():
        ids = by_name.get(class_key(name), [i])
        if i not in ids:
            problems.append(f'{name!r} is id {i} here and id {ids[0]} in {against}')
        elif num_classes is not None and i >= num_classes:
            problems.append(f'id {i} ({name!r}) has no class in a model of --num_classes {num_classes}')
        elif i in names and class_key(names[i]) != class_key(name):
            renamed.append(f'id {i} is {name!r} here and {names[i]!r} there')
    if problems:
        fix = (f'Give every category the id it has in {against}' if names else
               f'Number the categories as the data the model was trained on (ids below {num_classes})')
        raise UsageError(f'the categories of {unwrap(dataset).ann_file} do not fit {against}: '
                         f'{"; ".join(problems[:3])}{" ..." if len(problems) > 3 else ""}. {fix}.')
    if renamed:
        warnings.warn(f'{unwrap(dataset).ann_file} names {len(renamed)} categor{"y" if len(renamed) == 1 else "ies"} '
                      f'otherwise than {against}: {"; ".join(renamed[:3])}{" ..." if len(renamed) > 3 else ""}; '
                      f'the model\'s detections of the class there are scored as the class here. If they are not '
                      f'the same class, give every category the id it has in {against}.')


def collate_fn(batch):
    """[(image, target), ...] -> (list of images of different sizes, list of targets)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class FrozenBackboneCollate:
    """A DataLoader collate_fn that also runs the model's frozen backbone on the batch (--backbone_in_workers).

    In a loader with workers, the backbone of the next batches then runs in the worker processes while the
    main process trains the transformer: on a CPU the two overlap on different cores, where otherwise the
    backbone would take its share of every step (70% of a `make demo` step is the frozen ResNet-18). The
    numbers are those of the model's own backbone: the same modules (each worker holds a copy, which is why
    nothing in them may train), the same padded batch, the same autocast; only the thread count is the
    worker's, one.

        collate = FrozenBackboneCollate(collate_fn, model.backbone[0], precision)
        loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate)
        for features, targets in loader:       # features: detr_irpe.backbone.FrozenFeatures
            outputs = model(features=features)
    """

    def __init__(self, collate_fn, backbone, precision, size_divisibility=1):
        trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
        if trainable:
            shown = ', '.join(trainable[:4]) + (f', ... ({len(trainable)} in all)' if len(trainable) > 4 else '')
            raise UsageError(f'--backbone_in_workers needs a frozen backbone (--lr_backbone 0), and this one has '
                             f'trainable parameters ({shown}): a data loader worker would run a stale copy of it. '
                             'Freeze it (--lr_backbone 0) or run it in the model (--no-backbone_in_workers).')
        self.collate_fn, self.backbone, self.precision = collate_fn, backbone, precision
        self.size_divisibility = size_divisibility

    def __call__(self, batch):
        images, targets = self.collate_fn(batch)
        padded, mask = batch_images(images, self.size_divisibility)
        with torch.no_grad(), self.precision.autocast():
            features, feature_mask = self.backbone(padded, mask)
        return FrozenFeatures(features, feature_mask), targets


def unwrap(dataset):
    """The CocoDetection behind a dataset, looking through torch Subsets."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset, looking through torch Subsets."""
    return unwrap(dataset).coco


def num_classes_for(args_or_dataset):
    """DETR's num_classes (max category id + 1; the no-object class comes on top in the model):
    detr's default for COCO (91), synthetic_classes + 1 for synthetic, or from the categories of a dataset."""
    if hasattr(args_or_dataset, 'dataset_file'):
        args = args_or_dataset
        if args.dataset_file in DEFAULT_NUM_CLASSES:
            return DEFAULT_NUM_CLASSES[args.dataset_file]
        if args.dataset_file == 'synthetic':
            return args.synthetic_classes + 1
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    return classes_needed(args_or_dataset)


# a class head this many times the number of categories, and this large, is mostly ids no category has
SPARSE_RATIO, SPARSE_HEAD = 10, 1000


def classes_needed(dataset):
    """The classes a model needs for the categories of a dataset: its largest category id + 1. A UsageError where
    that is beyond MAX_CLASSES (--num_classes's bound too); a warning naming the class head's size where the ids are
    sparse (database ids of an annotation tool): most of its outputs would be classes no annotation has."""
    ids = get_coco_api_from_dataset(dataset).getCatIds()
    needed = max(ids, default=0) + 1
    renumber = "renumber the categories 1..N in the annotation files (their annotations' category_id with them)"
    if needed > MAX_CLASSES:
        raise UsageError(f'{unwrap(dataset).ann_file}: the largest of its {len(ids)} category ids is {needed - 1}; '
                         f'a model has a class for every id up to the largest, and ids are expected below '
                         f'{MAX_CLASSES}: {renumber}')
    if needed > SPARSE_RATIO * len(ids) and needed > SPARSE_HEAD:
        warnings.warn(f'{unwrap(dataset).ann_file}: the largest of its {len(ids)} category ids is {needed - 1}, so '
                      f"the model's class head needs {needed} outputs (+ no-object), {needed - len(ids)} of them for "
                      f'ids no category has: a large, slow model; {renumber}')
    return needed
