"""Show the extra attention logits b_ij that iRPE adds in an encoder layer (the paper's Fig. 5): for 5x5
reference positions i spread uniformly over the feature map of an image, the map of b_ij over all keys j.

    python tools/visualize_rpe.py --config configs/smoke.yaml --resume outputs/smoke/checkpoint.pth \\
        --image .cache/synthetic_smoke/val2017/000001.jpg --val_size 448 --val_max_size 640
    python tools/visualize_rpe.py --resume detr_irpe_r50_150ep.pth --image street.jpg --layer 5 --head 0 \\
        --output_dir runs/rpe

b_ij = rpe_k(q_i)_j (+ rpe_q(k_j)_i) in the logits of softmax(q k^T / sqrt(d) + b), averaged over heads
unless --head is given; one colour scale for all 25 maps. Model flags come from the checkpoint unless given;
without --resume the model is built from the flags: its iRPE tables untrained (Xavier noise drawn with --seed, or 0 with
--rpe_init zero), its backbone from --backbone_weights.
A larger --val_size gives a larger feature map (the backbone's stride is 32). Writes
output_dir/rpe_<image>_layer<k>.png; output_dir defaults to the checkpoint's folder (outputs/ without one); a
--config preset's output_dir is its training run's folder, so only the command line's counts.
"""
import os


import torch

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError
from detr_irpe.cli.flags import (CHECKPOINT_HELP, MAX_LAYERS, MAX_WIDTH, add_data_args, add_initialisation_args,
                                 add_model_args, add_run_args, int_range, new_parser, non_empty)
from detr_irpe.cli.presets import (command_line_flags, explicit_flags, output_dir_of_command_line,
                                   parse_args_with_config)
from detr_irpe.cli.runner import run_tool
from detr_irpe.convert import folder_beside
from detr_irpe.detr import build_detector
from detr_irpe.from_checkpoint import INFERENCE_DEFAULTS, build_model_from_checkpoint
from detr_irpe.lab.plots import (describe_rpe, irpe_logit_terms, load_image, plot_irpe_terms, save_figure,
                               uniform_reference_positions)

def get_parser():
    parser = new_parser(description=__doc__)
    add_model_args(parser)
    add_run_args(parser, loader=False, resume_help=CHECKPOINT_HELP + ' (without it: an untrained model of the flags)')
    add_data_args(parser, train=False)  # the val transform; without --resume, the number of classes
    add_initialisation_args(parser.add_argument_group('the untrained model (without --resume)'))
    parser.add_argument('--image', required=True, type=non_empty, help='the image whose feature map is shown')
    parser.add_argument('--layer', type=int_range(-MAX_LAYERS, MAX_LAYERS - 1), default=0,
                        help='encoder layer (0 is the first, -1 the last)')
    parser.add_argument('--head', type=int_range(0, MAX_WIDTH - 1), default=None,
                        help='one attention head (default: mean over heads)')
    parser.add_argument('--grid', type=int_range(1, 50), default=5, help='reference positions per side')
    parser.add_argument('--dpi', type=int_range(10, 1200), default=100)
    return parser


def run(argv=None):
    parser = get_parser()
    args = parse_args_with_config(parser, argv)
    output_dir_of_command_line(parser, argv, args)
    image = load_image(args.image)[0]  # a file that is no image stops here, before the model is built
    if args.resume:
        ignored = sorted(command_line_flags(add_initialisation_args(new_parser(add_help=False)), argv))
        if ignored:
            raise UsageError(f"{', '.join('--' + f for f in ignored)} shape the untrained model built without --resume; "
                             f'--resume {args.resume} has its weights: leave them out, or leave out --resume')
        model, _, _ = build_model_from_checkpoint(args, explicit_flags(get_parser(), argv))
        source = os.path.basename(args.resume)
    else:
        if args.num_classes is None:
            args.num_classes = datasets.num_classes_for(args)
        for name, value in INFERENCE_DEFAULTS.items():
            setattr(args, name, value)
        torch.manual_seed(args.seed)
        model = build_detector(args)[0].eval()
        source = 'untrained model'
        print('no --resume: the model is built from the flags; its iRPE tables are untrained (Xavier noise, or '
              'zero with --rpe_init zero), so b_ij shows nothing learned.')
    model.to(torch.device(args.device))
    transform = datasets.make_transforms('val', val_size=args.val_size, val_max_size=args.val_max_size)
    tensor = transform(image)
    terms, height, width = irpe_logit_terms(model, [tensor.to(args.device)], args.layer)
    terms = terms[0]
    if args.head is not None:
        if not 0 <= args.head < terms.shape[0]:
            raise UsageError(f'--head {args.head} does not exist: the model has {terms.shape[0]} heads.')
        terms, which = terms[args.head], f'head {args.head}'
    else:
        terms, which = terms.mean(0), f'mean of {terms.shape[0]} heads'
    references = uniform_reference_positions(height, width, args.grid)
    title = (f'iRPE term b_ij, encoder layer {args.layer}, {which} ({describe_rpe(model, args.layer)}); '
             f'{source}, {os.path.basename(args.image)}')
    fig = plot_irpe_terms(image, terms, height, width, references, title)
    output_dir = args.output_dir or (folder_beside(args.resume) if args.resume else 'outputs')
    stem = os.path.splitext(os.path.basename(args.image))[0]
    path = save_figure(fig, os.path.join(output_dir, f'rpe_{stem}_layer{args.layer}.png'), args.dpi)
    print(f'wrote {path}')
    return path


def main(argv=None):
    run_tool(run, argv)
