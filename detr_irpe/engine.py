"""DETR's training recipe: optimizer, schedule, a resumable sampler, one epoch of training, evaluation."""
import math
import re
import time
import zlib

import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from detr_irpe import UsageError, distributed
from detr_irpe.detr import batch_images
from detr_irpe.irpe import rpe_parameters
from detr_irpe.matcher import NonFiniteCostError
from detr_irpe.preemption import iterate_loader


class NonFiniteLossError(UsageError):
    """Training diverged: the message names the epoch and step, and the flags to change."""


def build_optimizer(model, args):
    """AdamW with the published main.py's two groups: the backbone (--lr_backbone) and everything else,
    iRPE tables included, all with --weight_decay. --rpe_weight_decay different from --weight_decay (0: the
    paper's appendix) puts the tables in a third group of their own."""
    table_ids = {id(p) for p in rpe_parameters(model)}
    rpe_decay = args.weight_decay if getattr(args, 'rpe_weight_decay', None) is None else args.rpe_weight_decay
    own_group = rpe_decay != args.weight_decay
    backbone, tables, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if own_group and id(p) in table_ids:
            tables.append(p)
        elif name.startswith('backbone.') or '.backbone.' in name:
            backbone.append(p)
        else:
            rest.append(p)
    groups = [{'params': rest}, {'params': backbone, 'lr': args.lr_backbone},
              {'params': tables, 'weight_decay': rpe_decay}]
    return torch.optim.AdamW([g for g in groups if g['params']], lr=args.lr, weight_decay=args.weight_decay)


def build_lr_scheduler(optimizer, args):
    """The learning rate drops 10x at epoch --lr_drop (stepped once per epoch, as DETR)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def take_recipe_flags(optimizer, lr_scheduler, recipe, lr_drop):
    """After a run's optimizer and schedule states are loaded to resume it: where they hold other learning rates,
    weight decays or another --lr_drop than this command's (`recipe`: each group's (lr, weight_decay) as
    build_optimizer gave them), set this command's, as if the run had started with them (the states would keep the
    run's, whatever the flags say). Returns whether any differed; otherwise nothing is touched, so that the resumed
    run stays the one never stopped, to the bit."""
    if [(g['initial_lr'], g['weight_decay']) for g in optimizer.param_groups] == recipe and \
            lr_scheduler.step_size == lr_drop:
        return False
    lr_scheduler.step_size, lr_scheduler.base_lrs = lr_drop, [lr for lr, _ in recipe]
    for g, (lr, decay) in zip(optimizer.param_groups, recipe):
        g.update(initial_lr=lr, lr=lr * lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_drop), weight_decay=decay)
    lr_scheduler._last_lr = [g['lr'] for g in optimizer.param_groups]  # what get_last_lr() gives the next epoch
    return True


def warmup_factor(global_step, warmup_steps):
    return 1.0 if warmup_steps <= 0 else min(1.0, (global_step + 1) / warmup_steps)


class SeededDataset(Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index), so a sample looks
    the same whichever worker loads it and whether or not the run was interrupted and resumed."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would reseed the GPUs' too, which fork_rng does not restore
            torch.default_generator.manual_seed(zlib.crc32(f'{self.seed}/{self.epoch}/{index}'.encode()))
            return self.dataset[index]


def step_after_resize(step, before, after):
    """The step of a mid-epoch checkpoint's epoch at which a run of another (--batch_size, process count) goes on:
    the run had taken the first step x batch x processes indices of the epoch's order (its processes take them in
    turns); this one starts after the whole batches of its own that those fill, so fewer than one of its global
    batches is seen twice, and nothing is skipped."""
    return step * before[0] * before[1] // (after[0] * after[1])


class ResumableSampler(Sampler):
    """Shuffled (or ordered) indices for one process, a new order each epoch from (seed, epoch), that can
    start at any batch of the epoch. Splits the data between processes as DistributedSampler does."""

    def __init__(self, size, shuffle, seed=0, num_replicas=1, rank=0):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0
        self.per_replica = math.ceil(size / num_replicas)

    def set_epoch(self, epoch, start=0):
        """start: how many of this process's indices of the epoch were already consumed."""
        self.epoch, self.start = epoch, start

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_replica * self.num_replicas
        order += order[:total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self):
        return self.per_replica - self.start


def train_one_epoch(model, criterion, data_loader, optimizer, lr_scheduler, device, epoch, args, precision,
                    start_step=0, on_step=None, scaler=None, stats=None):
    """One epoch from batch `start_step`. on_step(step) is called after each optimizer step (for periodic
    checkpoints). stats: this process's running sums of the epoch ({'sums', 'count', 'skipped'}, new_epoch_stats()),
    updated in place at each step, so a checkpoint can keep them and a resumed epoch logs the averages of all its
    steps. Returns averaged losses. Raises NonFiniteLossError naming epoch and step.

    precision: the run's detr_irpe.precision.Precision (choose_precision); scaler: its grad_scaler(), kept by the
    caller across epochs and in checkpoints (default: a fresh one). A step the scaler skips for inf/nan gradients
    is not an error: the scale halves and training goes on. With args.backbone_in_workers the loader gives the
    backbone's features (detr_irpe_datasets' FrozenBackboneCollate) instead of images."""
    if scaler is None:
        scaler = precision.grad_scaler()
    model.train()
    criterion.train()
    stats = new_epoch_stats() if stats is None else stats
    sums = stats['sums']
    steps = start_step + len(data_loader)
    bar = tqdm(iterate_loader(data_loader), total=len(data_loader), initial=0, desc=f'epoch {epoch}',
               dynamic_ncols=True, disable=not distributed.is_main_process(), mininterval=2.0)
    t0, images_seen = time.time(), 0
    base_lrs = lr_scheduler.get_last_lr()  # the groups' own lr may hold a warm-up factor of a resumed step
    for i, (images, targets) in enumerate(bar):
        step = start_step + i
        global_step = epoch * steps + step
        factor = warmup_factor(global_step, getattr(args, 'lr_warmup', 0))
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g['lr'] = lr * factor
        if getattr(args, 'backbone_in_workers', False):
            inputs = {'features': images.to(device, non_blocking=True)}
        else:  # padded out here: a compiled model sees one tensor per batch shape, not one per image's shape
            batch, mask = batch_images([img.to(device, non_blocking=True) for img in images],
                                       getattr(args, 'size_divisibility', 1))
            inputs = {'samples': batch, 'mask': mask}
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        try:
            logged, skipped = train_step(model, criterion, optimizer, scaler, precision, inputs, targets,
                                         args.clip_max_norm)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f'{e} at epoch {epoch}, step {step}: training stopped; the last good checkpoint '
                                     'was kept. Lower --lr or check the data of this step.') from None
        stats['skipped'] += skipped
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        stats['count'] += 1
        images_seen += len(images)
        # shown at the bar's next refresh (every 2 s): a refresh here wrote a line a step with a stale count
        bar.set_postfix(loss=f'{logged["loss"]:.3f}', img_s=f'{images_seen / (time.time() - t0):.1f}', refresh=False)
        if on_step is not None:
            on_step(step + 1)
    for g, lr in zip(optimizer.param_groups, base_lrs):
        g['lr'] = lr
    averages = {k: v / max(stats['count'], 1) for k, v in sums.items()}
    averages['lr'] = base_lrs[0]  # the transformer's, as DETR's log.txt has it
    if scaler.is_enabled():
        averages['skipped_steps'] = stats['skipped']  # the same on every process: the scaler sees the reduced gradients
    return distributed.all_reduce_mean(averages)


def train_step(model, criterion, optimizer, scaler, precision, inputs, targets, clip_max_norm=0.0):
    """One optimizer step on a batch on the device: model(**inputs) (samples and mask, or features) under
    precision's autocast, the loss against targets, backward, gradient clipping to clip_max_norm (0: none), the
    scaler's step. Returns the logged losses as floats (the weighted total 'loss', the final decoder layer's terms,
    class_error) and whether the scaler skipped the step (float16 with inf/nan gradients). Raises
    NonFiniteLossError before the backward pass when the predictions or the loss are not finite.

    The host waits for the GPU twice: for the matching costs, and for the logged losses, read before the backward
    pass so that nothing waits after it (the next batch is launched while the GPU runs this one's backward)."""
    with precision.autocast():
        outputs = model(**inputs)
    outputs = {k: _float(v) for k, v in outputs.items()}
    try:
        losses = criterion(outputs, targets)
    except NonFiniteCostError:
        raise NonFiniteLossError("loss is not finite (the model's predictions hold nan or inf)") from None
    weights = criterion.weight_dict
    loss = sum(losses[k] * weights[k] for k in losses if k in weights)
    # The last decoder layer's terms under DETR's log keys: weighted as in the loss (loss_bbox is 5x the L1 distance)
    # and as computed (`_unscaled`); class_error. The auxiliary layers' (suffix _0, _1, ...) are not logged.
    logged = {'loss': loss}
    for k, v in losses.items():
        if not re.search(r'_\d+$', k):
            if k in weights:
                logged[k] = v * weights[k]
            logged[k if k == 'class_error' else f'{k}_unscaled'] = v
    logged = dict(zip(logged, torch.stack([v.detach().float() for v in logged.values()]).tolist()))  # one read
    if not math.isfinite(logged['loss']):
        raise NonFiniteLossError(f"loss is {logged['loss']}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # skipped when a gradient is inf/nan (float16 only)
    scaler.update()
    return logged, scale is not None and scaler.get_scale() < scale  # the scale drops exactly when it skipped


def pins_memory(device):
    """Whether data loaders pin their batches: on a GPU, so that the loops' copies to it are asynchronous (a copy
    from pageable memory waits for the GPU's queue)."""
    return str(device).startswith('cuda')


def cudagraph_skips():
    """How many graphs torch.compile (--compile reduce-overhead) compiled for CUDA graphs and ran without them (a CPU
    op, a mutated input, ...): inductor only logs why (TORCH_LOGS=cudagraphs), so the run is quietly slower."""
    from torch._dynamo.utils import counters
    return counters['inductor']['cudagraph_skips']


def new_epoch_stats():
    """Running sums of an epoch's logged losses: train_one_epoch's `stats`, kept in checkpoints."""
    return {'sums': {}, 'count': 0, 'skipped': 0}


def _float(v):
    if isinstance(v, list):
        return [{k: x.float() for k, x in d.items()} for d in v]
    return v.float()


@torch.no_grad()
def evaluate(model, postprocessors, data_loader, evaluator, device, on_batch=None, size_divisibility=1):
    """Run the model over data_loader and feed the post-processed detections (original-image pixels)
    to evaluator (datasets.CocoEvaluator). Returns evaluator.summarize()'s result on the main process, None on the
    others. on_batch() is called before each batch (to stop at a SIGTERM without waiting for the whole pass).
    Batches are padded to multiples of size_divisibility (--size_divisibility)."""
    model.eval()
    for images, targets in tqdm(iterate_loader(data_loader), total=len(data_loader), desc='eval', dynamic_ncols=True,
                                mininterval=2.0, disable=not distributed.is_main_process()):
        if on_batch is not None:
            on_batch()
        outputs = model(*batch_images([img.to(device, non_blocking=True) for img in images], size_divisibility))
        sizes = torch.stack([t['orig_size'] for t in targets]).to(device)
        results = postprocessors['bbox'](outputs, sizes)
        evaluator.update({int(t['image_id']): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)},
                         {int(t['image_id']): t['orig_size'].tolist() for t in targets})
    evaluator.synchronize_between_processes()
    return evaluator.summarize() if distributed.is_main_process() else None
