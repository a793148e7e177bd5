"""Command-line flags: DETR's, with DETR's defaults, plus --enc_rpe2d and --backbone_weights; the data flags; the
flag types. Each tool's parser holds the groups it uses (get_args_parser: all of them, tools/train.py's)."""
import argparse
import copy
import math
import os

import torch

from detr_irpe import UsageError
from detr_irpe.convert import FORMATS_HELP
from detr_irpe.detr import MAX_CLASSES
from detr_irpe.flex import ATTENTION_IMPLS, attention_impl_problem
from detr_irpe.irpe import RPE_STRING_FORMAT, rpe_config_from_string
from detr_irpe.transformer import RPE_INITS


def enc_rpe2d_flag(text):
    """argparse type for --enc_rpe2d: a malformed string becomes the parser's usage error."""
    try:
        rpe_config_from_string(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# Upper ends of the ranges below are sanity bounds, far beyond any published setting: past them a run
# would die inside torch (an allocation of terabytes, an integer overflow) instead of saying why.
MAX_WIDTH = 16384        # --hidden_dim, --dim_feedforward
MAX_LAYERS = 128         # --enc_layers, --dec_layers
MAX_COUNT = 10 ** 7      # queries, images of the synthetic set (classes: detr.MAX_CLASSES)
MAX_IMAGE_SIDE = 10000   # every resize scale and maximum size, in pixels
MAX_COEF = 1e6           # matching costs and loss weights: larger ones overflow the float32 cost matrix
MAX_SEED = 2 ** 31 - 1   # numpy's seed range (< 2 ** 32), with room for the + rank of each process
MIN_SYNTHETIC_SIDE = 16  # the smallest shapes must still cover a few pixels


def _int_or_float(kind, text):
    # bool is an int in Python; a YAML `true` must not become 1
    if isinstance(text, bool):
        raise ValueError(text)
    return kind(text)


def int_range(low, high=None):
    """argparse type: an integer in [low, high] (no upper end when high is None)."""
    expected = f'an integer >= {low}' if high is None else f'an integer in [{low}, {high}]'

    def check(text):
        try:
            value = _int_or_float(int, text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
        return value
    check.__name__ = expected  # what --help and argparse's messages call the type
    return check


def float_range(low, high=None, high_open=False):
    """argparse type: a finite number in [low, high] ([low, high) with high_open; no upper end when high is None)."""
    if high is None:
        expected = f'a finite number >= {low:g}'
    else:
        expected = f'a number in [{low:g}, {high:g}{")" if high_open else "]"}'

    def check(text):
        try:
            value = _int_or_float(float, text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if not (math.isfinite(value) and value >= low and
                (high is None or value < high or (value == high and not high_open))):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
        return value
    check.__name__ = expected
    return check


def non_empty(text):
    """argparse type: a non-empty string (a path, a url)."""
    if not isinstance(text, str) or not text.strip():
        raise argparse.ArgumentTypeError(f'expected a non-empty string, got {text!r}')
    return text


def device_flag(text):
    """argparse type for --device: a torch device this machine has ('cpu', 'cuda', 'cuda:1')."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a device such as 'cpu', 'cuda' or 'cuda:1', got {text!r}") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f'{text!r} asked for, but this machine has no CUDA device; use --device cpu')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f'{text!r} asked for, but this machine has {torch.cuda.device_count()} '
                                         f'CUDA device(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}')
    if device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f"expected 'cpu' or 'cuda[:N]', got {text!r}")
    return text


def backbone_weights_flag(text):
    """argparse type for --backbone_weights: 'imagenet', 'none' or the path of an existing file."""
    if text in ('imagenet', 'none') or (isinstance(text, str) and os.path.isfile(text)):
        return text
    where = '' if os.path.isabs(text) else f' below the current folder {os.getcwd()}'
    raise argparse.ArgumentTypeError(f"expected 'imagenet', 'none' or the path of a resnet state dict file, got "
                                     f"{text!r} (no such file{where})")


# ---- figure files ----

# The figure files lab.plots.save_figure writes (a JPEG without the PNG's palette).
FIGURE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def check_figure_name(flag, name):
    """Raise UsageError naming `flag` unless `name` ends in an extension save_figure writes."""
    stem, extension = os.path.splitext(name)
    if extension.lower() not in FIGURE_EXTENSIONS:
        raise UsageError(f'{flag} {name!r}: expected a file name ending in {", ".join(FIGURE_EXTENSIONS)} (the '
                         f'formats written), e.g. {os.path.basename(stem) or "figure"}.png.')


def check_flag_combinations(args):
    """The first problem between flags that each passed their own check, as a one-line message, or None.

    Works on any namespace: a flag its parser lacks (the data flags outside the tools) is not checked. Pairs
    declared with metavar ('MIN', 'MAX') are checked for order by ArgumentParser itself.
    """
    get = vars(args).get
    hidden_dim, nheads = get('hidden_dim'), get('nheads')
    if hidden_dim is not None and nheads is not None:
        if hidden_dim % nheads:
            return (f'--hidden_dim {hidden_dim} is not divisible by --nheads {nheads}: each head gets '
                    f'hidden_dim / nheads channels; e.g. --hidden_dim {max(1, round(hidden_dim / nheads)) * nheads}')
        # The sine encoding gives half the channels to rows and half to columns, each in sin/cos pairs.
        if get('position_embedding') == 'sine' and hidden_dim % 4:
            return (f'--position_embedding sine needs --hidden_dim divisible by 4 (half the channels for rows, half '
                    f'for columns, each in sin/cos pairs), got {hidden_dim}; '
                    f'e.g. --hidden_dim {hidden_dim // 4 * 4 or 4}')
        if get('position_embedding') == 'learned' and hidden_dim % 2:
            return (f'--position_embedding learned needs an even --hidden_dim (half the channels for rows, half '
                    f'for columns), got {hidden_dim}')
    if get('attention_impl') is not None:
        problem = attention_impl_problem(get('attention_impl'), rpe_config_from_string(get('enc_rpe2d')))
        if problem:
            return problem
    device = get('device')
    if get('attention_impl') == 'triton' and device is not None and not str(device).startswith('cuda'):
        return (f'--attention_impl triton runs Triton kernels on a GPU; --device {device} has none: use '
                f'--attention_impl auto (or sdpa) there, or --device cuda')
    if get('compile') == 'reduce-overhead' and device is not None and not str(device).startswith('cuda'):
        return (f'--compile reduce-overhead records CUDA graphs; --device {device} has no GPU: use --compile '
                '(default mode) there, or --device cuda')
    problem = data_location_problem(args) or world_size_problem(get('world_size'))
    if problem:
        return problem
    costs = [get(k) for k in ('set_cost_class', 'set_cost_bbox', 'set_cost_giou')]
    if None not in costs and not any(costs):
        return 'all matching costs are 0: set at least one of --set_cost_class, --set_cost_bbox, --set_cost_giou'
    for max_flag, scale_flag in (('train_max_size', 'train_scales'), ('val_max_size', 'val_size')):
        scales, max_size = get(scale_flag), get(max_flag)
        if scales is None or max_size is None:
            continue
        largest = max(scales) if isinstance(scales, list) else scales
        if max_size <= largest:
            return (f'--{max_flag} {max_size} must be larger than --{scale_flag} {largest}: the longest side '
                    f'is capped at {max_flag} after the shorter one is resized to {scale_flag}')
    # That the backbone is frozen is checked where its copy is made: datasets' FrozenBackboneCollate.
    if get('backbone_in_workers'):
        if get('num_workers') == 0:
            return ('--backbone_in_workers needs --num_workers 1 or more: with 0 there is no worker to run the '
                    'backbone in; give workers, or add --no-backbone_in_workers (e.g. over configs/demo.yaml)')
        if get('device') is not None and not str(get('device')).startswith('cpu'):
            return (f"--backbone_in_workers runs the backbone on the CPU of the loader's workers; it is for --device "
                    f"cpu, got --device {get('device')}: on a GPU the backbone is fast where it is")
    if get('position_embedding') == 'learned':
        # PositionEmbeddingLearned has 50 rows and 50 columns of the feature map (stride 32, 16 with --dilation)
        # of images padded to multiples of --size_divisibility.
        stride, multiple = (16 if get('dilation') else 32), get('size_divisibility') or 1
        for flag in (f for f in ('train_max_size', 'val_max_size') if get(f) is not None):
            padded = -(-get(flag) // multiple) * multiple
            if -(-padded // stride) > 50:
                pads = f', padded to {padded} by --size_divisibility {multiple},' if padded != get(flag) else ''
                return (f'--position_embedding learned covers feature maps up to 50 x 50, i.e. images up to '
                        f'{50 * stride} px (stride {stride}); --{flag} {get(flag)}{pads} is larger')
    return None


def world_size_problem(world_size):
    """--world_size given otherwise than torchrun launched (it was read from torchrun alone: a run without torchrun
    ran one process whatever the flag said)."""
    launched = int(os.environ.get('WORLD_SIZE', 1))
    if world_size is None or world_size == launched:
        return None
    how = f'torchrun started {launched}' if 'WORLD_SIZE' in os.environ else 'without torchrun this is one'
    return (f'--world_size {world_size}: the processes are the ones torchrun starts ({how}); launch `torchrun '
            f'--nproc_per_node {world_size} tools/train.py ...` and leave --world_size out')


def data_location_problem(args):
    """A data flag that the chosen dataset does not read, or both ways of giving COCO-format data at once."""
    if 'dataset_file' not in vars(args):  # a parser without the data flags (datasets/ may not be installed)
        return None
    from detr_irpe_datasets.build import DATA_LOCATION_FLAGS
    given = [flag for flag in DATA_LOCATION_FLAGS if vars(args).get(flag)]
    if not given:
        return None
    shown = ' '.join(f'--{flag}' for flag in given)
    if vars(args).get('dataset_file') == 'synthetic':
        return (f'{shown} given, but --dataset_file is synthetic (the built-in shapes), which reads no files: add '
                f'--dataset_file coco to train on them (a --config preset may have chosen synthetic), or leave out '
                f'{shown}')
    if 'coco_path' in given and len(given) > 1:
        return (f'{shown}: give either --coco_path (COCO\'s layout) or the files (--train_json FILE --train_images '
                f'FOLDER --val_json FILE --val_images FOLDER), not both')
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that, after every parse, checks MIN MAX pairs (metavar ('MIN', 'MAX')) for order and the
    flags against each other (check_flag_combinations): a problem is a usage error naming the flags."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if action.metavar == ('MIN', 'MAX') and isinstance(value, (list, tuple)) and value[0] > value[1]:
                self.error(f'argument {action.option_strings[0]}: MIN {value[0]} is larger than MAX {value[1]}')
        problem = check_flag_combinations(namespace)
        if problem:
            self.error(problem)
        return namespace, extra


def add_model_args(p, attention=True):
    """The flags that shape the model: what a checkpoint's 'args' keeps and the inference tools take from it; with
    attention, --attention_impl (how the encoder computes attention, not what)."""
    g = p.add_argument_group('model')
    g.add_argument('--backbone', default='resnet50', choices=['resnet18', 'resnet34', 'resnet50', 'resnet101'])
    g.add_argument('--dilation', action=argparse.BooleanOptionalAction, default=False,
                   help='dilated C5 stage (DETR-DC5; --no-dilation undoes a preset\'s)')
    g.add_argument('--position_embedding', default='sine', choices=['sine', 'learned', 'none'],
                   help="absolute position encoding; 'none' keeps only iRPE")
    g.add_argument('--enc_layers', default=6, type=int_range(0, MAX_LAYERS))
    g.add_argument('--dec_layers', default=6, type=int_range(1, MAX_LAYERS))
    g.add_argument('--dim_feedforward', default=2048, type=int_range(1, MAX_WIDTH))
    g.add_argument('--hidden_dim', default=256, type=int_range(1, MAX_WIDTH))
    g.add_argument('--nheads', default=8, type=int_range(1, MAX_WIDTH))
    g.add_argument('--num_queries', default=100, type=int_range(1, MAX_COUNT))
    g.add_argument('--pre_norm', action=argparse.BooleanOptionalAction, default=False,
                   help='layer norm before attention and feed-forward, not after (--no-pre_norm undoes a preset\'s)')
    g.add_argument('--enc_rpe2d', default='', type=enc_rpe2d_flag,
                   help=f"iRPE in encoder self-attention: {RPE_STRING_FORMAT}, e.g. 'rpe-2.0-product-ctx-1-k'; "
                        "empty for none")
    if attention:
        g.add_argument('--attention_impl', default='auto', choices=ATTENTION_IMPLS,
                       help="encoder attention: 'flex' adds the iRPE terms inside one flex_attention kernel (no iRPE "
                            "on values, no attention dropout; on CPU inference only), 'triton' runs iRPE on queries, "
                            "keys and values in fused Triton kernels (CUDA; no cross method), "
                            "'sdpa' the SDPA/explicit path, 'auto' flex on CUDA where it applies, sdpa otherwise")
    g.add_argument('--num_classes', default=None, type=int_range(1, MAX_CLASSES),
                   help="largest category id + 1 (DETR's convention; the model adds the no-object class); default: "
                        "from the training annotation file (91 for COCO)")
    return p


def add_initialisation_args(g):
    """How a new model starts: training's, and visualize_rpe's untrained model. Returns g."""
    g.add_argument('--rpe_init', default='xavier', choices=RPE_INITS,
                   help="iRPE tables start xavier-initialised like every transformer matrix (the published "
                        "code) or at zero (the paper's appendix)")
    g.add_argument('--backbone_weights', default='imagenet', type=backbone_weights_flag,
                   help="'imagenet' (torchvision's ImageNet weights, downloaded once), 'none' (random), "
                        "or a path to a state dict")
    g.add_argument('--seed', default=42, type=int_range(0, MAX_SEED))
    return g


def add_training_args(p):
    """The recipe: optimizer, schedule, what only training builds (backbone weights, dropout, losses), resuming,
    checkpoints, precision, distributed processes."""
    g = p.add_argument_group('training')
    g.add_argument('--lr', default=1e-4, type=float_range(0))
    g.add_argument('--lr_backbone', default=1e-5, type=float_range(0), help='0 freezes the whole backbone')
    g.add_argument('--weight_decay', default=1e-4, type=float_range(0))
    g.add_argument('--rpe_weight_decay', default=None, type=float_range(0),
                   help="weight decay of the iRPE tables (default: --weight_decay, as the published code; "
                        "0 as the paper's appendix)")
    add_initialisation_args(g)
    g.add_argument('--epochs', default=300, type=int_range(0))
    g.add_argument('--lr_drop', default=200, type=int_range(1), help='epoch at which the learning rate drops 10x')
    g.add_argument('--lr_warmup', default=0, type=int_range(0), help='steps of linear learning-rate warm-up (0: none, as DETR)')
    g.add_argument('--clip_max_norm', default=0.1, type=float_range(0), help='gradient clipping max norm (0: none)')
    g.add_argument('--finetune', default=None, type=non_empty, metavar='PATH',
                   help='start a new run (epoch 0, fresh optimizer and schedule) from the weights of PATH: '
                        f'{FORMATS_HELP}; its model flags unless given, the class head matched by category name')
    g.add_argument('--dropout', default=0.1, type=float_range(0, 1, high_open=True))
    g.add_argument('--no_aux_loss', dest='aux_loss', action='store_false',
                   help='turn off the auxiliary decoding losses, which are on by default (a loss at every decoder '
                        'layer, as DETR)')
    g.add_argument('--set_cost_class', default=1, type=float_range(0, MAX_COEF))
    g.add_argument('--set_cost_bbox', default=5, type=float_range(0, MAX_COEF))
    g.add_argument('--set_cost_giou', default=2, type=float_range(0, MAX_COEF))
    g.add_argument('--bbox_loss_coef', default=5, type=float_range(0, MAX_COEF))
    g.add_argument('--giou_loss_coef', default=2, type=float_range(0, MAX_COEF))
    g.add_argument('--eos_coef', default=0.1, type=float_range(0, MAX_COEF), help='weight of the no-object class')
    g.add_argument('--start_epoch', default=0, type=int_range(0))
    g.add_argument('--eval', action='store_true', help='only evaluate')
    g.add_argument('--checkpoint_every', default=0, type=int_range(0),
                   help='also write the checkpoint every N training steps within an epoch (0: only at epoch end)')
    g.add_argument('--eval_every', default=1, type=int_range(1), help='evaluate on val every N epochs')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='autocast to what the device computes natively (detr_irpe/precision.py): bfloat16 on GPUs '
                        'that have it, float16 with a gradient scaler on older GPUs, bfloat16 on CPUs with '
                        "AMX or AMD's AVX512_BF16, float32 on other CPUs; the choice is printed at start-up (--no-amp "
                        "undoes a preset's)")
    g.add_argument('--backbone_in_workers', action=argparse.BooleanOptionalAction, default=False,
                   help='run the frozen backbone (--lr_backbone 0) in the data loader\'s worker processes, so on the '
                        'CPU it overlaps the transformer\'s step on other cores; the same numbers (--device cpu, '
                        '--num_workers 1 or more; --no-backbone_in_workers undoes a preset\'s)')
    g.add_argument('--world_size', default=None, type=int_range(1),
                   help='number of distributed processes: torchrun sets it (--nproc_per_node x --nnodes); given, it '
                        'must match')
    g.add_argument('--dist_url', default='env://', type=non_empty, help='url used to set up distributed training')
    # 10 minutes: longer than a healthy run's longest wait (the main process's COCO evaluation and checkpoint
    # write, a few minutes on COCO), short enough that a group waiting for a lost peer ends and torchrun or the
    # scheduler starts it again.
    g.add_argument('--dist_timeout', default=600, type=int_range(1, 86400),
                   help='seconds a process waits for the others (at start-up and in every collective) before it '
                        'fails, so a group whose peer never comes ends instead of hanging')
    return p


RESUME_HELP = ("checkpoint to resume from: a path, or 'auto' (output_dir/checkpoint.pth when it exists, else start "
               'fresh: one command line for the first launch and every restart)')
CHECKPOINT_HELP = ('the detector to load: its weights and model flags, and from a checkpoint of tools/train.py its '
                   'val size, dataset and category names as defaults (flags given here win). Any of: ' + FORMATS_HELP)
OUTPUT_HELP = 'where to save checkpoints, logs and eval.json'


COMPILE_MODES = ('default', 'reduce-overhead')  # torch.compile's modes; the second records CUDA graphs


def add_run_args(p, loader=True, device=True, resume_help=RESUME_HELP, output_help=OUTPUT_HELP):
    """Where a run reads and writes (--resume, --output_dir), its device and threads; with loader, the data loader
    and evaluation flags too."""
    g = p.add_argument_group('run')
    if device:
        g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=device_flag)
        g.add_argument('--output_dir', default='', help=output_help)
    g.add_argument('--resume', default='', help=resume_help)
    g.add_argument('--threads', default=0, type=int_range(0, 4096),
                   help="torch CPU threads (0: torch's default). 1 is faster on a machine other work shares: "
                        'threads of one process wait for each other at every operation when a core is taken')
    if loader:
        g.add_argument('--batch_size', default=2, type=int_range(1), help='images per process')
        g.add_argument('--num_workers', default=2, type=int_range(0, 256))
        g.add_argument('--compile', nargs='?', const='default', default=None, choices=COMPILE_MODES,
                       help="torch.compile the model (training and evaluation); the first steps take longer. "
                            "'--compile reduce-overhead' (CUDA) replays the model's kernels as CUDA graphs, one "
                            "recorded per batch shape: pair it with --size_divisibility 128")
        g.add_argument('--size_divisibility', default=1, type=int_range(1, 4096),
                       help='pad each batch to height and width multiples of this (1: to its largest image, as '
                            'DETR); fewer batch shapes for --compile (detectron2 pads to 32)')
        g.add_argument('--eval_backend', default=None, choices=['faster_coco_eval', 'pycocotools'],
                       help="COCOeval implementation (default: faster_coco_eval where installed, else pycocotools); "
                            "both give the same stats")
    return p


def add_data_args(p, train=True):
    """The dataset and its transforms (datasets/: build_dataset, make_transforms); with train, the training
    split's resizing and cropping too."""
    # Here, not at the top: get_model_parser() must run from a bare checkout, where datasets/ is not installed.
    from detr_irpe_datasets.synthetic import SHAPES
    side = int_range(1, MAX_IMAGE_SIDE)  # pixels
    g = p.add_argument_group('data')
    g.add_argument('--dataset_file', default='coco', choices=['coco', 'synthetic'],
                   help="'coco': COCO-format annotation files, from --coco_path's layout or from --*_json and "
                        "--*_images; 'synthetic': the built-in shapes")
    g.add_argument('--coco_path', type=non_empty, default=None,
                   help='a folder in COCO\'s layout: train2017/, val2017/, annotations/instances_{train,val}2017.json')
    splits = ('train', 'val') if train else ('val',)
    for split in splits:
        g.add_argument(f'--{split}_json', type=non_empty, default=None, metavar='FILE',
                       help=f'the {split} split\'s COCO-format annotation file, anywhere (instead of --coco_path)')
        g.add_argument(f'--{split}_images', type=non_empty, default=None, metavar='FOLDER',
                       help=f"the folder (or .zip) that the file_names of --{split}_json are relative to")
    if train:
        g.add_argument('--train_scales', type=side, nargs='+', default=list(range(480, 801, 32)),
                       help='training: the shorter side is resized to one of these')
        g.add_argument('--train_max_size', type=side, default=1333, help='training: longest side at most this')
        g.add_argument('--crop_scales', type=side, nargs='+', default=[400, 500, 600],
                       help='training, crop branch: shorter side resized to one of these before the crop')
        g.add_argument('--crop_size', type=side, nargs=2, default=[384, 600], metavar=('MIN', 'MAX'),
                       help='training, crop branch: crop height and width are drawn in [MIN, MAX]')
    g.add_argument('--val_size', type=side, default=800, help='validation: shorter side')
    g.add_argument('--val_max_size', type=side, default=1333, help='validation: longest side at most this')
    g.add_argument('--synthetic_dir', default='.cache/synthetic', type=non_empty,
                   help='where --dataset_file synthetic writes its COCO-layout folder')
    g.add_argument('--synthetic_train', type=int_range(1, MAX_COUNT), default=1000,
                   help='synthetic: number of training images')
    g.add_argument('--synthetic_val', type=int_range(1, MAX_COUNT), default=100,
                   help='synthetic: number of validation images')
    g.add_argument('--synthetic_image_size', type=int_range(MIN_SYNTHETIC_SIDE, MAX_IMAGE_SIDE), default=128,
                   help='synthetic: image side in pixels')
    g.add_argument('--synthetic_classes', type=int_range(1, len(SHAPES)), default=4,
                   help=f'synthetic: number of shape categories (at most {len(SHAPES)})')
    g.add_argument('--synthetic_objects', type=int_range(0, 100), nargs=2, default=[1, 3], metavar=('MIN', 'MAX'),
                   help='synthetic: objects per image')
    g.add_argument('--synthetic_object_size', type=float_range(0.01, 1), nargs=2, default=[0.2, 0.45],
                   metavar=('MIN', 'MAX'), help='synthetic: object size sqrt(w h) as a fraction of the image side')
    g.add_argument('--synthetic_seed', type=int_range(0, MAX_SEED), default=0,
                   help='synthetic: seed of the drawing')
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default, and the tool's docstring as written (its example commands intact)."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help  # a switch's "(default: True)" reads as its own default: --no_aux_loss's was wrong
        return super()._get_help_string(action)

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)  # a flag without help text still shows its default (a preset's, with --config)
            action.help = 'default: %(default)s'
        return super()._format_action(action)


def new_parser(description='DETR with iRPE', add_help=True):
    """An ArgumentParser (the flags checked against each other after every parse) with no flags yet."""
    return ArgumentParser(description=description, add_help=add_help, formatter_class=HelpFormatter)


def get_model_parser(add_help=True):
    """The flags build_model reads: the model, the recipe and the run, without the data's (the model then has DETR's
    COCO classes unless --num_classes is given). What benchmarks and the GPU check build their models from."""
    p = new_parser(add_help=add_help)
    for add in (add_model_args, add_training_args, add_run_args):
        add(p)
    return p


def get_args_parser(add_help=True):
    """Every flag of a training run (tools/train.py): the model, the recipe, the run and the data."""
    return add_data_args(get_model_parser(add_help))
