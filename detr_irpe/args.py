"""Command-line flags: DETR's, with DETR's defaults, plus --enc_rpe2d and --backbone_weights."""
import argparse

import torch

from detr_irpe.irpe import RPE_STRING_FORMAT, rpe_config_from_string


def enc_rpe2d_flag(text):
    """argparse type for --enc_rpe2d: a malformed string becomes the parser's usage error."""
    try:
        rpe_config_from_string(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser('DETR with iRPE', add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--lr', default=1e-4, type=float)
    p.add_argument('--lr_backbone', default=1e-5, type=float, help='0 freezes the whole backbone')
    p.add_argument('--batch_size', default=2, type=int, help='images per process')
    p.add_argument('--weight_decay', default=1e-4, type=float, help='not applied to iRPE tables')
    p.add_argument('--epochs', default=300, type=int)
    p.add_argument('--lr_drop', default=200, type=int, help='epoch at which the learning rate drops 10x')
    p.add_argument('--lr_warmup', default=0, type=int, help='steps of linear learning-rate warm-up (0: none, as DETR)')
    p.add_argument('--clip_max_norm', default=0.1, type=float, help='gradient clipping max norm (0: none)')
    p.add_argument('--frozen_weights', type=str, default=None,
                   help='path to a pretrained model; if set, only the mask head would be trained (unused here)')

    # Model
    p.add_argument('--backbone', default='resnet50', choices=['resnet18', 'resnet34', 'resnet50', 'resnet101'])
    p.add_argument('--backbone_weights', default='imagenet',
                   help="'imagenet' (torchvision's ImageNet weights, downloaded once), 'none' (random), "
                        "or a path to a state dict")
    p.add_argument('--dilation', action='store_true', help='dilated C5 stage (DETR-DC5)')
    p.add_argument('--position_embedding', default='sine', choices=['sine', 'learned', 'none'],
                   help="absolute position encoding; 'none' keeps only iRPE")
    p.add_argument('--enc_layers', default=6, type=int)
    p.add_argument('--dec_layers', default=6, type=int)
    p.add_argument('--dim_feedforward', default=2048, type=int)
    p.add_argument('--hidden_dim', default=256, type=int)
    p.add_argument('--dropout', default=0.1, type=float)
    p.add_argument('--nheads', default=8, type=int)
    p.add_argument('--num_queries', default=100, type=int)
    p.add_argument('--pre_norm', action='store_true')
    p.add_argument('--enc_rpe2d', default='', type=enc_rpe2d_flag,
                   help=f"iRPE in encoder self-attention: {RPE_STRING_FORMAT}, e.g. 'rpe-2.0-product-ctx-1-k'; "
                        "empty for none")
    p.add_argument('--num_classes', default=None, type=int,
                   help='classes + 1 (largest category id + 1); default 91 for coco, the dataset\'s own otherwise')

    # Loss
    p.add_argument('--no_aux_loss', dest='aux_loss', action='store_false',
                   help='no auxiliary decoding losses (loss at each decoder layer)')
    p.add_argument('--set_cost_class', default=1, type=float)
    p.add_argument('--set_cost_bbox', default=5, type=float)
    p.add_argument('--set_cost_giou', default=2, type=float)
    p.add_argument('--bbox_loss_coef', default=5, type=float)
    p.add_argument('--giou_loss_coef', default=2, type=float)
    p.add_argument('--eos_coef', default=0.1, type=float, help='weight of the no-object class')

    # Data and run
    p.add_argument('--dataset_file', default='coco', choices=['coco', 'synthetic'])
    p.add_argument('--coco_path', type=str, default=None)
    p.add_argument('--output_dir', default='', help='where to save checkpoints, logs and eval.json')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', default=42, type=int)
    p.add_argument('--resume', default='', help='checkpoint to resume from (a path)')
    p.add_argument('--start_epoch', default=0, type=int)
    p.add_argument('--eval', action='store_true', help='only evaluate')
    p.add_argument('--checkpoint_every', default=0, type=int,
                   help='also write the checkpoint every N training steps within an epoch (0: only at epoch end)')
    p.add_argument('--eval_every', default=1, type=int, help='evaluate on val every N epochs')
    p.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, float16 on GPU)')
    p.add_argument('--num_workers', default=2, type=int)
    p.add_argument('--threads', default=0, type=int,
                   help="torch CPU threads (0: torch's default). 1 is faster on a machine other work shares: "
                        'threads of one process wait for each other at every operation when a core is taken')
    p.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    p.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    return p
