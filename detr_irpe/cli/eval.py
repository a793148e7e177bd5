"""Evaluate a checkpoint (this project's, or a published DETR / DETR-with-iRPE model-zoo file) on the val
split with pycocotools; write eval.json, and the detections as COCO results JSON when asked.

    python tools/eval.py --config configs/demo.yaml --resume outputs/demo/checkpoint.pth
    python tools/eval.py --val_json val.json --val_images images --resume runs/mine/checkpoint.pth
    python tools/eval.py --coco_path /data/coco --resume detr_irpe_r50_150ep.pth --output_dir runs/eval \\
        --results_json runs/eval/detections.json

The checkpoint is any detector file or folder detr_irpe.convert reads (ours, DETR's, Hugging Face's). Model flags
(--backbone, --enc_rpe2d, ...) and, from ours, the data and size flags (--dataset_file, --val_size, ...) are taken
from it unless given. eval.json goes to eval_<checkpoint's name>/ beside the checkpoint unless --output_dir says; it
records the data it scored ('data': the val annotation file and image folder, or the synthetic set's parameters; the
val size and --size_divisibility), and an eval.json of other data is not replaced: pass another --output_dir.
A --results_json that cannot be written is refused before any work.
"""
import json
import os

import torch
from torch.utils.data import DataLoader

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError, engine
from detr_irpe.checkpoint import CHECKPOINT, check_output_file, save_json
from detr_irpe.cli.flags import CHECKPOINT_HELP, add_data_args, add_model_args, add_run_args, new_parser, non_empty
from detr_irpe.cli.presets import explicit_flags, output_dir_of_command_line, parse_checkpoint_args
from detr_irpe.cli.runner import loader_worker_init, run_tool
from detr_irpe.convert import folder_beside, is_hub_id
from detr_irpe.export import SIZE_FLAGS
from detr_irpe.from_checkpoint import build_model_from_checkpoint
from detr_irpe_datasets.coco_eval import resolve_backend


def get_parser():
    """The model flags (taken from the checkpoint unless given), the run's, and the val split's data flags."""
    parser = new_parser(description=__doc__)
    add_model_args(parser)
    add_run_args(parser, resume_help=CHECKPOINT_HELP,
                 output_help="where to write eval.json (default: eval_<checkpoint's name>/ beside the checkpoint); "
                             "never a training run's folder, whose eval.json is training's")
    add_data_args(parser, train=False)
    parser.add_argument('--results_json', default=None, type=non_empty,
                        help='also write the detections as a COCO results JSON')
    return parser


def run(argv=None):
    parser = get_parser()
    args = parse_checkpoint_args(parser, argv, 'the detector to evaluate')
    output_dir_of_command_line(parser, argv, args)
    output_dir = eval_output_dir(args)
    if args.results_json:  # checked before the slow part: a typo would cost the whole evaluation's detections
        check_output_file('--results_json', args.results_json, 'detections.json')
    args.eval_backend = resolve_backend(args.eval_backend)
    model, postprocessors, source = build_model_from_checkpoint(args, explicit_flags(get_parser(), argv))
    device = torch.device(args.device)
    model.to(device)
    if args.compile:
        model = torch.compile(model, mode=args.compile)
    dataset = datasets.build_dataset('val', args)
    datasets.check_annotated(dataset, args, 'val')
    datasets.warn_objects_beyond_queries({'val': dataset}, args.num_queries)
    datasets.check_categories(dataset, source.category_names, args.num_classes, f'--resume {args.resume}')
    data = scored_data(args, dataset)
    check_same_data(os.path.join(output_dir, 'eval.json'), data)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=datasets.collate_fn,
                        num_workers=args.num_workers, pin_memory=engine.pins_memory(args.device),
                        worker_init_fn=loader_worker_init)
    evaluator = datasets.CocoEvaluator(datasets.get_coco_api_from_dataset(dataset), backend=args.eval_backend)
    summary = engine.evaluate(model, postprocessors, loader, evaluator, device,
                              size_divisibility=args.size_divisibility)
    where = args.resume if is_hub_id(args.resume) else os.path.abspath(args.resume)
    save_json({**summary, 'checkpoint': where, 'data': data}, os.path.join(output_dir, 'eval.json'))
    print(f'wrote {os.path.join(output_dir, "eval.json")}')
    if args.results_json:
        save_json(evaluator.results(), args.results_json, indent=None)
        print(f'wrote {args.results_json}')


def eval_output_dir(args):
    """--output_dir, or eval_<checkpoint's name>/ beside the checkpoint; a training run's folder (it holds a
    checkpoint.pth or log.txt) is refused, so training's eval.json is never replaced."""
    stem = os.path.splitext(os.path.basename(os.path.abspath(args.resume)))[0]
    output_dir = args.output_dir or os.path.join(folder_beside(args.resume), f'eval_{stem}')
    run_files = [f for f in (CHECKPOINT, 'log.txt') if os.path.isfile(os.path.join(output_dir, f))]
    if run_files:
        raise UsageError(f"--output_dir {output_dir} is a training run's folder (it holds {', '.join(run_files)}): its "
                         f"eval.json is training's; pass another --output_dir, or leave it out for eval_{stem}/ "
                         'beside the checkpoint')
    return output_dir


# What the numbers depend on besides the weights and the data: the images' size (the val transform's) and padding.
SCORED_SIZE_FLAGS = (*SIZE_FLAGS, 'size_divisibility')


def scored_data(args, dataset):
    """What eval.json records it was scored on: the val annotation file and image folder (absolute), or the
    synthetic set's parameters, and SCORED_SIZE_FLAGS."""
    if args.dataset_file == 'synthetic':  # its val images come from these alone (not the train split's size or folder)
        data = {flag: value for flag, value in sorted(vars(args).items())
                if flag.startswith('synthetic_') and flag not in ('synthetic_dir', 'synthetic_train')}
    else:
        base = datasets.unwrap(dataset)
        data = {'val_json': os.path.abspath(base.ann_file), 'val_images': os.path.abspath(base.root)}
    return {'dataset_file': args.dataset_file, **data, **{flag: getattr(args, flag) for flag in SCORED_SIZE_FLAGS}}


def check_same_data(path, data):
    """A UsageError when the eval.json at `path` records an evaluation on other data (or at another size): it is
    replaced only by one of the same data."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    recorded = recorded.get('data') if isinstance(recorded, dict) else None  # None: written before it was recorded
    if recorded is not None and recorded != data:
        differ = '; '.join(f'{k}: {recorded.get(k)!r} there, {data.get(k)!r} here'
                           for k in sorted(recorded.keys() | data.keys()) if recorded.get(k) != data.get(k))
        raise UsageError(f'{path} records an evaluation on other data ({differ}); this one would replace it: pass '
                         'another --output_dir (e.g. eval_<data name>/) to keep both.')


def main(argv=None):
    run_tool(run, argv)
