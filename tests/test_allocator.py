"""detr_irpe.allocator: a CPU block freed in one step serves the next without being faulted in again."""
import json
import os
import subprocess
import sys

import pytest

import rpe_ops

compiled = pytest.mark.skipif(not rpe_ops.build_info()['cpu'], reason='rpe_ops._C is not built')
linux = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='counts page faults as Linux reports them')

# Allocates and frees a 64 MiB tensor (twice glibc's largest mmap threshold) once, then does it 5 times
# more, counting the minor page faults of each (each first touch of a 4 KiB page that the kernel maps, and
# zeroes, is one) and noting where the block lies.
CODE = '''
import json, resource, sys
from detr_irpe.allocator import reuse_freed_memory
line = reuse_freed_memory() if sys.argv[1] == 'call' else None
import torch
def step():
    x = torch.empty(16 << 20)   # 64 MiB of float32
    x.fill_(1.0)                # touches every page
    return x.data_ptr()
step()
faults, places = [], []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    places.append(step())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'faults': faults, 'places': places, 'line': line}))
'''
PAGES = (64 << 20) // 4096


def run_python(code, *argv, **env):
    """`code` run by a fresh Python process (the allocator is chosen once per process), with `argv` and `env`
    added; the checkout on its path."""
    return subprocess.run([sys.executable, '-c', code, *argv], capture_output=True, text=True,
                          env={**os.environ, **env, 'PYTHONPATH': os.getcwd()})


def later_steps(call, **env):
    run = run_python(CODE, 'call' if call else 'none', **env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@compiled
@linux
def test_a_freed_large_block_serves_every_later_step_without_page_faults():
    # torch's default (glibc) maps the block afresh each time: every page faults again
    default = later_steps(call=False)
    kept = later_steps(call=True)
    assert kept['line'].startswith('rpe_ops block cache'), kept
    assert all(f < PAGES // 20 for f in kept['faults']), kept
    assert len(set(kept['places'])) == 1, kept  # one block, not a heap growing by a block per step
    assert all(f > PAGES // 4 for f in default['faults']), default


@compiled
@linux
def test_system_setting_leaves_torch_default_allocator():
    left = later_steps(call=True, DETR_IRPE_MALLOC='system')
    assert "default CPU allocator (DETR_IRPE_MALLOC=system)" in left['line']
    assert all(f > PAGES // 4 for f in left['faults']), left


def test_bad_setting_says_what_to_use():
    run = run_python('from detr_irpe.allocator import reuse_freed_memory as r; r()', DETR_IRPE_MALLOC='jemalloc')
    assert run.returncode != 0
    assert "DETR_IRPE_MALLOC='jemalloc' is not one of ['reuse', 'system']" in run.stderr


def test_tools_run_with_freed_memory_kept(tmp_path):
    # every tool's main runs inside detr_irpe.config.run_tool, which applies the setting first
    code = ('from detr_irpe import allocator\nfrom detr_irpe.config import run_tool\n'
            'print(run_tool(lambda: allocator.describe()))\n')
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    want = 'rpe_ops block cache' if rpe_ops.build_info()['cpu'] else 'rpe_ops is not compiled'
    assert want in run.stdout


CONV = '''
import json, sys, torch
if sys.argv[1] == 'cache':
    import rpe_ops
    assert rpe_ops.cache_all_cpu_tensors() and rpe_ops.caches_all_cpu_tensors()
torch.manual_seed(0)
conv = torch.nn.Conv2d(32, 48, 3, padding=1)
x = torch.randn(2, 32, 96, 96, requires_grad=True)   # activations of 2 MiB and more: from the cache
for _ in range(3):                                   # the later steps run on kept blocks
    x.grad = None
    out = conv(x).relu()
    out.square().sum().backward()
print(json.dumps({'out': out.double().sum().item(), 'grad': x.grad.double().abs().sum().item(),
                  'hits': __import__('rpe_ops').cache_info()['hits']}))
'''


@compiled
def test_convolutions_and_their_gradients_compute_the_same_on_the_cache():
    # oneDNN allocates its buffers with torch's raw_allocate / raw_deallocate, which need a context equal to
    # the pointer and a raw deleter: without them the process aborts
    results = {}
    for mode in ('cache', 'default'):
        run = run_python(CONV, mode)
        assert run.returncode == 0, run.stderr[-2000:]
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results['cache']['hits'] > 0
    assert results['cache']['out'] == results['default']['out']
    assert results['cache']['grad'] == results['default']['grad']
