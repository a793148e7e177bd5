#!/usr/bin/env python
"""Evaluate a checkpoint (this project's, or a published DETR / DETR-with-iRPE model-zoo file) on the val
split with pycocotools; write eval.json, and the detections as COCO results JSON when asked.

    python tools/eval.py --config configs/demo.yaml --resume outputs/demo/checkpoint.pth
    python tools/eval.py --coco_path /data/coco --resume detr_irpe_r50_150ep.pth --output_dir runs/eval \\
        --results_json runs/eval/detections.json

Model flags (--backbone, --enc_rpe2d, ...) are taken from the checkpoint's saved args unless given.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import datasets  # noqa: E402
from detr_irpe import engine, get_args_parser  # noqa: E402
from detr_irpe.args import non_empty  # noqa: E402
from detr_irpe.checkpoint import build_model_from_checkpoint, save_json  # noqa: E402
from detr_irpe.config import explicit_flags, parse_args_with_config, run_tool  # noqa: E402


def get_parser():
    parser = datasets.add_dataset_args(get_args_parser())
    parser.add_argument('--results_json', default=None, type=non_empty,
                        help='also write the detections as a COCO results JSON')
    return parser


def main(argv=None):
    parser = get_parser()
    args = parse_args_with_config(parser, argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.resume:
        parser.error('--resume CHECKPOINT is required: the .pth file to evaluate')
    args.eval_backend = datasets.coco_eval.resolve_backend(args.eval_backend)
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


if __name__ == '__main__':
    run_tool(main)
