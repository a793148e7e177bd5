"""The CUDA implementation of the four rpe_ops: the Triton kernels of rpe_ops/triton_kernels.py, registered for
the ops' CUDA dispatch key so that autograd, torch.compile and export see one op. Triton comes with torch's CUDA
wheels and compiles for the GPU at hand: no nvcc, one build for every GPU and CUDA version. (Hand-written .cu
kernels ran 1.9x slower over DETR's sizes on an H200, up to 5.6x on DC5's reductions: docs/rpe_ops.md.)
Bucket ids are checked here, on the host, once per ids tensor: no device asserts.
"""
import contextlib

import torch

import rpe_ops


def triton_problem():
    """Why the Triton kernels cannot run here (triton missing), or None."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return (f'triton cannot be imported ({error}); rpe_ops runs on CUDA through Triton kernels. Install the '
                f'triton that matches torch {torch.__version__} (`pip install triton`; no nvcc needed).')
    return None


def _kernels(op):
    """The Triton kernel of op."""
    problem = triton_problem()
    if problem is not None:
        raise RuntimeError(f'rpe_ops.{op} on CUDA: {problem}')
    from rpe_ops import triton_kernels
    return getattr(triton_kernels, op)


def on_device_of(tensor):
    """Triton launches on the current CUDA device and its stream: this makes it the tensor's for the launches in
    its block (a model on cuda:1 in a process whose current device is cuda:0). Nothing for a CPU tensor (the
    interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_bucket_ids(op, index, num_buckets):
    """IndexError naming the op, the ids found and the range expected if an id lies outside [0, num_buckets).
    One min/max reduction (a device sync) per ids tensor and version: the result is kept on the tensor, since
    bucket ids are built once per map size and reused every step. Not while a CUDA graph is being captured,
    where a sync is an error: a graph is captured after a warm-up run of the same code (torch.compile's
    cudagraph trees, torch.cuda.make_graphed_callables), which checked the ids it computes on every replay."""
    if index.numel() == 0 or (index.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    cached = getattr(index, '_rpe_ops_id_range', None)
    if cached is None or cached[0] != index._version:
        lo, hi = torch.aminmax(index)
        cached = (index._version, int(lo), int(hi))
        index._rpe_ops_id_range = cached
    _, lo, hi = cached
    if lo < 0 or hi >= num_buckets:
        raise IndexError(f'rpe_ops.{op}: the bucket ids lie in [{lo}, {hi}], but a table of {num_buckets} '
                         f'buckets needs ids in [0, {num_buckets - 1}]. Pass the ids built for this table '
                         f'(detr_irpe.irpe.get_bucket_ids_2d) and its number of buckets.')


# Each kernel checks what the Python wrappers in rpe_ops/__init__.py check (direct torch.ops calls skip
# those), then the ids, before any launch.
def rpe_index(input, index):
    rpe_ops._check_args('rpe_index', 'input', input, index, 'K')
    check_bucket_ids('rpe_index', index, input.shape[3])
    with on_device_of(input):
        return _kernels('rpe_index')(input, index)


def rpe_reduce(values, index, num_buckets):
    rpe_ops._check_reduce_args('rpe_reduce', values, index, num_buckets)
    check_bucket_ids('rpe_reduce', index, num_buckets)
    with on_device_of(values):
        return _kernels('rpe_reduce')(values, index, num_buckets)


def rpe_index_qk(input, index, input_t, index_t):
    rpe_ops._check_args('rpe_index_qk', 'input', input, index, 'K')
    rpe_ops._check_args('rpe_index_qk', 'input_t', input_t, index_t.t(), 'Kt')
    if input_t.shape[:3] != (*input.shape[:2], index.shape[1]) or index_t.shape != index.shape \
            or input_t.dtype != input.dtype:
        raise ValueError(f'rpe_ops.rpe_index_qk: expected input_t of shape (B, H, Lk, Kt) = ({input.shape[0]}, '
                         f'{input.shape[1]}, {index.shape[1]}, Kt) and dtype {input.dtype}, and index_t of shape '
                         f'{tuple(index.shape)}; got {tuple(input_t.shape)} {input_t.dtype} and '
                         f'{tuple(index_t.shape)}.')
    check_bucket_ids('rpe_index_qk', index, input.shape[3])
    check_bucket_ids('rpe_index_qk (index_t)', index_t, input_t.shape[3])
    with on_device_of(input):
        return _kernels('rpe_index_qk')(input, index, input_t, index_t)


def rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t):
    rpe_ops._check_reduce_args('rpe_reduce_qk', values, index, num_buckets)
    rpe_ops._check_reduce_args('rpe_reduce_qk', values, index_t, num_buckets_t)
    check_bucket_ids('rpe_reduce_qk', index, num_buckets)
    check_bucket_ids('rpe_reduce_qk (index_t)', index_t, num_buckets_t)
    with on_device_of(values):
        return _kernels('rpe_reduce_qk')(values, index, num_buckets, index_t, num_buckets_t)


IMPLEMENTATIONS = {'rpe_index': rpe_index, 'rpe_reduce': rpe_reduce, 'rpe_index_qk': rpe_index_qk,
                   'rpe_reduce_qk': rpe_reduce_qk}

_LIBRARY = torch.library.Library('rpe_ops', 'IMPL')
for _op, _kernel in IMPLEMENTATIONS.items():
    _LIBRARY.impl(_op, _kernel, 'CUDA')
