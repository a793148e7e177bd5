"""Train DETR with iRPE, evaluating with pycocotools.

    python tools/train.py --config configs/smoke.yaml
    python tools/train.py --coco_path /data/coco --enc_rpe2d rpe-2.0-product-ctx-1-k --output_dir runs/irpe
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc_per_node 8 tools/train.py \\
        --config configs/detr_r50_irpe_150ep.yaml --coco_path /data/coco
    python tools/train.py --config configs/smoke.yaml --resume outputs/smoke/checkpoint.pth   # continue
    python tools/train.py --train_json train.json --train_images images --val_json val.json --val_images images \\
        --finetune outputs/smoke/checkpoint.pth --output_dir runs/mine   # your own data, from trained weights

Writes output_dir/checkpoint.pth (every epoch, and every --checkpoint_every steps; the one before it is kept as
checkpoint.prev.pth), log.txt (JSON lines), eval.json (the 12 COCO bbox stats of the latest evaluation) and
checkpoint_best.pth (the weights of the evaluation with the highest AP so far, for eval, predict, export). One
run at a time owns output_dir (detr_irpe.run_lock); a resumed run, wherever it stopped, ends at the weights and log
of an uninterrupted one.
"""
import argparse
import contextlib
import datetime
import json
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError, distributed, engine
from detr_irpe.checkpoint import (BEST_CHECKPOINT, CHECKPOINT, PREVIOUS_CHECKPOINT, check_same_model_flags,
                                  load_model_state, load_optimizer_state, load_resume_checkpoint, logged,
                                  remove_stale_temporaries, resume_point, save_checkpoint, save_json,
                                  stopped_before_its_log_line)
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import explicit_flags, parse_args_with_config, use_threads
from detr_irpe.cli.runner import loader_worker_init, run_tool
from detr_irpe.convert import read_source
from detr_irpe.detr import build_model
from detr_irpe.from_checkpoint import adopt_flags, load_for_finetuning, note_unstated_flags
from detr_irpe.precision import choose_precision
from detr_irpe.preemption import Preemption, process_entry, process_rng_state, rng_state, set_rng_state
from detr_irpe.run_lock import RunLock
from detr_irpe_datasets.coco_eval import resolve_backend
from rpe_ops import block_cache


def get_parser():
    return get_args_parser()


def make_loaders(args, dataset_train, dataset_val, backbone=None, precision=None):
    """backbone, precision: with --backbone_in_workers, the model's frozen backbone and the run's precision,
    which the training loader's workers then run on each batch (datasets.FrozenBackboneCollate)."""
    train_set = engine.SeededDataset(dataset_train, args.seed)
    pin = engine.pins_memory(args.device)
    collate = datasets.collate_fn
    if args.backbone_in_workers:
        collate = datasets.FrozenBackboneCollate(datasets.collate_fn, backbone, precision, args.size_divisibility)
    sampler = engine.ResumableSampler(len(train_set), shuffle=True, seed=args.seed,
                                      num_replicas=args.world_size, rank=args.rank)
    # A loader generator of its own: creating an iterator must not draw from the global torch RNG, so a
    # resumed run's dropout sees the same random numbers as an uninterrupted one.
    train_loader = DataLoader(train_set, batch_sampler=BatchSampler(sampler, args.batch_size, drop_last=True),
                              collate_fn=collate, num_workers=args.num_workers, pin_memory=pin,
                              generator=torch.Generator().manual_seed(args.seed),
                              worker_init_fn=loader_worker_init)
    val_sampler = engine.ResumableSampler(len(dataset_val), shuffle=False, num_replicas=args.world_size, rank=args.rank)
    val_loader = DataLoader(dataset_val, batch_size=args.batch_size, sampler=val_sampler, collate_fn=datasets.collate_fn,
                            num_workers=args.num_workers, pin_memory=pin, generator=torch.Generator(),
                            worker_init_fn=loader_worker_init)
    return train_set, sampler, train_loader, val_loader


def run_eval(model, postprocessors, val_loader, dataset_val, device, epoch, args, on_batch=None):
    evaluator = datasets.CocoEvaluator(datasets.get_coco_api_from_dataset(dataset_val), backend=args.eval_backend)
    summary = engine.evaluate(model, postprocessors, val_loader, evaluator, device, on_batch, args.size_divisibility)
    if summary is not None and args.output_dir:
        save_json({**summary, 'epoch': epoch}, os.path.join(args.output_dir, 'eval.json'))
    return summary


def finetune_source(args, explicit):
    """The source of --finetune, its model flags adopted except those given (the classes are the data's); the
    backbone's weights come from it, so no ImageNet weights are fetched unless --backbone_weights is given."""
    try:
        source = read_source(args.finetune)
    except UsageError as e:
        raise UsageError(f'--finetune {args.finetune}: {e}') from None
    adopt_flags(args, source.flags, set(explicit) | {'num_classes'})
    note_unstated_flags(args, source, args.finetune, explicit, f'--finetune {args.finetune}')
    if 'backbone_weights' not in explicit:
        args.backbone_weights = 'none'
    return source


def run(args, explicit=()):
    """explicit: the flags given on the command line or in the preset, which --finetune's source does not
    override."""
    use_threads(args)
    args.eval_backend = resolve_backend(args.eval_backend)
    if args.attention_impl == 'flex' and not args.eval and torch.device(args.device).type != 'cuda':
        raise UsageError(f"--attention_impl flex trains on a GPU only: torch's flex_attention on CPU has no backward; "
                         f'on --device {args.device} train with --attention_impl auto (or sdpa), and evaluate with '
                         'flex if you like')
    if not args.output_dir and not args.eval and args.epochs > args.start_epoch:
        raise UsageError('no --output_dir: this training run would keep no checkpoint, log or '
                         'evaluation; pass --output_dir DIR (--epochs 0 checks data and model without one)')
    distributed.init_distributed(args)
    if not distributed.is_main_process():  # under torchrun the first process speaks; the others would repeat it
        sys.stdout = open(os.devnull, 'w')
        warnings.filterwarnings('ignore', module=r'detr_irpe_datasets\.(build|validate)$')  # the data's, at start
    # The folder's lock is taken before anything is built, so a second run on it stops at once. What the run holds
    # (the lock, the SIGTERM handler) is given back when it returns or raises: a caller in Python goes on as before.
    with contextlib.ExitStack() as resources:
        if args.output_dir:
            resources.enter_context(RunLock(args.output_dir))
        train(args, explicit, resources)


def train(args, explicit, resources):
    """The rest of `run`, holding the output folder; `resources` gives back what the run takes when it ends."""
    if args.output_dir and distributed.is_main_process():
        for path in remove_stale_temporaries(args.output_dir):
            print(f'removed {path}, left by a write that was killed')
    torch.manual_seed(args.seed + args.rank)
    np.random.seed(args.seed + args.rank)
    random.seed(args.seed + args.rank)
    device = torch.device(args.device)
    # --resume auto: output_dir's checkpoint, or the one before it when that is damaged; none: a fresh start.
    # Read before data and model are built, so that resuming a finished run stops at once.
    resume, checkpoint = load_resume_checkpoint(args.resume, args.output_dir)
    # --finetune's model flags first: a fine-tuning run resumes with the command line that started it
    source = finetune_source(args, explicit) if args.finetune else None
    if resume:
        check_same_model_flags(checkpoint, args, f'--resume {resume}')
    elif args.output_dir and not args.eval:
        held = [f for f in (CHECKPOINT, PREVIOUS_CHECKPOINT, BEST_CHECKPOINT, 'log.txt')
                if os.path.isfile(os.path.join(args.output_dir, f))]
        # a new run there would replace the checkpoints and append a second epoch 0 to log.txt
        if held and args.resume == 'auto':  # no checkpoint.pth to continue from: deleted since
            raise UsageError(f'--output_dir {args.output_dir} holds a run ({", ".join(held)}) without the checkpoint '
                             f'that --resume auto continues ({CHECKPOINT}): pass another --output_dir to start a new '
                             'run (with --finetune and a checkpoint of this one to start from its weights), or move '
                             'those files away')
        if held:
            raise UsageError(f'--output_dir {args.output_dir} holds a run ({", ".join(held)}): pass --resume auto to '
                             'continue it, or another --output_dir to start a new one')
    resumes_training = resume and not args.eval and 'optimizer' in checkpoint and 'lr_scheduler' in checkpoint
    if resume and not args.eval and not resumes_training:  # else epoch 0 again, over the folder's checkpoint and log
        raise UsageError(f'--resume {resume} holds weights without the optimizer and schedule that continue a run; '
                         f'pass --finetune {resume} to start a new run from its weights, or --eval to evaluate it')
    run_args = checkpoint_args(checkpoint) if resumes_training else {}
    if resumes_training:
        keep_run_seed(args, run_args.get('seed'), explicit, resume)
    trained = resume_point(checkpoint)[0] if resumes_training else None
    if trained is not None and args.start_epoch:  # the checkpoint's position wins: the flag went unread
        raise UsageError(f'--start_epoch {args.start_epoch} with --resume {resume}: a resumed run goes on where its '
                         f'checkpoint stopped (epoch {trained}); leave --start_epoch out')
    # stopped after its last epoch's checkpoint, before that epoch's log line (in its evaluation): resume finishes it.
    # The run's own log decides (the checkpoint's folder), not the log of an --output_dir it is resumed into.
    finishes_last = trained == args.epochs and distributed.any_process(distributed.is_main_process() and (
        stopped_before_its_log_line(checkpoint, os.path.dirname(os.path.abspath(resume)))))
    if trained is not None and trained >= args.epochs and not finishes_last:
        raise UsageError(f'--resume {resume}: that run has trained {trained} epochs and --epochs {args.epochs} asks for '
                         f'no more; pass --epochs above {trained} to train on, --eval to evaluate it, or --finetune to '
                         'start a new run from its weights')
    if args.eval and not resume:
        raise UsageError('--eval evaluates a checkpoint: pass --resume FILE, or --resume auto with the run\'s '
                         "--output_dir (without one it would score untrained weights and replace the run's eval.json)")

    dataset_train, dataset_val = datasets.build_dataset('train', args), datasets.build_dataset('val', args)
    datasets.check_against_training_set(dataset_train, args)
    if args.num_classes is None:
        args.num_classes = datasets.num_classes_for(dataset_train)
    category_names = datasets.category_names(dataset_train)
    if resume:  # categories renumbered since would train or score the run's class rows as other classes
        datasets.check_categories(dataset_train, checkpoint.get('category_names'), args.num_classes,
                                  f'--resume {resume}')
    datasets.check_annotated(dataset_val, args, 'val')
    datasets.check_categories(dataset_val, category_names, args.num_classes, 'the training set')
    print(datasets.describe(args, {'train': dataset_train, 'val': dataset_val}, args.num_classes))
    datasets.warn_objects_beyond_queries({'training': dataset_train, 'val': dataset_val}, args.num_queries)
    datasets.warn_val_classes_never_trained(dataset_train, dataset_val)
    datasets.warn_val_images_in_training(dataset_train, dataset_val)
    datasets.warn_val_size_outside_training_scales(args)
    model, criterion, postprocessors = build_model(args)
    if source is not None and not resume:  # resuming: the run's checkpoint replaces these weights below
        print(load_for_finetuning(model, source, category_names, args.finetune))
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model, mode=args.compile)  # checkpoints keep model_without_ddp's keys, no _orig_mod.
    note = None if resume else lr_never_drops(args)
    if note:
        print(note)
    if args.compile == 'reduce-overhead' and args.size_divisibility < 32:
        print(f'note: --compile reduce-overhead records CUDA graphs for every batch shape, and --size_divisibility '
              f'{args.size_divisibility} leaves DETR\'s resized batches in many shapes; --size_divisibility 128 '
              'bounds them')
    precision = choose_precision(device, args.amp)
    if args.amp:
        print(precision.describe())
    scaler = precision.grad_scaler()
    print(f'parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable')
    print(f'CPU memory: {block_cache.describe()}')  # run_tool installed it
    optimizer = engine.build_optimizer(model_without_ddp, args)
    lr_scheduler = engine.build_lr_scheduler(optimizer, args)
    recipe = [(g['lr'], g['weight_decay']) for g in optimizer.param_groups]
    train_set, sampler, train_loader, val_loader = make_loaders(args, dataset_train, dataset_val,
                                                                model_without_ddp.backbone[0], precision)

    start_epoch, start_step, start_stats = args.start_epoch, 0, None
    if resume:
        load_model_state(model_without_ddp, checkpoint['model'], f'--resume {resume}', checkpoint.get('args'), args)
        if resumes_training:
            load_optimizer_state(optimizer, checkpoint['optimizer'], f'--resume {resume}')
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
            start_epoch, start_step = resume_point(checkpoint)
            start_step = step_in_this_run(start_step, start_epoch, run_args, args, resume)
            if engine.take_recipe_flags(optimizer, lr_scheduler, recipe, args.lr_drop) or \
                    run_args.get('epochs', args.epochs) != args.epochs:  # or a schedule extended or cut
                print(describe_recipe_change(run_args, args, resume, start_epoch, optimizer))
            if checkpoint.get('step') is not None:
                start_stats = process_entry(checkpoint, 'epoch_stats')
            if 'rng' in checkpoint and (state := process_rng_state(checkpoint)) is not None:
                set_rng_state(state)
            if checkpoint.get('scaler') and scaler.is_enabled():  # float16: the loss scale and its growth count
                scaler.load_state_dict(checkpoint['scaler'])
        elif args.eval and isinstance(checkpoint.get('epoch'), int):
            start_epoch = resume_point(checkpoint)[0]  # eval.json names the epoch whose weights it scored
        print(f'evaluating {resume} of epoch {start_epoch - 1}' if args.eval else
              f'resumed from {resume}: epoch {start_epoch}, step {start_step}')

    if args.eval:
        run_eval(model, postprocessors, val_loader, dataset_val, device, start_epoch - 1, args)
        return

    writer = None  # made with the first log line: its folder must not outlive a run that fails before that
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT) if args.output_dir else None

    preemption = resources.enter_context(Preemption())

    def save(epoch, step, stats, epoch_log=None):
        """The checkpoint with the generator states the next step draws from, and the epoch's running loss sums
        (mid-epoch) or its log line before evaluation (at its end: finished on resume if the run stops first)."""
        if not checkpoint_path:
            return
        # every process's, so dropout and the epoch's averages resume exactly
        per_process = distributed.gather_to_main({'rng': rng_state(), 'epoch_stats': stats})
        if distributed.is_main_process():
            states = [p['rng'] for p in per_process]
            save_checkpoint({'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                             'lr_scheduler': lr_scheduler.state_dict(), 'epoch': epoch, 'step': step,
                             'args': recorded_args(args), 'category_names': category_names, 'rng': states[0],
                             'rng_per_process': states,
                             'epoch_stats_per_process': [p['epoch_stats'] for p in per_process],
                             'epoch_log': epoch_log, 'scaler': scaler.state_dict()},
                            checkpoint_path, previous=os.path.join(args.output_dir, PREVIOUS_CHECKPOINT))

    def save_if_best(epoch, summary):
        """checkpoint_best.pth when this evaluation's AP beats every one in log.txt (which outlives a resume)."""
        if not args.output_dir:
            return
        ap, best = summary['bbox'][0], best_logged_ap(args.output_dir)
        if best is not None and ap <= best:
            return
        path = os.path.join(args.output_dir, BEST_CHECKPOINT)
        save_checkpoint({'model': model_without_ddp.state_dict(), 'epoch': epoch, 'step': None,
                         'args': recorded_args(args), 'category_names': category_names, 'eval': summary}, path)
        print(f'AP {ap:.4f} at epoch {epoch}, the best so far: wrote {path}')

    def on_eval_batch(epoch):
        if preemption.requested():  # the checkpoint is written: stop now, evaluate again on resume
            preemption.exit(f'the end of epoch {epoch} (its evaluation runs again on resume)', checkpoint_path)

    def finish_epoch(log):
        """Evaluate when due and write the epoch's log line."""
        nonlocal writer
        epoch = log['epoch']
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            summary = run_eval(model, postprocessors, val_loader, dataset_val, device, epoch, args,
                               on_batch=lambda: on_eval_batch(epoch))
            if summary is not None:
                save_if_best(epoch, summary)
                log['test_coco_eval_bbox'] = summary['bbox']
        if distributed.is_main_process():
            writer = writer or make_writer(args)
            if args.output_dir:
                with open(os.path.join(args.output_dir, 'log.txt'), 'a') as f:
                    f.write(json.dumps(log) + '\n')
            if writer is not None:
                for k, v in log.items():
                    if isinstance(v, float):
                        writer.add_scalar(k, v, epoch)
                for name, v in zip(('AP', 'AP50', 'AP75'), log.get('test_coco_eval_bbox', [])):
                    writer.add_scalar(f'test_{name}', v, epoch)

    if resumes_training and distributed.any_process(
            distributed.is_main_process() and stopped_before_its_log_line(checkpoint, args.output_dir)):
        finish_epoch(dict(checkpoint['epoch_log']))  # stopped after the epoch's checkpoint, before its log line

    if args.epochs == 0:  # a check of the data and flags before a long run
        print('--epochs 0: data read and checked, model built; nothing trained (pass --epochs N to train)')
        return
    steps_per_epoch = len(sampler) // args.batch_size
    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, start=first * args.batch_size)
        train_set.set_epoch(epoch)
        stats = (start_stats if epoch == start_epoch and first else None) or engine.new_epoch_stats()

        def on_step(step, epoch=epoch, stats=stats):
            stop = preemption.requested()  # SIGTERM: a checkpoint at this step, then exit
            if step < steps_per_epoch and (stop or (args.checkpoint_every and step % args.checkpoint_every == 0)):
                save(epoch, step, stats)
                if stop:
                    preemption.exit(f'epoch {epoch}, step {step}', checkpoint_path)

        # A NonFiniteLossError ends the run here, before the save below: the last good checkpoint stays.
        train_stats = engine.train_one_epoch(model, criterion, train_loader, optimizer, lr_scheduler, device,
                                             epoch, args, start_step=first, on_step=on_step, precision=precision,
                                             scaler=scaler, stats=stats)
        if args.compile == 'reduce-overhead' and epoch == start_epoch and engine.cudagraph_skips():
            print(f'note: --compile reduce-overhead ran {engine.cudagraph_skips()} compiled graph(s) without CUDA '
                  'graphs; TORCH_LOGS=cudagraphs says why')
        lr_scheduler.step()
        log = {'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
               'time': round(time.time() - started, 1)}
        save(epoch, None, None, epoch_log=log)
        if preemption.requested():  # before the evaluation: a scheduler's grace period is short
            preemption.exit(f'the end of epoch {epoch} (its evaluation and log line follow on resume)', checkpoint_path)
        finish_epoch(log)
    print(f'training time {datetime.timedelta(seconds=int(time.time() - started))}')


RECIPE_FLAGS = ('epochs', 'lr', 'lr_backbone', 'weight_decay', 'rpe_weight_decay', 'lr_drop')


def recorded_args(args):
    """The flags a checkpoint keeps, the data's paths absolute: eval, predict and export read them from wherever they
    run (a relative --val_json was looked for below their own working folder)."""
    return {**vars(args), **{flag: os.path.abspath(path) for flag in datasets.DATA_LOCATION_FLAGS
                             if (path := vars(args).get(flag))}}


def checkpoint_args(checkpoint):
    """The flags of the run that wrote a checkpoint as a dict (the published code's keep a Namespace; none: empty)."""
    run_args = checkpoint.get('args')
    return vars(run_args) if isinstance(run_args, argparse.Namespace) else run_args or {}


def lr_never_drops(args):
    """The note for a run whose --lr_drop is not below --epochs (DETR's 200 under a shorter fine-tuning run), or None."""
    if 1 < args.epochs <= args.lr_drop:
        return (f'note: --lr_drop {args.lr_drop} is not below --epochs {args.epochs}: the learning rate stays '
                f'{args.lr:g} the whole run (DETR drops it 10x for its last third); pass --lr_drop N to drop it at '
                'epoch N')
    return None


def keep_run_seed(args, seed, explicit, resume):
    """A resumed run draws its data order and augmentation from its own --seed: taken when left out (a restart that
    forgot a sweep's seed mixed two orders within the epoch it resumed), refused when given otherwise."""
    if seed is None or seed == args.seed:
        return
    if 'seed' in explicit:
        raise UsageError(f'--resume {resume}: the run was seeded with --seed {seed}, this command gives --seed '
                         f'{args.seed}; a resumed run keeps its seed (its data order and augmentation come from it): '
                         f'pass --seed {seed} or leave it out, or start a new run with --finetune {resume}')
    args.seed = seed


def step_in_this_run(step, epoch, run_args, args, resume):
    """The step at which this run goes on in a checkpoint's epoch: the checkpoint's, in batches of the run's size; in
    this run's own where its --batch_size or process count differs (a preempted job back on fewer GPUs), said."""
    before, after = (run_args.get('batch_size', args.batch_size), run_args.get('world_size', 1)), \
        (args.batch_size, args.world_size)
    if not step or before == after:
        return step
    moved = engine.step_after_resize(step, before, after)
    print(f'--resume {resume}: the run stopped at step {step} of epoch {epoch} with --batch_size {before[0]} on '
          f'{before[1]} process(es); this run (--batch_size {after[0]} on {after[1]}) goes on at its step {moved}: '
          f'the same samples done, {step * before[0] * before[1] - moved * after[0] * after[1]} of them again')
    return moved


def describe_recipe_change(run_args, args, resume, epoch, optimizer):
    """The line saying which of the run's recipe flags this command changes, and the learning rates it goes on with."""
    changed = [f'--{k} {run_args[k]} -> {getattr(args, k)}' for k in RECIPE_FLAGS
               if k in run_args and run_args[k] != getattr(args, k)]
    rates = ', '.join(f'{group["lr"]:g}' for group in optimizer.param_groups)
    return (f'--resume {resume}: changed from the run\'s: {", ".join(changed) or "learning rates or weight decays"}; '
            f'it goes on as if it had started so (learning rates from epoch {epoch}: {rates})')


def best_logged_ap(output_dir):
    """The highest AP of the evaluations in log.txt, None before the first."""
    return max((line['test_coco_eval_bbox'][0] for line in logged(output_dir) if 'test_coco_eval_bbox' in line),
               default=None)


def make_writer(args):
    """TensorBoard scalars in output_dir/tensorboard when tensorboard is installed."""
    if not (args.output_dir and distributed.is_main_process()):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(args.output_dir, 'tensorboard'))


def main(argv=None):
    run_tool(lambda: run(parse_args_with_config(get_parser(), argv), explicit_flags(get_parser(), argv)))


if __name__ == '__main__':  # `python -m detr_irpe.cli.train`: what tools/sweep.py launches
    main()
