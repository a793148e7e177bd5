"""Data for DETR: COCO-layout datasets (real COCO or the built-in synthetic shapes), collate, evaluation.

    dataset = build_dataset('train', args)    # (image (3, H, W) normalised, target) pairs
    loader = DataLoader(dataset, collate_fn=collate_fn, ...)
    evaluator = CocoEvaluator(get_coco_api_from_dataset(dataset))
"""
from pathlib import Path

import torch.utils.data

from detr_irpe.args import MAX_COUNT, MAX_IMAGE_SIDE, MAX_SEED, float_range, int_range, non_empty

from . import coco, synthetic
from .coco_eval import CocoEvaluator
from .transforms import make_transforms

__all__ = ['add_dataset_args', 'build_dataset', 'check_against_training_set', 'collate_fn',
           'get_coco_api_from_dataset', 'num_classes_for', 'CocoEvaluator', 'make_transforms']

COCO_NUM_CLASSES = 91  # DETR: max COCO category id (90) + 1
MIN_SYNTHETIC_SIDE = 16  # the smallest shapes must still cover a few pixels


def add_dataset_args(parser):
    side = int_range(1, MAX_IMAGE_SIDE)  # pixels
    group = parser.add_argument_group('data')
    group.add_argument('--train_scales', type=side, nargs='+', default=list(range(480, 801, 32)),
                       help='training: the shorter side is resized to one of these')
    group.add_argument('--train_max_size', type=side, default=1333, help='training: longest side at most this')
    group.add_argument('--crop_scales', type=side, nargs='+', default=[400, 500, 600],
                       help='training, crop branch: shorter side resized to one of these before the crop')
    group.add_argument('--crop_size', type=side, nargs=2, default=[384, 600], metavar=('MIN', 'MAX'),
                       help='training, crop branch: crop height and width are drawn in [MIN, MAX]')
    group.add_argument('--val_size', type=side, default=800, help='validation: shorter side')
    group.add_argument('--val_max_size', type=side, default=1333, help='validation: longest side at most this')
    group.add_argument('--synthetic_dir', default='.cache/synthetic', type=non_empty,
                       help='where --dataset_file synthetic writes its COCO-layout folder')
    group.add_argument('--synthetic_train', type=int_range(1, MAX_COUNT), default=1000,
                       help='synthetic: number of training images')
    group.add_argument('--synthetic_val', type=int_range(1, MAX_COUNT), default=100,
                       help='synthetic: number of validation images')
    group.add_argument('--synthetic_image_size', type=int_range(MIN_SYNTHETIC_SIDE, MAX_IMAGE_SIDE), default=128,
                       help='synthetic: image side in pixels')
    group.add_argument('--synthetic_classes', type=int_range(1, len(synthetic.SHAPES)), default=4,
                       help=f'synthetic: number of shape categories (at most {len(synthetic.SHAPES)})')
    group.add_argument('--synthetic_objects', type=int_range(0, 100), nargs=2, default=[1, 3], metavar=('MIN', 'MAX'),
                       help='synthetic: objects per image')
    group.add_argument('--synthetic_object_size', type=float_range(0.01, 1), nargs=2, default=[0.2, 0.45],
                       metavar=('MIN', 'MAX'), help='synthetic: object size sqrt(w h) as a fraction of the image side')
    group.add_argument('--synthetic_seed', type=int_range(0, MAX_SEED), default=0,
                       help='synthetic: seed of the drawing')
    return parser


def ensure_synthetic(args):
    # resolved, so that '.' or 'runs/..' has a name to put the lock and the temporary folder beside
    root = Path(args.synthetic_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f'--synthetic_dir {args.synthetic_dir} is a file; expected a folder (made when missing)')
    try:
        return synthetic.ensure_synthetic_coco(
            root, num_train=args.synthetic_train, num_val=args.synthetic_val,
            image_size=args.synthetic_image_size, num_classes=args.synthetic_classes,
            objects=args.synthetic_objects, object_size=args.synthetic_object_size, seed=args.synthetic_seed)
    except FileExistsError as e:  # a folder of other files: refused, not overwritten
        raise ValueError(f'--synthetic_dir {args.synthetic_dir}: {e}') from None


def build_dataset(image_set, args):
    """image_set 'train' or 'val' of args.dataset_file ('coco' from args.coco_path, or 'synthetic')."""
    if args.dataset_file == 'coco':
        root = args.coco_path
    elif args.dataset_file == 'synthetic':
        root = ensure_synthetic(args)
    else:
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    transforms = make_transforms(image_set, train_scales=args.train_scales, train_max_size=args.train_max_size,
                                 crop_scales=args.crop_scales, crop_size=args.crop_size,
                                 val_size=args.val_size, val_max_size=args.val_max_size)
    return coco.build(image_set, root, transforms)


def check_against_training_set(dataset, args):
    """A ValueError naming the flag when the flags do not fit the training set: not one full batch
    (--batch_size per process x processes; batches are full ones, as DETR, so no step would run), or a
    --num_classes not above every category id (the classifier would have no output for some labels)."""
    num_classes = getattr(args, 'num_classes', None)
    if num_classes is not None:
        largest = max(get_coco_api_from_dataset(dataset).getCatIds(), default=0)
        if largest >= num_classes:
            raise ValueError(f'--num_classes {num_classes} is too small for category id {largest} of the training '
                             f'set: pass at least --num_classes {largest + 1} (largest category id + 1), or leave '
                             f'it out to take it from the data')
    world_size = getattr(args, 'world_size', 1) or 1
    if args.batch_size * world_size > len(dataset):
        processes = f' x {world_size} processes (--world_size)' if world_size > 1 else ''
        source = (f'--synthetic_train {args.synthetic_train}' if getattr(args, 'dataset_file', None) == 'synthetic'
                  else f'in --coco_path {getattr(args, "coco_path", None)}')
        raise ValueError(f'--batch_size {args.batch_size}{processes} is more than the {len(dataset)} training '
                         f'images ({source}): no full batch, so no training step would run; lower --batch_size')


def collate_fn(batch):
    """[(image, target), ...] -> (list of images of different sizes, list of targets)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset, looking through torch Subsets."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.coco


def num_classes_for(args_or_dataset):
    """DETR's num_classes (max category id + 1; the no-object class comes on top in the model):
    91 for COCO, synthetic_classes + 1 for synthetic, or from the categories of a dataset."""
    if hasattr(args_or_dataset, 'dataset_file'):
        args = args_or_dataset
        if args.dataset_file == 'coco':
            return COCO_NUM_CLASSES
        if args.dataset_file == 'synthetic':
            return args.synthetic_classes + 1
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    return max(get_coco_api_from_dataset(args_or_dataset).getCatIds()) + 1
