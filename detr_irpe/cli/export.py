"""Export a checkpoint for deployment: an ONNX file that plain onnxruntime runs, or a torch.export program.

    python tools/export.py --config configs/smoke.yaml --resume outputs/smoke/checkpoint.pth \\
        --format onnx --output outputs/smoke/detr.onnx
    python tools/export.py --resume detr_irpe_r50_150ep.pth --format pt2 --output runs/detr_irpe.pt2

Inputs of the exported graph: images (B, 3, H, W) float32, normalised as for evaluation, and mask (B, H, W)
bool, True on padding; outputs pred_logits (B, Q, num_classes + 1) and pred_boxes (B, Q, 4) normalised
cxcywh. B, H and W are dynamic (H, W at least 33). The checkpoint is any detector file or folder
detr_irpe.convert reads; model flags come from it unless given. Its category names and val transform size
(--val_size, --val_max_size, from a checkpoint of tools/train.py) go into the file as JSON: the ONNX file's
metadata_props 'category_names' ({id: name}), 'val_size', 'val_max_size' (tools/predict.py --onnx takes the size
from there), the .pt2 program's extra files of the same names. The export runs on the CPU. The file is written
beside --output and run once on a batch of another size against the PyTorch model (the largest difference is
printed); it takes --output's place only when it agrees (within 1e-3 of each output's scale, detr_irpe.export.
AGREEMENT), else the tool fails, naming the difference, and --output is left as it was.
"""
import os

import torch

from detr_irpe.checkpoint import check_output_file
from detr_irpe.cli.flags import CHECKPOINT_HELP, add_model_args, add_run_args, int_range, new_parser
from detr_irpe.cli.presets import explicit_flags, parse_checkpoint_args
from detr_irpe.cli.runner import run_tool
from detr_irpe.export import AGREEMENT, FORMATS, MAX_OPSET, MIN_OPSET, export_onnx, export_pt2, max_difference
from detr_irpe.from_checkpoint import build_model_from_checkpoint
from detr_irpe.lab.benchmark import time_against_pytorch


def get_parser():
    """The model flags (taken from the checkpoint unless given), --resume, --threads and the export's own."""
    parser = new_parser(description=__doc__)
    add_model_args(parser, attention=False)  # the export runs SDPA: flex_attention has no ONNX form
    add_run_args(parser, loader=False, device=False, resume_help=CHECKPOINT_HELP)
    parser.add_argument('--format', choices=FORMATS, default=None,
                        help='onnx (onnxruntime, TensorRT, OpenVINO) or pt2 (torch.export.save); default: from '
                             "--output's extension")
    parser.add_argument('--output', required=True, help='the file to write (.onnx or .pt2)')
    parser.add_argument('--benchmark', type=int_range(0), default=0, metavar='REPEATS',
                        help='then time the exported file against PyTorch eager on two images (640x853, 600x800), '
                             'medians of this many interleaved repeats (0: no timing)')
    parser.add_argument('--opset', type=int_range(MIN_OPSET, MAX_OPSET), default=MIN_OPSET,
                        help=f'ONNX opset, {MIN_OPSET} to {MAX_OPSET}')
    return parser


def run(argv=None):
    parser = get_parser()
    args = parse_checkpoint_args(parser, argv, 'the detector to export')
    fmt = args.format or os.path.splitext(args.output)[1].lstrip('.').lower()
    if fmt not in FORMATS:
        parser.error(f'--output {args.output!r} ends in neither .onnx nor .pt2: pass --format onnx or --format pt2.')
    # Checked before the slow part, so that a typo costs no export (--opset is checked at parse).
    check_output_file('--output', args.output, f'detr.{fmt}')
    # On the CPU, with SDPA: flex_attention's compiled kernel has no ONNX form (and 'auto' is SDPA there).
    args.device, args.attention_impl = 'cpu', 'sdpa'
    model, _, source = build_model_from_checkpoint(args, explicit_flags(get_parser(), argv))
    # of the checkpoint's data flags (empty unless tools/train.py wrote it) the file keeps the val size only
    kept = {'category_names': source.category_names, 'size_flags': source.data_flags}

    def check(written):  # before the file takes --output's place: one that disagrees never does
        size, output, difference, bound = max_difference(model, written, fmt)
        batch = f'a batch of {size[0]} images of {size[1]}x{size[2]} (one padded)'
        if difference > bound:
            raise RuntimeError(f'the exported {fmt} file differs from PyTorch by {difference:.2e} in {output} on '
                               f'{batch}, beyond the bound {bound:.1e} ({AGREEMENT:g} of the output\'s largest value, '
                               f'at least 1): it computes another model, so {args.output} is not written (a previous '
                               'file there is unchanged). Try another --opset, or --format pt2, and report it with '
                               'the versions of torch and onnxruntime.')
        print(f'checked on {batch}: largest difference from PyTorch {difference:.2e} ({output}; bound {bound:.1e})')
    if fmt == 'onnx':
        export_onnx(model, args.output, opset=args.opset, check=check, **kept)
    else:
        export_pt2(model, args.output, check=check, **kept)
    print(f'wrote {args.output}')
    if args.benchmark > 0:
        times = time_against_pytorch(model, args.output, fmt, repeats=args.benchmark, threads=args.threads)
        runner = 'onnxruntime' if fmt == 'onnx' else 'the .pt2 program'
        threads = torch.get_num_threads()
        print(f'inference on two images (640x853, 600x800), {threads} thread{"s" * (threads > 1)}: {runner} '
              f'{times["exported"]:.3f} s, PyTorch eager {times["pytorch"]:.3f} s, ratio '
              f'{times["exported"] / times["pytorch"]:.3f}')
    return args.output


def main(argv=None):
    run_tool(run, argv)
