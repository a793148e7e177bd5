"""Evaluate a checkpoint (this project's, or a published DETR / DETR-with-iRPE model-zoo file) on the val
split with pycocotools; write eval.json, and the detections as COCO results JSON when asked.

    python tools/eval.py --config configs/demo.yaml --resume outputs/demo/checkpoint.pth
    python tools/eval.py --coco_path /data/coco --resume detr_irpe_r50_150ep.pth --output_dir runs/eval \\
        --results_json runs/eval/detections.json

Model flags (--backbone, --enc_rpe2d, ...) are taken from the checkpoint's saved args unless given.
"""
import os

import torch
from torch.utils.data import DataLoader

import detr_irpe_datasets.build as datasets
from detr_irpe import engine
from detr_irpe.checkpoint import save_json
from detr_irpe.cli.flags import CHECKPOINT_HELP, add_data_args, add_model_args, add_run_args, new_parser, non_empty
from detr_irpe.cli.presets import explicit_flags, parse_checkpoint_args
from detr_irpe.cli.runner import run_tool
from detr_irpe.from_checkpoint import build_model_from_checkpoint
from detr_irpe_datasets.coco_eval import resolve_backend


def get_parser():
    """The model flags (taken from the checkpoint unless given), the run's, and the val split's data flags."""
    parser = new_parser(description=__doc__)
    add_model_args(parser)
    add_run_args(parser, resume_help=CHECKPOINT_HELP)
    add_data_args(parser, train=False)
    parser.add_argument('--results_json', default=None, type=non_empty,
                        help='also write the detections as a COCO results JSON')
    return parser


def run(argv=None):
    parser = get_parser()
    args = parse_checkpoint_args(parser, argv, 'the .pth file to evaluate')
    args.eval_backend = resolve_backend(args.eval_backend)
    model, postprocessors, _ = build_model_from_checkpoint(args, explicit_flags(get_parser(), argv))
    device = torch.device(args.device)
    model.to(device)
    if args.compile:
        model = torch.compile(model)
    dataset = datasets.build_dataset('val', args)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=datasets.collate_fn,
                        num_workers=args.num_workers)
    evaluator = datasets.CocoEvaluator(datasets.get_coco_api_from_dataset(dataset), backend=args.eval_backend)
    summary = engine.evaluate(model, postprocessors, loader, evaluator, device)
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.resume))
    save_json({**summary, 'checkpoint': os.path.abspath(args.resume)}, os.path.join(output_dir, 'eval.json'))
    print(f'wrote {os.path.join(output_dir, "eval.json")}')
    if args.results_json:
        save_json(evaluator.results(), args.results_json, indent=None)
        print(f'wrote {args.results_json}')


def main(argv=None):
    run_tool(run, argv)
