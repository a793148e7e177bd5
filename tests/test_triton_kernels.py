"""The ops' CUDA implementation: Triton kernels (rpe_ops/triton_kernels.py) registered in rpe_ops/cuda.py.

The kernels run on CPU tensors under the Triton interpreter against the compiled CPU op and the float64
reference functions. TRITON_INTERPRET must be set before triton.jit decorates the kernels, so they run in
one subprocess that gpu_check's triton_kernels_match_cpu_op starts (rpe_ops.triton_kernels.check_against_cpu);
TRITON_INTERPRET is never set in this process, so the rest of the suite is unaffected.
"""
import contextlib
import os
import sys

import pytest
import torch

import rpe_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
compiled = pytest.mark.skipif(not rpe_ops.build_info()['cpu'], reason='rpe_ops._C is not built')
OPS = ['rpe_index', 'rpe_reduce', 'rpe_index_qk', 'rpe_reduce_qk']


@pytest.fixture(scope='module')
def interpreted():
    """{case 'op/ids/dtype/layout': {'max_error', 'bound_ratio'}}, from gpu_check's check as `make gpu-check` runs it
    (one interpreter subprocess, ~15 s; the suite's gpu_check runs leave it to this test)."""
    from detr_irpe.lab import gpu_check
    from rpe_ops import triton_kernels
    assert not triton_kernels.INTERPRETING  # this process: plain triton.jit, nothing run
    result = gpu_check.CHECKS['triton_kernels_match_cpu_op']('cpu', quick=True)
    worst = max(r['bound_ratio'] for r in result['cases'].values())
    assert len(result['cases']) >= 50 and result['passed'] == (worst <= 1) and result['worst_error_over_bound'] == worst
    return result['cases']


@compiled
@pytest.mark.parametrize('op', OPS)
def test_triton_kernels_equal_the_cpu_op_and_the_reference_forward_and_backward(op, interpreted):
    cases = {case: result for case, result in interpreted.items() if case.split('/')[0] == op}
    covered = {part for case in cases for part in case.split('/')[1:]}
    # iRPE's own ids and random ones, K within one 64-bucket tile, past it and past several, Lq != Lk,
    # every dtype, non-contiguous inputs and ids.
    assert {'irpe', 'random_k81', 'random_k300', 'single_bucket', 'float32', 'bfloat16', 'float16', 'float64',
            'strided', 'contiguous'} <= covered, sorted(covered)
    if op in ('rpe_index', 'rpe_reduce'):
        assert 'flat' in covered  # K = L * buckets: the scatter path
    # bound: two float32 sums of n terms differ by at most 2 n eps sum|terms|, plus one rounding to the dtype
    failing = {case: result for case, result in cases.items() if not result['bound_ratio'] <= 1}
    assert not failing, failing


def test_bucket_ids_are_checked_on_the_host_with_the_range_found_and_expected():
    from rpe_ops import cuda
    x, v = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 4)
    index = torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0]], dtype=torch.int32)
    with pytest.raises(IndexError, match=r'rpe_ops.rpe_index: the bucket ids lie in \[-1, 3\], but a table of 3 '
                                         r'buckets needs ids in \[0, 2\]'):
        cuda.rpe_index(x, index)
    with pytest.raises(IndexError, match=r'rpe_ops.rpe_reduce_qk \(index_t\): the bucket ids lie in \[-1, 3\]'):
        cuda.rpe_reduce_qk(v, index.clamp(0, 1), 2, index, 4)
    with pytest.raises(TypeError, match=r'index must be int32'):
        cuda.rpe_reduce(v, index.long(), 4)
    cuda.check_bucket_ids('rpe_index', index.clamp(0, 2), 3)  # a fresh tensor: checked, in range
    index.clamp_(0, 2)  # the same tensor changed in place: its cached range no longer holds
    cuda.check_bucket_ids('rpe_index', index, 3)


def test_bucket_ids_are_not_read_back_while_a_cuda_graph_is_captured(monkeypatch):
    """Reading the range back is a sync, an error during capture; the warm-up run before it checked the ids."""
    from rpe_ops import cuda
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda self: True))
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: True)
    monkeypatch.setattr(torch, 'aminmax', lambda t: pytest.fail('the ids were read back during capture'))
    cuda.check_bucket_ids('rpe_index', torch.tensor([[0, 5]], dtype=torch.int32), 3)
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: False)
    with pytest.raises(pytest.fail.Exception, match='read back'):
        cuda.check_bucket_ids('rpe_index', torch.tensor([[0, 5]], dtype=torch.int32), 3)


def test_cuda_ops_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each op makes it its tensors' for the launch (a model on cuda:1
    in a process whose current device is cuda:0 would otherwise launch on cuda:0 with cuda:1's pointers)."""
    from rpe_ops import cuda
    current = []

    @contextlib.contextmanager
    def device(where):
        current.append(where)
        yield
        current.pop()
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda self: True))
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device', device)
    launched = []
    monkeypatch.setattr(cuda, '_kernels', lambda op: lambda *args: launched.append((op, list(current))))
    x, v = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 4)
    index = torch.tensor([[0, 1, 2, 2], [0, 1, 0, 0]], dtype=torch.int32)
    cuda.rpe_index(x, index)
    cuda.rpe_reduce(v, index, 3)
    cuda.rpe_index_qk(x, index, torch.randn(1, 2, 4, 3), index)
    cuda.rpe_reduce_qk(v, index, 3, index, 3)
    assert launched == [(op, [x.device]) for op in ('rpe_index', 'rpe_reduce', 'rpe_index_qk', 'rpe_reduce_qk')]
    assert current == []


SCATTERED = """
import warnings, torch, rpe_ops.triton_kernels as t
values, index = torch.randn(1, 2, 3, 4), torch.randint(0, 600, (3, 4), dtype=torch.int32)
torch.use_deterministic_algorithms(True)
try:
    t.rpe_reduce(values, index, 600)
except RuntimeError as e:
    print('error:', e)
torch.use_deterministic_algorithms(True, warn_only=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = t.rpe_reduce(values, index, 600)
print('warned:', len(caught), float((out.sum((-1, -2)) - values.sum((-1, -2))).abs().max()))
torch.use_deterministic_algorithms(False)
print('one-hot:', t.rpe_reduce(values, index % 500, 500).shape)
"""


def test_the_atomic_scatter_is_refused_under_deterministic_algorithms_as_torchs_own_ops():
    # above 512 buckets (iRPE on queries alone) the reduction scatters with atomics: its sums' order varies on a GPU
    import subprocess
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'PYTHONPATH': ROOT}
    run = subprocess.run([sys.executable, '-c', SCATTERED], env=env, capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 3, run.stderr[-3000:]
    assert lines[0].startswith('error: rpe_ops.rpe_reduce on CUDA over 600 buckets in torch.float32 (above 512 ')
    assert 'torch.use_deterministic_algorithms(True, warn_only=True) to accept it' in lines[0]
    warned, error = lines[1].split()[1:]
    assert warned == '1' and float(error) < 1e-5  # with warn_only it runs, and sums what it was given
    assert lines[2] == 'one-hot: torch.Size([1, 2, 3, 500])'  # no atomics: nothing said


@pytest.mark.parametrize('arch', [75, 86, 90])
def test_op_kernels_compile_as_launched_within_each_gpus_shared_memory(arch):
    # compiled by Triton's ptxas with the specialisation a launch of batch 16, 8 heads takes (no GPU needed): the
    # float32 query-side reduce fills a T4's 64 KiB exactly and 98% of an sm_86's 99 KiB; a block over it would not
    # launch there. Spills are for the docs (docs/gpu_check.md), not for this test.
    from detr_irpe.lab.kernel_resources import SHARED_MEMORY_LIMIT, op_kernel_resources
    for dtype in ('float32', 'float16' if arch == 75 else 'bfloat16'):
        found = op_kernel_resources(arch, dtype)
        assert [(call, name) for call, name, _ in found] == [
            ('rpe_index_qk', '_index_kernel'), ('rpe_reduce query side', '_reduce_kernel'),
            ('rpe_reduce key side', '_reduce_kernel')]
        for call, _, resources in found:
            assert resources['shared'] <= SHARED_MEMORY_LIMIT[arch] and resources['registers'] <= 255, \
                (arch, dtype, call, resources)


def test_public_ops_have_one_cuda_kernel_the_triton_one():
    for op in OPS:
        dump = torch._C._dispatch_dump(f'rpe_ops::{op}')
        cuda_lines = [line for line in dump.splitlines() if line.startswith('CUDA')]
        assert len(cuda_lines) == 1 and 'rpe_ops/cuda.py' in cuda_lines[0], dump


def test_without_triton_a_cuda_call_says_what_to_install(monkeypatch):
    from rpe_ops import cuda
    assert cuda._kernels('rpe_reduce') is rpe_ops.triton_kernels.rpe_reduce
    monkeypatch.setitem(sys.modules, 'triton', None)  # importing it raises ImportError
    with pytest.raises(RuntimeError, match=r'rpe_ops.rpe_reduce on CUDA: triton cannot be imported .*'
                                           r'`pip install triton`; no nvcc needed'):
        cuda._kernels('rpe_reduce')
    assert rpe_ops.build_info()['cuda'] is False