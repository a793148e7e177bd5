"""What `--amp` means on the device at hand: the one place that decides autocast and loss scaling.

--amp autocasts to a half type only where the hardware computes it natively:
  CUDA  bfloat16 where the GPU has it (Ampere and later); float16 otherwise, with a gradient scaler,
        since float16's 5 exponent bits flush small gradients to zero without loss scaling.
  CPU   bfloat16 where the CPU computes it faster than float32: AMX-BF16 (Sapphire Rapids and later), or
        AVX512_BF16 on AMD (Zen 4, whose float32 AVX-512 runs at half width); float32 otherwise. Without
        bfloat16 arithmetic every operand is converted in software (an Ice Lake Xeon's 3x3 conv 256->256: 28 ms
        in float32, 66 ms under bfloat16 autocast, issue #11); an Intel Xeon with AVX512_BF16 but no AMX ran
        convolutions and products 1.4-1.9x slower in bfloat16 than in float32 (docs/performance.md, host D).
The choice is printed in one line at start-up. DETR_IRPE_AMP_DTYPE=bfloat16|float16|float32 forces the
dtype --amp uses (benchmarks, tests, or a CPU this rule misjudges); without --amp everything is float32.

    precision = choose_precision('cuda', amp=True)       # Precision(device_type='cuda', dtype=torch.bfloat16, ...)
    scaler = precision.grad_scaler()                     # a no-op scaler unless dtype is float16
    with precision.autocast():
        loss = criterion(model(images), targets)
"""
import os
from dataclasses import dataclass

import torch

from detr_irpe import UsageError

FORCE_ENV = 'DETR_IRPE_AMP_DTYPE'
DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}
# cpuinfo's names (torch.cpu.get_capabilities()) of the x86 features that compute bfloat16 natively
CPU_BF16_FEATURES = ('amx_bf16', 'avx512_bf16')


@dataclass(frozen=True)
class Precision:
    """device_type: 'cpu' or 'cuda'; dtype: what autocast computes in (float32: no autocast);
    reason: why, for the start-up line."""
    device_type: str
    dtype: torch.dtype
    reason: str

    @property
    def autocast_enabled(self):
        return self.dtype != torch.float32

    @property
    def uses_grad_scaler(self):
        return self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast_enabled)

    def grad_scaler(self, **kwargs):
        """torch.amp.GradScaler for this device, enabled only for float16 (disabled, its scale/unscale_/step/
        update pass straight through, so the training loop has one code path)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_grad_scaler, **kwargs)

    def describe(self):
        """The start-up line."""
        if not self.autocast_enabled:
            return f'precision: --amp on {self.device_type}: float32, no autocast ({self.reason})'
        scaler = ' with a gradient scaler' if self.uses_grad_scaler else ''
        return f'precision: --amp on {self.device_type}: {_name(self.dtype)} autocast{scaler} ({self.reason})'


def cpu_bf16_features(capabilities=None):
    """The CPU features in CPU_BF16_FEATURES this CPU has (empty: no native bfloat16).

    capabilities: a mapping as torch.cpu.get_capabilities() returns (default: this CPU's)."""
    if capabilities is None:
        capabilities = _cpu_capabilities()
    return [name for name in CPU_BF16_FEATURES if capabilities.get(name)]


def choose_precision(device, amp, cpu_capabilities=None, cuda_bf16=None, forced=None):
    """The Precision of a run on `device` with --amp on or off.

    cpu_capabilities: mapping of CPU features (default: this CPU's); cuda_bf16: whether the GPU computes
    bfloat16 natively (default: asks the current GPU); forced: a DTYPES name (default: $DETR_IRPE_AMP_DTYPE).
    """
    device_type = torch.device(device).type
    if not amp:
        return Precision(device_type, torch.float32, '--amp not given')
    if forced is None:
        forced = os.environ.get(FORCE_ENV) or None
    if forced is not None:
        if forced not in DTYPES:
            raise UsageError(f'{FORCE_ENV}={forced!r} is not a dtype --amp can use; expected one of '
                             f'{", ".join(DTYPES)}. Unset it to let the device decide.')
        return Precision(device_type, DTYPES[forced], f'forced by {FORCE_ENV}')
    if device_type == 'cuda':
        if cuda_bf16 is None:
            cuda_bf16 = _cuda_computes_bf16()
        if cuda_bf16:
            return Precision(device_type, torch.bfloat16, 'this GPU computes bfloat16')
        return Precision(device_type, torch.float16, 'this GPU has no bfloat16')
    if device_type == 'cpu':
        if cpu_capabilities is None:
            cpu_capabilities = _cpu_capabilities()
        features = cpu_bf16_features(cpu_capabilities)
        amd = 'AMD' in str(cpu_capabilities.get('cpu_name', '')).upper()
        if 'amx_bf16' in features or (features and amd):
            return Precision(device_type, torch.bfloat16, f'this CPU computes bfloat16: {", ".join(features)}')
        if features:
            return Precision(device_type, torch.float32, 'this CPU has AVX512_BF16 but no AMX: on Intel CPUs that is '
                                                         'slower than float32')
        return Precision(device_type, torch.float32, 'this CPU has no AVX512_BF16 or AMX-BF16: bfloat16 would be '
                                                     'emulated and slower than float32')
    return Precision(device_type, torch.float32, f'no autocast rule for {device_type} devices')


def _cpu_capabilities():
    """This CPU's features by cpuinfo's names (older torch has no get_capabilities, only the two checks)."""
    get = getattr(torch.cpu, 'get_capabilities', None)
    if get is not None:
        return get()
    checks = {'avx512_bf16': '_is_avx512_bf16_supported', 'amx_bf16': '_is_amx_tile_supported'}
    return {name: bool(getattr(torch.cpu, check, lambda: False)()) for name, check in checks.items()}


def _cuda_computes_bf16():
    """Native bfloat16 on the current GPU. torch.cuda.is_bf16_supported() alone also says yes where bfloat16
    is only emulated (before Ampere), which is what float16 with a scaler is for."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the argument: it did not count emulation either
        return torch.cuda.is_bf16_supported()


def _name(dtype):
    return str(dtype).replace('torch.', '')
