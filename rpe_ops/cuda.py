"""The CUDA implementation of the four rpe_ops, registered for the ops' CUDA dispatch key so that autograd,
torch.compile and export see one op whichever kernels run:

    RPE_OPS_CUDA_KERNELS=triton   the Triton kernels of rpe_ops/triton_kernels.py (default; Triton needs no nvcc)
    RPE_OPS_CUDA_KERNELS=cuda     the hand-written kernels of csrc/cuda/rpe_index_kernel.cu (compiled only
                                  where nvcc was found at install), until a GPU run has compared the two

The .cu kernels register under names of their own (rpe_ops::_cuda_rpe_index, ...): a second kernel for the
same op and dispatch key would silently replace the first. Bucket ids are checked here, on the host, for both.
"""
import contextlib
import os
import warnings

import torch

import rpe_ops
from rpe_ops import _C

CUDA_KERNELS = ('triton', 'cuda')


def cuda_kernels():
    """Which kernels CUDA calls run: 'triton' or 'cuda', from RPE_OPS_CUDA_KERNELS (default 'triton'),
    read at every call."""
    choice = os.environ.get('RPE_OPS_CUDA_KERNELS', 'triton')
    if choice not in CUDA_KERNELS:
        raise ValueError(f'RPE_OPS_CUDA_KERNELS={choice!r} is not one of {", ".join(CUDA_KERNELS)}; unset it '
                         f'for the Triton kernels, or set it to cuda for the kernels compiled with nvcc.')
    return choice


@contextlib.contextmanager
def using(kernels):
    """Within `with`, CUDA calls run `kernels` ('triton' or 'cuda'), as if RPE_OPS_CUDA_KERNELS said so."""
    previous = os.environ.get('RPE_OPS_CUDA_KERNELS')
    os.environ['RPE_OPS_CUDA_KERNELS'] = kernels
    try:
        yield
    finally:
        if previous is None:
            del os.environ['RPE_OPS_CUDA_KERNELS']
        else:
            os.environ['RPE_OPS_CUDA_KERNELS'] = previous


_warned_no_triton = False


def _kernels(op):
    """The function that runs op on CUDA tensors."""
    global _warned_no_triton
    choice = cuda_kernels()
    if choice == 'triton':
        try:
            from rpe_ops import triton_kernels
            return getattr(triton_kernels, op)
        except ImportError as error:
            if not _C.compiled_with_cuda():
                raise RuntimeError(
                    f'rpe_ops.{op} on CUDA runs Triton kernels, but triton cannot be imported ({error}), and this '
                    f'build has no CUDA kernels of its own (those are compiled only where nvcc is found at '
                    f'install). Install triton (`pip install triton`, no nvcc needed).') from error
            if not _warned_no_triton:
                _warned_no_triton = True
                warnings.warn(f'rpe_ops: triton cannot be imported ({error}); CUDA calls run the kernels compiled '
                              f'with nvcc instead. Install triton, or set RPE_OPS_CUDA_KERNELS=cuda to choose '
                              f'those kernels and silence this warning.', RuntimeWarning, stacklevel=4)
    elif not _C.compiled_with_cuda():
        raise RuntimeError(f'RPE_OPS_CUDA_KERNELS=cuda, but this build of rpe_ops has no CUDA kernels (they are '
                           f'compiled only where nvcc is found at install). Unset RPE_OPS_CUDA_KERNELS to run the '
                           f'Triton kernels, or reinstall with nvcc on PATH.')
    return getattr(torch.ops.rpe_ops, '_cuda_' + op).default


def check_bucket_ids(op, index, num_buckets):
    """IndexError naming the op, the ids found and the range expected if an id lies outside [0, num_buckets).
    One min/max reduction (a device sync) per ids tensor and version: the result is kept on the tensor, since
    bucket ids are built once per map size and reused every step."""
    if index.numel() == 0:
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
    return _kernels('rpe_index')(input, index)


def rpe_reduce(values, index, num_buckets):
    rpe_ops._check_reduce_args('rpe_reduce', values, index, num_buckets)
    check_bucket_ids('rpe_reduce', index, num_buckets)
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
    return _kernels('rpe_index_qk')(input, index, input_t, index_t)


def rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t):
    rpe_ops._check_reduce_args('rpe_reduce_qk', values, index, num_buckets)
    rpe_ops._check_reduce_args('rpe_reduce_qk', values, index_t, num_buckets_t)
    check_bucket_ids('rpe_reduce_qk', index, num_buckets)
    check_bucket_ids('rpe_reduce_qk (index_t)', index_t, num_buckets_t)
    return _kernels('rpe_reduce_qk')(values, index, num_buckets, index_t, num_buckets_t)


IMPLEMENTATIONS = {'rpe_index': rpe_index, 'rpe_reduce': rpe_reduce, 'rpe_index_qk': rpe_index_qk,
                   'rpe_reduce_qk': rpe_reduce_qk}

_LIBRARY = torch.library.Library('rpe_ops', 'IMPL')
for _op, _kernel in IMPLEMENTATIONS.items():
    _LIBRARY.impl(_op, _kernel, 'CUDA')


def compare_kernels(maps=((25, 34), (50, 68)), batch=2, heads=8, dtype=torch.bfloat16, repeats=10,
                    kernels=CUDA_KERNELS, device='cuda'):
    """The Triton and the nvcc kernels side by side in one run, for the GPU run that decides which to keep:
    {f'{op}/{h}x{w}': {'<kernels>_ms': median milliseconds per call, 'max_difference': between the two
    outputs}} at DETR-R50's encoder maps (C5 25 x 34, DC5 50 x 68: L = 850 and 3400) with iRPE's product
    bucket ids (K = 49) and their transpose; 'flat' ops are iRPE on queries alone (Lq = 1, K = L * 49).
    Each repeat times every kernel set once, in turns, so a slow spell of the GPU hits them alike."""
    import statistics
    import time
    from detr_irpe import irpe
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    results = {}
    for h, w in maps:
        ids, K = irpe.get_bucket_ids_2d('product', h, w, device=device)
        ids_t, L = irpe.key_major_ids(ids, 0), h * w
        flat_ids = irpe.key_major_ids(ids, K).view(1, L * L)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        ops = torch.ops.rpe_ops
        table, table_t, scores = rand(batch, heads, L, K), rand(batch, heads, L, K), rand(batch, heads, L, L)
        calls = {'rpe_index': lambda: ops.rpe_index(table, ids),
                 'rpe_reduce': lambda: ops.rpe_reduce(scores, ids, K),
                 'rpe_index_qk': lambda: ops.rpe_index_qk(table, ids, table_t, ids_t),
                 'rpe_reduce_qk': lambda: ops.rpe_reduce_qk(scores, ids, K, ids_t, K),
                 'rpe_index_flat': lambda: ops.rpe_index(table.reshape(batch, heads, 1, L * K), flat_ids),
                 'rpe_reduce_flat': lambda: ops.rpe_reduce(scores.reshape(batch, heads, 1, L * L), flat_ids, L * K)}
        for op, call in calls.items():
            outputs, times = {}, {name: [] for name in kernels}
            for name in kernels:  # a first call each: compiles the Triton kernels, checks the ids
                with using(name):
                    outputs[name] = call()
            for _ in range(repeats):
                for name in kernels:
                    with using(name):
                        _synchronize(device)
                        start = time.perf_counter()
                        call()
                        _synchronize(device)
                    times[name].append(1000 * (time.perf_counter() - start))
            first, *others = [torch.cat([o.flatten().double() for o in (out if isinstance(out, tuple) else (out,))])
                              for out in outputs.values()]
            results[f'{op}/{h}x{w}'] = {
                **{f'{name}_ms': statistics.median(t) for name, t in times.items()},
                'max_difference': max([(first - o).abs().max().item() for o in others], default=0.0)}
    return results


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
