"""--amp by device (detr_irpe.precision) and the training loop's gradient scaler, on CPU.

float16 with a GradScaler is the path of GPUs without bfloat16; CPU autocast computes float16 too, so the
scaler logic of engine.train_one_epoch runs here on a tiny DETR with DETR_IRPE_AMP_DTYPE=float16.
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from detr_irpe import build_model, engine
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.checkpoint import load_checkpoint, save_checkpoint
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.precision import FORCE_ENV, Precision, choose_precision, cpu_bf16_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAPPHIRE_RAPIDS = {'avx512_f': True, 'avx512_bf16': True, 'amx_tile': True, 'amx_bf16': True, 'cpu_name': 'Intel Xeon'}
ZEN4 = {'avx512_f': True, 'avx512_bf16': True, 'amx_tile': False, 'amx_bf16': False, 'cpu_name': 'AMD EPYC 9R14'}
# host D: a Xeon whose AMX the virtual machine does not show; its AVX512_BF16 products ran 1.4-1.9x slower than float32
INTEL_WITHOUT_AMX = {'avx512_f': True, 'avx512_bf16': True, 'avx512_fp16': True, 'amx_tile': False, 'amx_bf16': False,
                     'cpu_name': 'Intel Xeon'}
ICE_LAKE = {'avx512_f': True, 'avx512_bw': True, 'avx512_vl': True, 'avx512_bf16': False, 'amx_bf16': False}
AVX2_ONLY = {'avx2': True}


# --- the decision ------------------------------------------------------------------------------

@pytest.mark.parametrize('device, capabilities, cuda_bf16, dtype', [
    ('cpu', SAPPHIRE_RAPIDS, None, torch.bfloat16),
    ('cpu', ZEN4, None, torch.bfloat16),
    ('cpu', INTEL_WITHOUT_AMX, None, torch.float32),
    ('cpu', {**ZEN4, 'cpu_name': ''}, None, torch.float32),  # AVX512_BF16 alone of a vendor unknown: the safe side
    ('cpu', ICE_LAKE, None, torch.float32),       # bfloat16 would be emulated: 2-3x slower (issue #11)
    ('cpu', AVX2_ONLY, None, torch.float32),
    ('cuda', None, True, torch.bfloat16),          # Ampere and later
    ('cuda', None, False, torch.float16),          # V100, T4: float16 with a gradient scaler
    ('cuda:1', None, False, torch.float16),
])
def test_amp_autocasts_only_to_what_the_device_computes_natively(device, capabilities, cuda_bf16, dtype, monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    p = choose_precision(device, amp=True, cpu_capabilities=capabilities, cuda_bf16=cuda_bf16)
    assert p.device_type == torch.device(device).type and p.dtype == dtype
    assert p.autocast_enabled == (dtype != torch.float32)
    assert p.uses_grad_scaler == (dtype == torch.float16)  # a scaler exactly where float16 gradients can underflow
    line = p.describe()
    assert '\n' not in line and str(dtype).replace('torch.', '') in line


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_without_amp_everything_is_float32_whatever_the_hardware_or_the_environment(device, monkeypatch):
    monkeypatch.setenv(FORCE_ENV, 'float16')
    p = choose_precision(device, amp=False, cpu_capabilities=SAPPHIRE_RAPIDS, cuda_bf16=True)
    assert p.dtype == torch.float32 and not p.autocast_enabled and not p.grad_scaler().is_enabled()


def test_the_environment_variable_forces_the_amp_dtype_and_a_wrong_value_says_what_to_set(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, 'bfloat16')
    assert choose_precision('cpu', amp=True, cpu_capabilities=ICE_LAKE).dtype == torch.bfloat16
    monkeypatch.setenv(FORCE_ENV, 'float16')
    forced = choose_precision('cuda', amp=True, cuda_bf16=True)
    assert forced.dtype == torch.float16 and forced.uses_grad_scaler and FORCE_ENV in forced.describe()
    monkeypatch.setenv(FORCE_ENV, 'fp16')
    with pytest.raises(ValueError) as e:
        choose_precision('cpu', amp=True)
    assert "'fp16'" in str(e.value) and 'float16' in str(e.value) and 'Unset' in str(e.value)


def test_this_cpus_bfloat16_features_agree_with_proc_cpuinfo():
    if not os.path.exists('/proc/cpuinfo'):
        pytest.skip('needs /proc/cpuinfo (Linux) to compare with')
    flags = set()
    for line in open('/proc/cpuinfo'):
        if line.startswith('flags'):
            flags |= set(line.split(':', 1)[1].split())
    # torch.cpu.get_capabilities() and the kernel's flags name these two features alike
    assert set(cpu_bf16_features()) == {f for f in ('amx_bf16', 'avx512_bf16') if f in flags}


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_autocast_computes_a_linear_layer_in_the_chosen_dtype(dtype):
    p = Precision('cpu', dtype, 'test')
    with p.autocast():
        out = torch.nn.Linear(4, 3)(torch.randn(2, 4))
    assert out.dtype == dtype


def test_the_demo_preset_asks_for_amp_and_gets_float32_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    args = parse_args_with_config(get_args_parser(),
                                  ['--config', os.path.join(ROOT, 'configs', 'demo.yaml')])
    assert args.amp and args.device == 'cpu'
    assert choose_precision(args.device, args.amp, cpu_capabilities=ICE_LAKE).dtype == torch.float32
    assert choose_precision(args.device, args.amp, cpu_capabilities=ZEN4).dtype == torch.bfloat16


# --- the gradient scaler in the training loop ----------------------------------------------------

TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu',
        '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k', '--dropout', '0', '--amp', '--lr_backbone', '0']
FLOAT16 = Precision('cpu', torch.float16, 'float16 as on a GPU without bfloat16')


def tiny_run(seed=0):
    torch.manual_seed(seed)
    args = get_args_parser().parse_args(TINY)
    model, criterion, _ = build_model(args)
    optimizer = engine.build_optimizer(model, args)
    return args, model, criterion, optimizer, engine.build_lr_scheduler(optimizer, args)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = [torch.rand(3, 48, 48, generator=g), torch.rand(3, 32, 48, generator=g)]  # one padded
        targets = [{'labels': torch.randint(1, 3, (2,), generator=g),
                    'boxes': torch.cat([0.3 + 0.4 * torch.rand(2, 2, generator=g),
                                        0.1 + 0.2 * torch.rand(2, 2, generator=g)], 1)} for _ in images]
        out.append((images, targets))
    return out


def loss_of(model, criterion, images, targets, precision):
    with precision.autocast():
        outputs = model(images)
    losses = criterion({k: v.float() if torch.is_tensor(v) else [{n: x.float() for n, x in d.items()} for d in v]
                        for k, v in outputs.items()}, targets)
    return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)


def test_gradients_are_unscaled_before_they_are_clipped(monkeypatch):
    args, model, criterion, optimizer, scheduler = tiny_run()
    data = batches(1)
    # The same step's gradients without any scaler, in the same float16 autocast, on a copy of the model.
    reference = copy.deepcopy(model)
    loss_of(reference, criterion, *data[0], FLOAT16).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()
                                                     if p.grad is not None]))

    seen = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda params, max_norm: seen.append(clip(params, max_norm)))
    # an untrained DETR's float16 gradients reach ~100 and overflow from a scale of about 2^10
    scaler = FLOAT16.grad_scaler(init_scale=2.0 ** 4)
    engine.train_one_epoch(model, criterion, data, optimizer, scheduler, 'cpu', 0, args, precision=FLOAT16,
                           scaler=scaler)
    assert len(seen) == 1 and scaler.get_scale() == 2.0 ** 4  # a finite step: no skip
    # scaled by 2^4, not unscaled, the clipped norm would be 16x this
    assert seen[0].item() == pytest.approx(expected.item(), rel=1e-2)


def test_a_step_with_inf_gradients_is_skipped_and_training_goes_on():
    args, model, criterion, optimizer, scheduler = tiny_run()
    poison = {'on': True}
    weight = model.class_embed.weight
    weight.register_hook(lambda grad: grad * float('inf') if poison['on'] else grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after_first = {}

    def on_step(step):
        if step == 1:
            after_first.update({k: v.clone() for k, v in model.state_dict().items()})
            poison['on'] = False

    scaler = FLOAT16.grad_scaler(init_scale=2.0 ** 4)
    stats = engine.train_one_epoch(model, criterion, batches(2), optimizer, scheduler, 'cpu', 0, args,
                                   on_step=on_step, precision=FLOAT16, scaler=scaler)
    assert stats['skipped_steps'] == 1 and math.isfinite(stats['loss'])
    assert all(torch.equal(before[k], after_first[k]) for k in before)  # the poisoned step changed nothing
    assert scaler.get_scale() == 2.0 ** 3                               # and halved the scale
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the next step trained


def test_scaler_state_through_a_checkpoint_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = batches(2)
    # growth_interval 1: the scale doubles after every finite step, so it differs at every step
    args, model, criterion, optimizer, scheduler = tiny_run()
    scaler = FLOAT16.grad_scaler(init_scale=2.0 ** 4, growth_interval=1)
    engine.train_one_epoch(model, criterion, data, optimizer, scheduler, 'cpu', 0, args, precision=FLOAT16,
                           scaler=scaler)

    args, first, criterion, optimizer1, scheduler1 = tiny_run()
    scaler1 = FLOAT16.grad_scaler(init_scale=2.0 ** 4, growth_interval=1)
    engine.train_one_epoch(first, criterion, data[:1], optimizer1, scheduler1, 'cpu', 0, args, precision=FLOAT16,
                           scaler=scaler1)
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint({'model': first.state_dict(), 'optimizer': optimizer1.state_dict(), 'scaler': scaler1.state_dict()},
                    path)
    state = load_checkpoint(path)
    assert state['scaler']['scale'] == 2.0 ** 5 and state['scaler'] != FLOAT16.grad_scaler().state_dict()

    args, resumed, criterion, optimizer2, scheduler2 = tiny_run(seed=5)  # other initial weights: all come from the file
    resumed.load_state_dict(state['model'])
    optimizer2.load_state_dict(state['optimizer'])
    scaler2 = FLOAT16.grad_scaler()
    scaler2.load_state_dict(state['scaler'])
    # the second batch of a 2-step epoch (steps = start_step + len(loader) stays 2)
    engine.train_one_epoch(resumed, criterion, data[1:], optimizer2, scheduler2, 'cpu', 0, args, start_step=1,
                           precision=FLOAT16, scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict() and scaler.get_scale() == 2.0 ** 6
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)


def tool(name, *argv, env=None):
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1', **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', name), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_train_py_keeps_the_scaler_in_its_checkpoint_and_resumes_exactly(tmp_path):
    """tools/train.py with float16 and its scaler: one epoch, then resumed for a second, ends where a two-epoch run
    ends: the same weights and the same scaler state (a resume without it would restart at 2^16 and skip again)."""
    common = ['--config', os.path.join(ROOT, 'configs', 'smoke.yaml'), '--synthetic_dir', str(tmp_path / 'synthetic'),
              '--num_workers', '0', '--eval_every', '100', '--amp', '--threads', '1', '--synthetic_train', '12',
              '--synthetic_val', '2', '--batch_size', '2', '--lr_backbone', '0']  # 6 steps an epoch
    env = {FORCE_ENV: 'float16'}
    full = tool('train.py', *common, '--epochs', '2', '--output_dir', str(tmp_path / 'full'), env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    lines = [line for line in full.stdout.splitlines() if line.startswith('precision:')]
    assert lines == [f'precision: --amp on cpu: float16 autocast with a gradient scaler (forced by {FORCE_ENV})']
    # the tool's freed CPU blocks are kept for reuse (rpe_ops.block_cache), and it says so once
    memory = [line for line in full.stdout.splitlines() if line.startswith('CPU memory:')]
    assert len(memory) == 1 and memory[0].startswith('CPU memory: rpe_ops block cache: CPU tensors of 2 MiB'), memory
    half = tool('train.py', *common, '--epochs', '1', '--output_dir', str(tmp_path / 'cut'), env=env)
    assert half.returncode == 0, half.stderr[-3000:]
    resumed = tool('train.py', *common, '--epochs', '2', '--output_dir', str(tmp_path / 'cut'),
                   '--resume', str(tmp_path / 'cut' / 'checkpoint.pth'), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(str(tmp_path / 'full' / 'checkpoint.pth'))
    b = load_checkpoint(str(tmp_path / 'cut' / 'checkpoint.pth'))
    # From 2^16 the first steps overflow and are skipped, the scale halving each time (an untrained DETR's
    # float16 gradients overflow from about 2^10); the second epoch trains. A resume that restarted the scale
    # at 2^16 would skip its first steps again.
    log = [json.loads(line) for line in open(tmp_path / 'full' / 'log.txt')]
    assert log[0]['train_skipped_steps'] > 0 and log[1]['train_skipped_steps'] < 6 and a['scaler']['scale'] < 2.0 ** 16
    assert a['scaler'] == b['scaler'] and a['scaler']['_growth_tracker'] > 0
    for k, v in a['model'].items():
        torch.testing.assert_close(b['model'][k], v, rtol=0, atol=0, msg=k)
