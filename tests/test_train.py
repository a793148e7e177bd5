"""Training and evaluation: checkpoints survive faults, resume is exact, DDP equals one process."""
import argparse
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError, build_model, engine
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.backbone import FrozenFeatures
from detr_irpe.detr import batch_images
from detr_irpe.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from detr_irpe.preemption import rng_state, set_rng_state
from detr_irpe.precision import choose_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# the checkout first; an existing PYTHONPATH (where detr_irpe_datasets is found without an install) kept
PYTHONPATH = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
SMOKE = os.environ.get('SMOKE_CONFIG', os.path.join(ROOT, 'configs', 'smoke.yaml'))


def tool(name, *argv, **kwargs):
    env = {**os.environ, 'PYTHONPATH': PYTHONPATH, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([PY, os.path.join(ROOT, 'tools', name), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kwargs)


def smoke_args(tmp_path, *extra):
    return ['--config', SMOKE, '--output_dir', str(tmp_path / 'out'),
            '--synthetic_dir', str(tmp_path / 'synthetic'), '--num_workers', '0', *extra]


# --- checkpoints -------------------------------------------------------------------------------

def test_checkpoint_is_replaced_atomically_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint({'epoch': 1, 'w': torch.ones(3)}, path)

    def dies_midway(obj, f, *a, **k):
        f.write(b'partial bytes of a checkpoint')
        raise KeyboardInterrupt('killed while writing')

    monkeypatch.setattr(torch, 'save', dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'epoch': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # no temporary file left behind


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(code_running_checkpoint):
    path, marker = code_running_checkpoint
    with pytest.raises(UsageError, match='refusing to load'):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_published_model_zoo_layout_with_namespace_args_loads(tmp_path):
    args = argparse.Namespace(backbone='resnet50', enc_rpe2d='rpe-2.0-product-ctx-1-k', lr=1e-4, epochs=150)
    path = str(tmp_path / 'zoo.pth')
    torch.save({'model': {'w': torch.ones(2)}, 'optimizer': {'state': {}, 'param_groups': []},
                'lr_scheduler': {'step_size': 100}, 'epoch': 149, 'args': args}, path)
    loaded = load_checkpoint(path)
    assert loaded['args'] == args and loaded['epoch'] == 149


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = str(tmp_path / 'cut.pth')
    save_checkpoint({'model': {'w': torch.ones(1000)}}, path)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UsageError, match='cannot be read'):
        load_checkpoint(path)


TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu']


def test_mismatching_checkpoint_names_keys_and_the_flag(tmp_path):
    with_rpe = build_model(get_args_parser().parse_args(TINY + ['--enc_rpe2d', 'rpe-2.0-product-ctx-1-k']))[0]
    plain = build_model(get_args_parser().parse_args(TINY))[0]
    with pytest.raises(ValueError) as e:
        load_model_state(plain, with_rpe.state_dict())
    assert 'transformer.encoder.layers.0.self_attn.rpe_k.lookup_table_weight' in str(e.value)
    assert '--enc_rpe2d' in str(e.value)
    more_queries = build_model(get_args_parser().parse_args(TINY + ['--num_queries', '7']))[0]
    with pytest.raises(ValueError, match='--num_queries'):
        load_model_state(plain, more_queries.state_dict())


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = str(tmp_path / 'rng.pth')
    save_checkpoint({'rng': rng_state()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(path)['rng'])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all() and expected[2] == got[2]


# --- recipe pieces -----------------------------------------------------------------------------

def test_sampler_splits_between_processes_and_resumes_mid_epoch():
    full = engine.ResumableSampler(10, shuffle=True, seed=5)
    full.set_epoch(3)
    order = list(full)
    assert sorted(order) == list(range(10))
    parts = []
    for rank in range(3):
        s = engine.ResumableSampler(10, shuffle=True, seed=5, num_replicas=3, rank=rank)
        s.set_epoch(3)
        parts.append(list(s))
    # As DistributedSampler: pad the order to a multiple of the process count, then deal it out.
    padded = order + order[:2]
    assert parts == [padded[0::3], padded[1::3], padded[2::3]]
    full.set_epoch(3, start=4)
    assert list(full) == order[4:] and len(full) == 6
    full.set_epoch(4)
    assert list(full) != order


@pytest.mark.parametrize('before, after', [((2, 1), (4, 1)), ((4, 1), (3, 1)), ((2, 4), (2, 2)), ((2, 3), (4, 2)),
                                           ((3, 2), (2, 5))])
def test_a_mid_epoch_resume_with_another_batch_size_or_process_count_skips_nothing(before, after):
    """The checkpoint's step counts batches of the run's size: taken as this run's own, a resume on fewer GPUs or
    with a larger --batch_size skipped the samples between (or repeated them with a smaller one)."""
    size, epoch = 61, 2

    def replicas(processes, start=0):
        samplers = [engine.ResumableSampler(size, shuffle=True, seed=7, num_replicas=processes, rank=r)
                    for r in range(processes)]
        for s in samplers:
            s.set_epoch(epoch, start=start)
        return samplers
    for step in range(size // (before[0] * before[1]) + 1):
        done = [i for s in replicas(before[1]) for i in list(s)[:step * before[0]]]
        moved = engine.step_after_resize(step, before, after)
        rest = [list(s) for s in replicas(after[1], start=moved * after[0])]
        assert len({len(r) // after[0] for r in rest}) == 1  # every process: the same number of steps
        seen = done + [i for r in rest for i in r[:len(r) // after[0] * after[0]]]
        dropped = set(range(size)) - set(seen)  # beyond the epoch's last whole global batch, as without a resume
        assert len(dropped) < after[0] * after[1], (step, sorted(dropped))
        assert len(done) - moved * after[0] * after[1] < after[0] * after[1]  # seen twice: under one global batch


def test_a_run_whose_lr_drop_is_past_its_epochs_is_told_its_learning_rate_never_drops():
    from detr_irpe.cli.train import lr_never_drops
    parse = get_args_parser().parse_args
    assert lr_never_drops(parse(['--epochs', '30'])).startswith(  # DETR's --lr_drop 200 under a fine-tuning run
        'note: --lr_drop 200 is not below --epochs 30: the learning rate stays 0.0001 the whole run')
    assert lr_never_drops(parse(['--epochs', '30', '--lr_drop', '30'])) is not None  # drops after the last epoch
    assert lr_never_drops(parse(['--epochs', '150', '--lr_drop', '100'])) is None
    assert lr_never_drops(parse(['--epochs', '1', '--lr_drop', '1'])) is None  # a one-epoch check: nothing to say


def test_seeded_dataset_gives_the_same_augmentation_for_the_same_epoch_and_index():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)

    ds = engine.SeededDataset(Noise(), seed=1)
    a, b = ds[2], ds[2]
    ds.set_epoch(1)
    assert torch.equal(a, b) and not torch.equal(a, ds[2])


def test_seeded_dataset_leaves_the_gpu_generators_alone(monkeypatch):
    # with --num_workers 0 the samples are drawn in the training process: torch.manual_seed reseeded every GPU's
    # generator per sample, so a step's dropout on the GPU followed the batch's last sample
    reseeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', reseeded.append)
    monkeypatch.setattr(torch.cuda, 'manual_seed', reseeded.append)
    before = torch.get_rng_state()
    engine.SeededDataset([torch.zeros(1)] * 3, seed=1)[2]
    assert reseeded == [] and torch.equal(torch.get_rng_state(), before)


def test_the_gpu_generator_state_is_this_processs_device_and_restores_where_fewer_gpus_are(monkeypatch):
    # get_rng_state_all() kept every visible GPU's; set_rng_state_all() of 8 states where a resume sees 1 GPU
    # raised IndexError (a torchrun run resumed under SLURM with one GPU per task)
    states = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    current, restored = [1], []
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: current[0])
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': states[current[0]])
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append((current[0], state)))
    state = rng_state()
    assert torch.equal(state['cuda_device'], states[1]) and 'cuda' not in state
    current[0] = 0  # resumed by a process on another GPU index
    set_rng_state(state)
    set_rng_state({**rng_state(), 'cuda': [states[0], states[1]] * 4})  # an older checkpoint: 8 GPUs' states
    del state['cuda_device']
    set_rng_state(state)  # an older checkpoint of a CPU run: no GPU state to restore
    assert restored == [(0, states[1]), (0, states[0])]


class _Images(torch.utils.data.Dataset):
    """Images of different sizes (so batches are padded) with the targets DETR's loss takes."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, 48 + 8 * (i % 3), 64 - 8 * (i % 2), generator=g)
        return image, {'labels': torch.tensor([i % 3]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.3]])}


def test_backbone_run_in_loader_workers_gives_the_models_own_outputs():
    """--backbone_in_workers: features made in two worker processes, the rest in this one, equal the model
    run on the images here (one thread, as the workers have)."""
    model, _, _ = build_model(get_args_parser().parse_args(TINY + ['--lr_backbone', '0']))
    model.eval()
    precision = choose_precision('cpu', amp=False)
    collate = datasets.FrozenBackboneCollate(datasets.collate_fn, model.backbone[0], precision)
    # where workers are spawned (macOS, Windows, Python 3.14's forkserver) the collate travels pickled
    collate = pickle.loads(pickle.dumps(collate))
    in_workers = torch.utils.data.DataLoader(_Images(), batch_size=3, num_workers=2, collate_fn=collate)
    here = torch.utils.data.DataLoader(_Images(), batch_size=3, num_workers=0, collate_fn=datasets.collate_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for (features, _), (images, _) in zip(in_workers, here, strict=True):
                assert isinstance(features, FrozenFeatures) and len(features) == 3
                a, b = model(features=features), model(images)
                for key in ('pred_logits', 'pred_boxes'):
                    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_backbone_in_workers_refuses_a_backbone_that_trains():
    model, _, _ = build_model(get_args_parser().parse_args(TINY + ['--lr_backbone', '1e-5']))
    with pytest.raises(UsageError, match='--backbone_in_workers needs a frozen backbone .*trainable parameters .*layer2'):
        datasets.FrozenBackboneCollate(datasets.collate_fn, model.backbone[0], choose_precision('cpu', amp=False))


def test_optimizer_groups_backbone_lr_and_no_decay_on_irpe_tables_with_rpe_weight_decay_0():
    args = get_args_parser().parse_args(TINY + ['--enc_rpe2d', 'rpe-2.0-product-ctx-1-qk', '--lr_backbone', '1e-5',
                                                '--rpe_weight_decay', '0'])
    model = build_model(args)[0]
    optimizer = engine.build_optimizer(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [(g['lr'], g['weight_decay'], [names[id(p)] for p in g['params']]) for g in optimizer.param_groups]
    rest, backbone, tables = by_group
    assert rest[:2] == (1e-4, 1e-4) and not any('backbone' in n or 'lookup_table' in n for n in rest[2])
    assert backbone[0] == 1e-5 and all(n.startswith('backbone.0.body.layer') for n in backbone[2])
    assert tables[1] == 0.0 and len(tables[2]) == 2 and all('lookup_table' in n for n in tables[2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(sum((g[2] for g in by_group), []))


def test_warmup_factor_is_linear_then_one():
    assert [engine.warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert engine.warmup_factor(0, 0) == 1.0


def test_non_finite_loss_names_epoch_and_step():
    args = get_args_parser().parse_args(TINY)
    model, criterion, _ = build_model(args)
    optimizer = engine.build_optimizer(model, args)
    scheduler = engine.build_lr_scheduler(optimizer, args)
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    corrupted = torch.rand(3, 64, 64)
    corrupted[0, 5, 5] = float('nan')
    loader = [([torch.rand(3, 64, 64)], targets), ([corrupted], targets)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(engine.NonFiniteLossError, match='epoch 7, step 1'):
        engine.train_one_epoch(model, criterion, loader, optimizer, scheduler, 'cpu', 7, args, choose_precision('cpu', amp=False))
    # The bad step did not touch the weights: only the first (finite) step moved them.
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_the_progress_bar_writes_the_step_count_with_each_loss(capsys):
    # set_postfix refreshed the bar at every step with the count of its last 2 s refresh: a log file got a line
    # per step, `0/6` beside the losses of steps 1 to 5
    args = get_args_parser().parse_args(TINY)
    model, criterion, _ = build_model(args)
    optimizer = engine.build_optimizer(model, args)
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    loader = [([torch.rand(3, 64, 64)], targets)] * 6
    engine.train_one_epoch(model, criterion, loader, optimizer, engine.build_lr_scheduler(optimizer, args), 'cpu', 0,
                           args, choose_precision('cpu', amp=False))
    states = [s for s in capsys.readouterr().err.replace('\n', '\r').split('\r') if 'loss=' in s]
    assert states and all(' 0/6 ' not in s for s in states), states
    assert ' 6/6 ' in states[-1]


def test_non_finite_predictions_stop_before_matching_and_name_epoch_and_step():
    args = get_args_parser().parse_args(TINY)
    model, criterion, _ = build_model(args)
    optimizer = engine.build_optimizer(model, args)
    model.class_embed.bias.data[0] = float('inf')  # logits inf: softmax nan, which the Hungarian algorithm refuses
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(engine.NonFiniteLossError, match=r"predictions hold nan or inf\) at epoch 3, step 0"):
        engine.train_one_epoch(model, criterion, [([torch.rand(3, 64, 64)], targets)], optimizer,
                               engine.build_lr_scheduler(optimizer, args), 'cpu', 3, args,
                               choose_precision('cpu', amp=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ScalarReads(TorchDispatchMode):
    """Counts item() / bool() / float() of tensors (aten._local_scalar_dense): on a GPU each waits for its queue."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default and not self.paused
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_no_scalar_of_a_device_tensor():
    # The host reads the device twice a step, as whole tensors: the matcher's cost matrix (.cpu(), then its own
    # work on that host copy) and the logged losses (.tolist()); a finiteness check by bool() would be a third wait.
    args = get_args_parser().parse_args(TINY)
    model, criterion, _ = build_model(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # no step counter read back, unlike Adam's on CPU
    precision = choose_precision('cpu', amp=False)
    reads, match_layers = ScalarReads(), criterion.matcher.match_layers

    def on_its_host_copy(*a, **kw):
        reads.paused = True
        try:
            return match_layers(*a, **kw)
        finally:
            reads.paused = False
    criterion.matcher.match_layers = on_its_host_copy
    targets = [{'labels': torch.tensor([1, 2]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.4]])}]
    inputs = dict(zip(('samples', 'mask'), batch_images([torch.rand(3, 64, 80)])))
    with reads:
        logged, skipped = engine.train_step(model, criterion, optimizer, precision.grad_scaler(), precision, inputs,
                                            targets, clip_max_norm=0.1)
    assert reads.count == 0
    assert math.isfinite(logged['loss']) and not skipped
    # DETR's log keys: the last layer's terms weighted as in the loss, and `_unscaled`
    assert set(logged) == {'loss', 'class_error', 'loss_ce', 'loss_bbox', 'loss_giou', 'loss_ce_unscaled',
                           'loss_bbox_unscaled', 'loss_giou_unscaled', 'cardinality_error_unscaled'}
    for k in ('loss_ce', 'loss_bbox', 'loss_giou'):
        assert logged[k] == pytest.approx(logged[f'{k}_unscaled'] * criterion.weight_dict[k], rel=1e-6)
    assert criterion.weight_dict['loss_bbox'] == 5 and criterion.weight_dict['loss_giou'] == 2


def test_training_and_evaluation_give_the_model_batches_padded_to_size_divisibility():
    args = get_args_parser().parse_args(TINY + ['--size_divisibility', '48'])
    model, criterion, postprocessors = build_model(args)
    seen, forward = [], model.forward

    def recording(samples=None, mask=None, features=None):
        seen.append((tuple(samples.shape), tuple(mask.shape)))
        return forward(samples, mask, features)
    model.forward = recording
    optimizer = engine.build_optimizer(model, args)
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                'orig_size': torch.tensor([64, 70]), 'image_id': torch.tensor(1)}]
    loader = [([torch.rand(3, 64, 70), torch.rand(3, 50, 40)], targets * 2)]
    engine.train_one_epoch(model, criterion, loader, optimizer, engine.build_lr_scheduler(optimizer, args), 'cpu', 0,
                           args, choose_precision('cpu', amp=False))

    class Evaluator:
        def update(self, results, pixel_sizes):
            pass

        def synchronize_between_processes(self):
            pass

        def summarize(self):
            return {}
    engine.evaluate(model, postprocessors, loader, Evaluator(), 'cpu', size_divisibility=args.size_divisibility)
    assert seen == [((2, 3, 96, 96), (2, 96, 96))] * 2  # 64x70 and 50x40 padded to 96x96, with their mask


def test_eval_pads_batches_as_the_training_run_did_unless_told(tmp_path):
    """--size_divisibility changes the padding and so, slightly, the numbers: tools/eval.py takes the training
    run's, as it takes its val size, so that it reproduces training's evaluation."""
    from detr_irpe.cli import eval as eval_tool
    from detr_irpe.convert import read_source
    from detr_irpe.from_checkpoint import adopt_source_flags
    args = get_args_parser().parse_args(TINY + ['--size_divisibility', '64'])
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint({'model': build_model(args)[0].state_dict(), 'args': vars(args)}, path)
    for argv, want in (([], 64), (['--size_divisibility', '8'], 8)):
        eval_args = eval_tool.get_parser().parse_args(['--resume', path, *argv])
        adopt_source_flags(eval_args, read_source(path), path, {'size_divisibility'} if argv else ())
        assert eval_args.size_divisibility == want


def test_loaders_pin_their_batches_for_a_gpu_only():
    """Pinned batches make the loops' copies to a GPU asynchronous; on a CPU pinning would only cost."""
    from detr_irpe.cli.train import make_loaders
    for device, pinned in (('cuda', True), ('cuda:1', True), ('cpu', False)):
        args = argparse.Namespace(seed=0, backbone_in_workers=False, world_size=1, rank=0, batch_size=2,
                                  num_workers=0, device=device)
        _, _, train_loader, val_loader = make_loaders(args, list(range(4)), list(range(4)))
        assert train_loader.pin_memory is pinned and val_loader.pin_memory is pinned


# --- end to end with configs/smoke.yaml ----------------------------------------------------------

def _weights(path):
    return load_checkpoint(path)['model']


@pytest.mark.slow
def test_train_checkpoint_eval_round_trip(tmp_path):
    run = tool('train.py', *smoke_args(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / 'out'
    checkpoint = load_checkpoint(str(out / 'checkpoint.pth'))
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'rng'} <= set(checkpoint)
    logs = [json.loads(line) for line in open(out / 'log.txt')]
    assert [entry['epoch'] for entry in logs] == list(range(checkpoint['epoch'] + 1))
    assert all(math.isfinite(entry['train_loss']) for entry in logs)
    evaluated = tool('eval.py', *smoke_args(tmp_path, '--resume', str(out / 'checkpoint.pth'),
                                            '--output_dir', str(tmp_path / 'eval'),
                                            '--results_json', str(tmp_path / 'eval' / 'detections.json')))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]' in evaluated.stdout
    stats = json.load(open(tmp_path / 'eval' / 'eval.json'))['bbox']
    assert len(stats) == 12 and all(isinstance(s, float) and math.isfinite(s) for s in stats)
    # Evaluating the same checkpoint gives the numbers training wrote.
    assert stats == json.load(open(out / 'eval.json'))['bbox']
    detections = json.load(open(tmp_path / 'eval' / 'detections.json'))
    assert detections and all(set(d) == {'image_id', 'category_id', 'bbox', 'score'} and len(d['bbox']) == 4
                              for d in detections)
    best = load_checkpoint(str(out / 'checkpoint_best.pth'))  # one evaluation: the best is the last epoch's
    assert best['epoch'] == checkpoint['epoch'] and best['eval']['bbox'] == stats
    for k, v in checkpoint['model'].items():
        assert torch.equal(best['model'][k], v), k


def test_a_resume_that_changes_the_learning_rates_or_lr_drop_goes_on_as_a_run_started_with_them(tmp_path, capsys):
    """The optimizer's and the schedule's states hold the run's learning rates, weight decay and --lr_drop: a resume
    giving others (a schedule extended) kept the run's without a word, as DETR's main.py does."""
    from detr_irpe.cli import train as train_tool
    argv = smoke_args(tmp_path, '--synthetic_train', '4', '--synthetic_val', '2', '--batch_size', '2', '--resume',
                      'auto', '--eval_every', '100')

    def run(*extra):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + list(extra)))
    run('--epochs', '2', '--lr', '1e-3', '--lr_backbone', '1e-4', '--lr_drop', '1')
    run('--epochs', '4', '--lr', '2e-3', '--lr_backbone', '1e-4', '--lr_drop', '2', '--weight_decay', '1e-2')
    out = capsys.readouterr().out
    assert "changed from the run's: --epochs 2 -> 4, --lr 0.001 -> 0.002, --weight_decay 0.0001 -> 0.01, --lr_drop " \
        '1 -> 2; it goes on as if it had started so (learning rates from epoch 2: 0.0002, 1e-05)' in out, out
    log = [json.loads(line) for line in (tmp_path / 'out' / 'log.txt').read_text().splitlines()]
    # epochs 0 and 1 as the first command gave them; 2 and 3 as a run started with 2e-3, dropping 10x every 2 epochs
    assert [e['train_lr'] for e in log] == pytest.approx([1e-3, 1e-4, 2e-3 * 0.1, 2e-3 * 0.1], rel=1e-12)
    groups = load_checkpoint(str(tmp_path / 'out' / 'checkpoint.pth'))['optimizer']['param_groups']
    assert [g['lr'] for g in groups] == pytest.approx([2e-3 * 0.1 ** 2, 1e-4 * 0.1 ** 2], rel=1e-12)
    assert [g['weight_decay'] for g in groups] == [1e-2, 1e-2]
    run('--epochs', '5', '--lr', '2e-3', '--lr_backbone', '1e-4', '--lr_drop', '2', '--weight_decay', '1e-2')
    out = capsys.readouterr().out  # the same recipe, a longer schedule: said; the states as they were
    assert "changed from the run's: --epochs 4 -> 5; it goes on" in out, out


def test_train_py_resumes_a_mid_epoch_checkpoint_with_another_batch_size_at_the_next_sample_of_its_order(
        tmp_path, monkeypatch, capsys):
    from detr_irpe.cli import train as train_tool
    argv = smoke_args(tmp_path, '--synthetic_train', '12', '--synthetic_val', '2', '--resume', 'auto', '--eval_every',
                      '100', '--checkpoint_every', '1', '--epochs', '1')
    real_step, steps = engine.train_step, []

    def stops_at_the_fourth(*a, **k):
        if len(steps) == 3:
            raise KeyboardInterrupt('stopped mid-epoch')
        steps.append(1)
        return real_step(*a, **k)
    monkeypatch.setattr(engine, 'train_step', stops_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--batch_size', '2', '--seed', '5']))
    assert load_checkpoint(str(tmp_path / 'out' / 'checkpoint.pth'))['step'] == 3  # 6 images of the epoch done
    monkeypatch.setattr(engine, 'train_step', real_step)
    taken, real_iter = [], engine.ResumableSampler.__iter__

    def recorded(sampler):
        if sampler.shuffle:  # the training set's
            taken.append((sampler._indices(), list(real_iter(sampler))))
        return real_iter(sampler)
    monkeypatch.setattr(engine.ResumableSampler, '__iter__', recorded)
    capsys.readouterr()
    train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--batch_size', '3']))
    assert 'the run stopped at step 3 of epoch 0 with --batch_size 2 on 1 process(es); this run (--batch_size 3 on ' \
        '1) goes on at its step 2: the same samples done, 0 of them again' in capsys.readouterr().out
    run_order = engine.ResumableSampler(12, shuffle=True, seed=5)._indices()  # epoch 0's under the run's --seed
    order, rest = taken[0]
    assert order == run_order  # --seed left out: the run's (under the default 42 the rest came from another order)
    assert rest == order[6:]  # read as 3 batches of 3, the resume skipped 3 images: rest began at order[9]
    with pytest.raises(UsageError, match='the run was seeded with --seed 5, this command gives --seed 7; a resumed run '
                                         'keeps its seed'):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--seed', '7']), {'seed'})
    with pytest.raises(UsageError, match=r'--start_epoch 3 with --resume .*: a resumed run goes on where its '
                                         r'checkpoint stopped \(epoch 1\); leave --start_epoch out'):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--start_epoch', '3', '--epochs', '5']))


def test_the_best_checkpoint_holds_the_weights_of_the_highest_ap_across_a_resume(tmp_path, monkeypatch, capsys):
    from detr_irpe.cli import train as train_tool
    aps, scored = {0: 0.2, 1: 0.5, 2: 0.3, 3: 0.4}, {}

    def evaluate(model, postprocessors, val_loader, dataset_val, device, epoch, args, on_batch=None):
        scored[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {'bbox': [aps[epoch]] + [0.0] * 11}
    monkeypatch.setattr(train_tool, 'run_eval', evaluate)
    argv = smoke_args(tmp_path, '--synthetic_train', '4', '--synthetic_val', '2', '--batch_size', '2',
                      '--eval_every', '1', '--resume', 'auto', '--lr', '1e-3')
    best = tmp_path / 'out' / 'checkpoint_best.pth'

    def run(epochs):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--epochs', str(epochs)]))
        return load_checkpoint(str(best))
    assert run(3)['epoch'] == 1
    assert run(4)['epoch'] == 1  # epoch 3's 0.4 beats epoch 2's 0.3, not epoch 1's 0.5 in the resumed run's log
    written = [line for line in capsys.readouterr().out.splitlines() if 'the best so far' in line]
    assert [line.split(' at epoch ')[1][0] for line in written] == ['0', '1']
    weights = load_checkpoint(str(best))['model']
    assert not torch.equal(scored[1]['class_embed.weight'], scored[2]['class_embed.weight'])
    for k, v in scored[1].items():
        assert torch.equal(weights[k], v), k
    # It holds no optimizer: training from it with --resume would start at epoch 0 over the run's files.
    log = (tmp_path / 'out' / 'log.txt').read_text()
    with pytest.raises(UsageError, match=f'--resume {best} holds weights without .* pass --finetune {best}'):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--epochs', '5', '--resume', str(best)]))
    assert (tmp_path / 'out' / 'log.txt').read_text() == log
    assert load_checkpoint(str(tmp_path / 'out' / 'checkpoint.pth'))['epoch'] == 3


@pytest.mark.slow
def test_training_killed_with_sigkill_and_resumed_ends_at_the_same_weights(tmp_path):
    common = ['--epochs', '2', '--checkpoint_every', '1', '--eval_every', '100', '--dropout', '0.1']
    full = tool('train.py', *smoke_args(tmp_path / 'full', *common))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / 'killed' / 'out'
    env = {**os.environ, 'PYTHONPATH': PYTHONPATH, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([PY, os.path.join(ROOT, 'tools', 'train.py'), *smoke_args(tmp_path / 'killed', *common)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / 'checkpoint.pth'
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            state = load_checkpoint(str(checkpoint))
            if state['step'] is not None and (state['epoch'], state['step']) >= (0, 2):  # any mid-epoch checkpoint
                proc.send_signal(signal.SIGKILL)
                killed_at = (state['epoch'], state['step'])
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, 'the run ended before it could be killed mid-epoch'
    assert proc.returncode == -signal.SIGKILL
    survivor = load_checkpoint(str(checkpoint))  # the last good checkpoint is readable after the kill
    # The kill lands a few steps after the checkpoint it was timed on (reading that one takes a while on a busy
    # machine): any checkpoint before the run's last is a stop to resume from.
    assert (survivor['epoch'], survivor['step']) != (1, None), 'killed after the last checkpoint: nothing to resume'

    resumed = tool('train.py', *smoke_args(tmp_path / 'killed', *common, '--resume', str(checkpoint)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(str(tmp_path / 'full' / 'out' / 'checkpoint.pth')), _weights(str(checkpoint))
    for k in a:  # the same operations in the same order on one host: no rounding can differ
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the epoch the kill cut logs the average of all its steps, those before the kill included
    logs = [[{k: v for k, v in json.loads(line).items() if k != 'time'} for line in open(run / 'out' / 'log.txt')]
            for run in (tmp_path / 'full', tmp_path / 'killed')]
    assert logs[0] == logs[1] and len(logs[0]) == 2


@pytest.mark.slow
def test_training_with_the_backbone_in_loader_workers_ends_at_the_same_weights(tmp_path):
    """Two epochs (the workers start again each epoch), dropout on: the main process's random numbers are
    untouched by the workers."""
    common = ['--lr_backbone', '0', '--epochs', '2', '--eval_every', '100', '--dropout', '0.1']
    here = tool('train.py', *smoke_args(tmp_path / 'here', *common))
    assert here.returncode == 0, here.stderr[-3000:]
    workers = tool('train.py', *smoke_args(tmp_path / 'workers', *common), '--num_workers', '2',
                   '--backbone_in_workers')
    assert workers.returncode == 0, workers.stderr[-3000:]
    a = _weights(str(tmp_path / 'here' / 'out' / 'checkpoint.pth'))
    b = _weights(str(tmp_path / 'workers' / 'out' / 'checkpoint.pth'))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    logs = [[json.loads(line) for line in open(tmp_path / run / 'out' / 'log.txt')] for run in ('here', 'workers')]
    for log in logs:
        for entry in log:
            del entry['time']
    assert logs[0] == logs[1] and len(logs[0]) == 2


@pytest.mark.slow
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tool('train.py', *smoke_args(tmp_path, '--lr', '1e30', '--lr_backbone', '1e30', '--clip_max_norm', '0',
                                       '--checkpoint_every', '1', '--epochs', '3'))
    assert run.returncode != 0
    assert 'loss is' in run.stderr and 'epoch' in run.stderr and 'step' in run.stderr
    assert 'Traceback' not in run.stderr
    state = load_checkpoint(str(tmp_path / 'out' / 'checkpoint.pth'))
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process_with_the_same_global_batch(tmp_path):
    # Same-size images (crop = whole image) and one object per image, so padding and the class-weighted
    # cross-entropy do not depend on how the batch is split; no dropout. The backbone is frozen: Adam's
    # first updates are about lr * sign(grad), which turns float rounding in near-zero gradients into
    # +-lr differences, and its scale invariance hides gradient-scale faults; the logged losses catch those.
    same = ['--epochs', '1', '--synthetic_train', '4', '--synthetic_objects', '1', '1',
            '--synthetic_image_size', '64', '--train_scales', '64', '--crop_scales', '64', '--crop_size', '64', '64',
            '--dropout', '0', '--eval_every', '100', '--lr', '1e-3', '--lr_backbone', '0',
            '--val_size', '60']  # outside the training scales: a warning at start, said by one process of two
    one = tool('train.py', *smoke_args(tmp_path / 'one', *same, '--batch_size', '2'))
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.copytree(tmp_path / 'one' / 'synthetic', tmp_path / 'two' / 'synthetic')
    env = {**os.environ, 'PYTHONPATH': PYTHONPATH, 'OMP_NUM_THREADS': '1'}
    torchrun = os.path.join(os.path.dirname(PY), 'torchrun')
    two = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2', os.path.join(ROOT, 'tools', 'train.py'),
                          *smoke_args(tmp_path / 'two', *same, '--batch_size', '1')],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count('warning: --val_size 60 lies outside the training scales') == 1, two.stderr[-3000:]
    one_ckpt, two_ckpt = (load_checkpoint(str(tmp_path / run / 'out' / 'checkpoint.pth')) for run in ('one', 'two'))
    # Adam's moments are sums of the gradients (exp_avg) and of their squares: the same up to float32 rounding
    # of sums taken in another order, a few hundred ulps (5e-5) of a tensor's norm, or of the whole gradient's for
    # a tensor the loss barely reaches (its gradient is rounding noise); a gradient that is not averaged over the
    # processes, or misses one, is off by a factor of 2 or more.
    for moment in ('exp_avg', 'exp_avg_sq'):
        states = [(s[moment], two_ckpt['optimizer']['state'][i][moment]) for i, s in one_ckpt['optimizer']['state'].items()]
        total = torch.stack([x.norm() for x, _ in states]).norm()
        for i, (x, y) in enumerate(states):
            assert (x - y).norm() <= 5e-5 * (x.norm() + total / 10), (moment, i, (x - y).norm().item(), x.norm().item())
    # Weights: a first Adam step moves an element by lr * g / (|g| + eps) and the second by at most 1.0014 lr
    # (beta1 0.9, beta2 0.999), so a gradient at the rounding floor may step either way: at most 2.003 lr a step.
    steps = 2
    a, b = one_ckpt['model'], two_ckpt['model']
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2.003 * 1e-3 * steps, msg=k)
    log_one = json.loads(open(tmp_path / 'one' / 'out' / 'log.txt').readline())
    log_two = json.loads(open(tmp_path / 'two' / 'out' / 'log.txt').readline())
    for k in ('train_loss', 'train_loss_ce', 'train_loss_bbox', 'train_loss_giou'):
        assert log_one[k] == pytest.approx(log_two[k], rel=1e-5), k


@pytest.mark.slow
def test_eval_takes_model_flags_from_a_published_layout_checkpoint(tmp_path):
    """A model-zoo file: model, optimizer, lr_scheduler, epoch and an argparse.Namespace of DETR's flags."""
    flags = TINY + ['--enc_rpe2d', 'rpe-1.9-cross-bias-0-qk', '--num_queries', '7']
    args = get_args_parser().parse_args(flags)
    torch.manual_seed(0)
    model = build_model(args)[0]
    del args.num_classes  # as in the published files
    path = str(tmp_path / 'zoo.pth')
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 149, 'args': args}, path)
    data = ['--dataset_file', 'synthetic', '--synthetic_dir', str(tmp_path / 'synthetic'), '--synthetic_train', '4',
            '--synthetic_val', '4', '--synthetic_image_size', '64', '--val_size', '64', '--val_max_size', '96',
            '--device', 'cpu', '--num_workers', '0']
    run = tool('eval.py', *data, '--resume', path, '--output_dir', str(tmp_path / 'eval'))
    assert run.returncode == 0, run.stderr[-3000:]
    assert '--enc_rpe2d rpe-1.9-cross-bias-0-qk' in run.stdout and '--num_queries 7' in run.stdout
    stats = json.load(open(tmp_path / 'eval' / 'eval.json'))['bbox']
    assert len(stats) == 12 and all(math.isfinite(s) for s in stats)
