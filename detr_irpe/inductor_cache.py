"""One torch.compile (inductor) cache folder per CPU instruction set.

torch 2.14's inductor keys its on-disk cache of generated code without the vector ISA it generated for, then
compiles that code with the flags of the ISA in force. So a cache filled under one ISA and read under another
(ATEN_CPU_CAPABILITY=avx2 after a default run, or one disk moved between an AVX-512 host and an AMX host)
runs C++ tiled for 16 float lanes with 8-lane vectors: lanes left unset, wrong attention outputs and
out-of-range indices with no error of its own. tests/inductor_isa_cache_repro.py reproduces it.
"""
import hashlib
import os


def cpu_key():
    """'avx512-1a2b3c4d': torch's CPU capability (ATEN_CPU_CAPABILITY included) and a hash of the CPU's
    model and feature flags."""
    import torch
    described = ''
    try:
        with open('/proc/cpuinfo') as f:
            described = ''.join(sorted({line for line in f if line.startswith(('model name', 'flags'))}))
    except OSError:  # not Linux: the capability alone
        pass
    digest = hashlib.sha256(described.encode()).hexdigest()[:8]
    return f'{torch.backends.cpu.get_cpu_capability().lower()}-{digest}'


def use_cache_per_cpu():
    """Point TORCHINDUCTOR_CACHE_DIR at torch's default folder + '/' + cpu_key(), unless the user set another
    folder. Must run before inductor's first compile in the process; returns the folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    default = default_cache_dir()
    # inductor writes its default into the variable on first use, which `import torchvision` already is
    if os.path.abspath(os.environ.get('TORCHINDUCTOR_CACHE_DIR', default)) == os.path.abspath(default):
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = os.path.join(default, cpu_key())
    return os.environ['TORCHINDUCTOR_CACHE_DIR']
