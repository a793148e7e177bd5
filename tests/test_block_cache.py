"""rpe_ops.block_cache: a CPU block freed in one step serves the next without being faulted in again."""
import json
import os
import subprocess
import sys

import pytest

import rpe_ops
from rpe_ops import block_cache

compiled = pytest.mark.skipif(not rpe_ops.build_info()['cpu'], reason='rpe_ops._C is not built')
linux = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='counts page faults as Linux reports them')

# Allocates and frees a 64 MiB tensor (twice glibc's largest mmap threshold) once, then does it 5 times
# more, counting the minor page faults of each (each first touch of a 4 KiB page that the kernel maps, and
# zeroes, is one) and noting where the block lies.
CODE = '''
import json, resource, sys
from rpe_ops import block_cache
before = block_cache.describe()
line = block_cache.install() if sys.argv[1] == 'install' else None
import torch
def step():
    x = torch.empty(16 << 20)   # 64 MiB of float32
    x.fill_(1.0)                # touches every page
    return x.data_ptr()
step()
faults, places = [], []
for _ in range(5):
    before_step = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    places.append(step())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before_step)
print(json.dumps({'faults': faults, 'places': places, 'before': before, 'line': line}))
'''
PAGES = (64 << 20) // 4096


def run_python(code, *argv, **env):
    """`code` run by a fresh Python process (the allocator is chosen once per process), with `argv` and `env`
    added; the checkout on its path."""
    return subprocess.run([sys.executable, '-c', code, *argv], capture_output=True, text=True,
                          env={**os.environ, **env, 'PYTHONPATH': os.getcwd()})


def later_steps(install, **env):
    run = run_python(CODE, 'install' if install else 'none', **env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@compiled
@linux
def test_a_freed_large_block_serves_every_later_step_without_page_faults():
    # torch's default (glibc) maps the block afresh each time: every page faults again
    default = later_steps(install=False)
    kept = later_steps(install=True, RPE_OPS_BLOCK_CACHE_MB='')  # unset: the default limit
    assert kept['before'] == "torch's default CPU allocator (rpe_ops.block_cache.install() not called)", kept
    assert kept['line'] == 'rpe_ops block cache: CPU tensors of 2 MiB or more reused (keeps up to 4096 MiB)', kept
    assert all(f < PAGES // 20 for f in kept['faults']), kept
    assert len(set(kept['places'])) == 1, kept  # one block, not a heap growing by a block per step
    assert all(f > PAGES // 4 for f in default['faults']), default


@compiled
@pytest.mark.parametrize('setting, check', [
    # keeps nothing, and torch's default allocator stays
    ('0', "assert info['limit_bytes'] == 0 and info['cached_bytes'] == 0, info\n"
          "assert block_cache.install() == \"torch's default CPU allocator (RPE_OPS_BLOCK_CACHE_MB=0)\"\n"
          "x = torch.empty(1 << 20)  # 4 MiB, from torch's allocator: no third miss\n"
          "assert block_cache.stats()['misses'] == 2\n"),
    ('3', "assert info['limit_bytes'] == 3 << 20 and info['cached_blocks'] == 1, info\n"  # one 2 MiB block fits
          "assert block_cache.install().endswith('(keeps up to 3 MiB)')\n"),
    ('lots', None),
])
def test_limit_comes_from_the_environment(setting, check):
    # two outputs of 2.3 and 2 MiB: each its own block of the cache
    code = ('import torch, rpe_ops\nfrom rpe_ops import block_cache\n'
            'y = rpe_ops.rpe_index(torch.zeros(1, 1, 1024, 2), torch.zeros(1024, 600, dtype=torch.int32))\n'
            'y = rpe_ops.rpe_index(torch.zeros(1, 1, 1024, 2), torch.zeros(1024, 512, dtype=torch.int32))\n'
            'del y\ninfo = block_cache.stats()\n' + (check or ''))
    run = run_python(code, RPE_OPS_BLOCK_CACHE_MB=setting)
    if check is None:
        assert run.returncode != 0
        assert ("ValueError: RPE_OPS_BLOCK_CACHE_MB must be a whole number of MiB >= 0 (the most the block cache "
                "keeps; 0 keeps nothing), got 'lots'") in run.stderr, run.stderr
    else:
        assert run.returncode == 0, run.stderr


def test_without_the_compiled_extension_nothing_changes(monkeypatch):
    monkeypatch.setattr(rpe_ops, '_C', None)
    assert block_cache.install() == "torch's default CPU allocator (rpe_ops is not compiled)"
    assert block_cache.stats() == {'cached_bytes': 0, 'cached_blocks': 0, 'limit_bytes': 0, 'hits': 0, 'misses': 0}
    block_cache.empty()


CONV = '''
import json, sys, torch
from rpe_ops import block_cache
if sys.argv[1] == 'install':
    assert block_cache.install().startswith('rpe_ops block cache')
torch.manual_seed(0)
conv = torch.nn.Conv2d(32, 48, 3, padding=1)
x = torch.randn(2, 32, 96, 96, requires_grad=True)   # activations of 2 MiB and more: from the cache
for _ in range(3):                                   # the later steps run on kept blocks
    x.grad = None
    out = conv(x).relu()
    out.square().sum().backward()
print(json.dumps({'out': out.double().sum().item(), 'grad': x.grad.double().abs().sum().item(),
                  'hits': block_cache.stats()['hits']}))
'''


@compiled
def test_convolutions_and_their_gradients_compute_the_same_on_the_cache():
    # oneDNN allocates its buffers with torch's raw_allocate / raw_deallocate, which need a context equal to
    # the pointer and a raw deleter: without them the process aborts
    results = {}
    for mode in ('install', 'default'):
        run = run_python(CONV, mode)
        assert run.returncode == 0, run.stderr[-2000:]
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results['install']['hits'] > 0 and results['default']['hits'] == 0
    assert results['install']['out'] == results['default']['out']
    assert results['install']['grad'] == results['default']['grad']


@compiled
def test_tools_run_with_freed_memory_kept():
    run = run_python('from rpe_ops import block_cache\nfrom detr_irpe.cli.runner import run_tool\n'
                     'print(run_tool(block_cache.describe))\n')
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith('rpe_ops block cache: CPU tensors of 2 MiB or more reused')
