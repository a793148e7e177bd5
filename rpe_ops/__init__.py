"""The two index ops of image relative position encoding (iRPE), compiled.

iRPE gives every (query i, key j) pair a bucket id index[i, j] in [0, K)
(`bucket_ids` in detr_irpe). Attention then needs

    rpe_index(input, index)               Y[b, h, i, j] = input[b, h, i, index[i, j]]
        (B, H, Lq, K) -> (B, H, Lq, Lk)   e.g. q_i . r_{index[i,j]} from q @ lookup_table_weight.T
    rpe_reduce(values, index, K)          out[b, h, i, t] = sum_j values[b, h, i, j] [index[i, j] = t]
        (B, H, Lq, Lk) -> (B, H, Lq, K)   e.g. attention weights summed per bucket (iRPE on values)

Self-attention with iRPE on both keys and queries adds two such terms to its
logits, the one on queries transposed (its table has a row per key j). Two
fused ops make each of those passes over (B, H, Lq, Lk) once:

    rpe_index_qk(input, index, input_t, index_t)
        Y[b, h, i, j] = input[b, h, i, index[i, j]] + input_t[b, h, j, index_t[i, j]]
        input (B, H, Lq, K), input_t (B, H, Lk, Kt); index_t[i, j] is bucket_ids[j, i]
    rpe_reduce_qk(values, index, K, index_t, Kt) -> (out, out_t)
        out = rpe_reduce(values, index, K)
        out_t[b, h, j, t] = sum_i values[b, h, i, j] [index_t[i, j] = t]

On CPU, the ops run AVX-512 loops where the processor has AVX-512 and torch's
CPU capability is AVX512 (all four ops for float32, the two reductions also for
bfloat16 and float16), portable loops elsewhere; RPE_OPS_CPU_LOOPS or
`set_cpu_loops` forces a set, and `build_info()['cpu_loops']` says which runs and
why (csrc/cpu/loops.h). On CUDA they run Triton kernels (rpe_ops/triton_kernels.py,
registered in rpe_ops/cuda.py). Their CPU outputs of 2 MiB or more come from
`rpe_ops.block_cache`, which keeps freed blocks for the next tensor of about
their size and can serve every CPU tensor (`block_cache.install()`).

Each op is the other's backward (rpe_index / rpe_reduce, rpe_index_qk /
rpe_reduce_qk), and all are torch custom ops (schema in
csrc/rpe_index.cpp), so autograd and torch.compile(fullgraph=True) see them.
Without the compiled extension the same functions run on torch.gather /
scatter_add (`reference_rpe_index`, `reference_rpe_reduce`) after one warning.
"""
import warnings

import torch

from rpe_ops import block_cache  # its functions read rpe_ops._C, set below

try:
    from rpe_ops import _C
    _IMPORT_ERROR = None
except ImportError as error:  # not built: fall back to the reference path
    _C = None
    _IMPORT_ERROR = error

__all__ = ['rpe_index', 'rpe_reduce', 'rpe_index_qk', 'rpe_reduce_qk', 'reference_rpe_index',
           'reference_rpe_reduce', 'reference_rpe_index_qk', 'reference_rpe_reduce_qk', 'build_info',
           'set_cpu_loops', 'block_cache']


def build_info():
    """Which kernels this install has and which CPU loops run: {'cpu': bool, 'cuda': bool (the CUDA implementation,
    Triton's kernels, is installed: the extension loaded and triton imports; running it needs a GPU too),
    'cpu_loops': {'loops': 'portable' or 'avx512' (every op's), 'reason': 'by CPU feature: ...' or
    'forced by ...', 'available': the sets this CPU runs} (None without the compiled extension),
    'torch': version, 'import_error': why the extension did not load, or None}."""
    return {
        'cpu': _C is not None,
        'cuda': _C is not None and _cuda.triton_problem() is None,
        'cpu_loops': _C.cpu_loops() if _C is not None else None,
        'torch': torch.__version__,
        'import_error': None if _IMPORT_ERROR is None else str(_IMPORT_ERROR),
    }


def set_cpu_loops(loops):
    """Force the CPU loops of every op for this process: 'portable' or 'avx512', or 'auto' to go back to
    choosing by CPU feature. Returns the previous setting. RPE_OPS_CPU_LOOPS sets the same at start-up."""
    if _C is None:
        raise RuntimeError(f'rpe_ops.set_cpu_loops: the compiled extension is not available ({_IMPORT_ERROR}); '
                           f'build it with `pip install --no-build-isolation -e .`')
    return _C.set_cpu_loops(loops)


def rpe_index(input, index):
    """Y[b, h, i, j] = input[b, h, i, index[i, j]].

    input: (B, H, Lq, K) float64/32/16 or bfloat16, any strides.
    index: (Lq, Lk) int32 bucket ids in [0, K), on input's device.
    Returns (B, H, Lq, Lk). Differentiable in input; its gradient is
    rpe_reduce(grad, index, K).
    """
    _check_args('rpe_index', 'input', input, index, 'K')
    if _C is None:
        _warn_fallback()
        return reference_rpe_index(input, index)
    return torch.ops.rpe_ops.rpe_index.default(input, index)


def rpe_reduce(values, index, num_buckets):
    """out[b, h, i, t] = sum over j with index[i, j] == t of values[b, h, i, j].

    values: (B, H, Lq, Lk) float64/32/16 or bfloat16, any strides.
    index: (Lq, Lk) int32 bucket ids in [0, num_buckets), on values' device.
    Returns (B, H, Lq, num_buckets); half types are summed in float32.
    Differentiable in values; its gradient is rpe_index(grad, index).
    """
    _check_reduce_args('rpe_reduce', values, index, num_buckets)
    if _C is None:
        _warn_fallback()
        return reference_rpe_reduce(values, index, num_buckets)
    return torch.ops.rpe_ops.rpe_reduce.default(values, index, num_buckets)


def rpe_index_qk(input, index, input_t, index_t):
    """Y[b, h, i, j] = input[b, h, i, index[i, j]] + input_t[b, h, j, index_t[i, j]].

    input: (B, H, Lq, K) and input_t: (B, H, Lk, Kt), same dtype (as rpe_index's input).
    index, index_t: (Lq, Lk) int32, ids in [0, K) and [0, Kt); for the iRPE-on-queries term of
    self-attention index_t is the transposed bucket ids (irpe.key_major_ids(bucket_ids, 0)).
    Returns (B, H, Lq, Lk), equal to rpe_index(input, index) + the key-side gather, in one pass.
    Differentiable in input and input_t; the gradient is rpe_reduce_qk(grad, index, K, index_t, Kt).
    """
    _check_args('rpe_index_qk', 'input', input, index, 'K')
    if (not isinstance(input_t, torch.Tensor) or not isinstance(index_t, torch.Tensor) or input_t.dim() != 4
            or input_t.shape[:3] != (*input.shape[:2], index.shape[1]) or index_t.shape != index.shape):
        raise ValueError(f'rpe_ops.rpe_index_qk: expected input_t of shape (B, H, Lk, Kt) = '
                         f'({input.shape[0]}, {input.shape[1]}, {index.shape[1]}, Kt) and index_t of shape '
                         f'{tuple(index.shape)} (like index), got {tuple(input_t.shape)} and '
                         f'{tuple(index_t.shape)}. Pass the per-key table and the transposed bucket ids.')
    _check_args('rpe_index_qk', 'input_t', input_t, index_t.t(), 'Kt')  # dtypes and devices
    if input_t.dtype != input.dtype:
        raise TypeError(f'rpe_ops.rpe_index_qk: input is {input.dtype} but input_t is {input_t.dtype}; '
                        f'convert one of them.')
    if _C is None:
        _warn_fallback()
        return reference_rpe_index_qk(input, index, input_t, index_t)
    return torch.ops.rpe_ops.rpe_index_qk.default(input, index, input_t, index_t)


def rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t):
    """(rpe_reduce(values, index, num_buckets), out_t) with
    out_t[b, h, j, t] = sum over i with index_t[i, j] == t of values[b, h, i, j], in one pass.

    values: (B, H, Lq, Lk); index, index_t: (Lq, Lk) int32. Returns (B, H, Lq, num_buckets) and
    (B, H, Lk, num_buckets_t); half types are summed in float32. Differentiable in values.
    """
    _check_reduce_args('rpe_reduce_qk', values, index, num_buckets)
    _check_reduce_args('rpe_reduce_qk', values, index_t, num_buckets_t)
    if _C is None:
        _warn_fallback()
        return reference_rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t)
    return torch.ops.rpe_ops.rpe_reduce_qk.default(values, index, num_buckets, index_t, num_buckets_t)


def reference_rpe_index(input, index):
    """rpe_index on torch.gather: the fallback, and what the compiled op must equal."""
    B, H, Lq, _ = input.shape
    return input.gather(3, index.long().expand(B, H, Lq, index.shape[1]))


def reference_rpe_reduce(values, index, num_buckets):
    """rpe_reduce on torch.scatter_add: the fallback, and what the compiled op must equal."""
    B, H, Lq, Lk = values.shape
    acc_dtype = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    out = values.new_zeros(B, H, Lq, num_buckets, dtype=acc_dtype)
    out = out.scatter_add(3, index.long().expand(B, H, Lq, Lk), values.to(acc_dtype))
    return out.to(values.dtype)


def reference_rpe_index_qk(input, index, input_t, index_t):
    """rpe_index_qk on torch.gather: the fallback, and what the compiled op must equal."""
    return reference_rpe_index(input, index) + reference_rpe_index(input_t, index_t.t()).transpose(2, 3)


def reference_rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t):
    """rpe_reduce_qk on torch.scatter_add: the fallback, and what the compiled op must equal."""
    return (reference_rpe_reduce(values, index, num_buckets),
            reference_rpe_reduce(values.transpose(2, 3), index_t.t(), num_buckets_t))


def _check_reduce_args(op, values, index, num_buckets):
    _check_args(op, 'values', values, index, 'Lk')
    if index.shape[1] != values.shape[3]:
        raise ValueError(
            f'rpe_ops.{op}: index has shape {tuple(index.shape)}, so values must have '
            f'Lk = {index.shape[1]} in its last dim, but values has shape {tuple(values.shape)}. '
            f'Pass the (Lq, Lk) bucket ids that belong to these values.')
    if not isinstance(num_buckets, (int, torch.SymInt)) or num_buckets < 1:
        raise ValueError(f'rpe_ops.{op}: num_buckets must be a positive int (the K of the '
                         f'lookup table), got {num_buckets!r}')


def _check_args(op, name, x, index, last_dim):
    """Errors that say what was given, what was expected and what to do."""
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError(f'rpe_ops.{op}: expected tensors, got {type(x).__name__} and {type(index).__name__}')
    if x.dim() != 4:
        raise ValueError(f'rpe_ops.{op}: {name} must be 4-D (B, H, Lq, {last_dim}), got shape '
                         f'{tuple(x.shape)}. Add the missing batch/head dims with unsqueeze or view.')
    if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f'rpe_ops.{op}: {name} must be float64, float32, float16 or bfloat16, '
                        f'got {x.dtype}. Convert it with {name}.float().')
    if index.dtype != torch.int32:
        raise TypeError(f'rpe_ops.{op}: index must be int32, got {index.dtype}. Pass '
                        f'index.to(torch.int32) (convert the bucket ids once, not every step).')
    if index.dim() != 2 or index.shape[0] != x.shape[2]:
        raise ValueError(f'rpe_ops.{op}: index must have shape (Lq, Lk) = ({x.shape[2]}, Lk) to match '
                         f'{name} of shape {tuple(x.shape)}, got {tuple(index.shape)}. Use the bucket '
                         f'ids built for this feature-map size.')
    if index.device != x.device:
        raise ValueError(f'rpe_ops.{op}: index is on {index.device} but {name} is on {x.device}. '
                         f'Move it with index.to({name}.device) (once, e.g. as a buffer).')


_warned_fallback = False


def _warn_fallback():
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f'rpe_ops: the compiled extension rpe_ops._C is not available ({_IMPORT_ERROR}); using '
            f'the slower torch.gather/scatter_add path. Build it with '
            f'`pip install --no-build-isolation -e .` in the detr-irpe checkout (or `make test`).',
            RuntimeWarning, stacklevel=3)


# Autograd and fake (meta) kernels of the C++ ops, so that autograd and
# torch.compile trace through them. Each op's backward is the other op.
if _C is not None:
    @torch.library.register_fake('rpe_ops::rpe_index')
    def _rpe_index_fake(input, index):
        B, H, Lq, _ = input.shape
        return input.new_empty(B, H, Lq, index.shape[1])

    @torch.library.register_fake('rpe_ops::rpe_reduce')
    def _rpe_reduce_fake(values, index, num_buckets):
        B, H, Lq, _ = values.shape
        return values.new_empty(B, H, Lq, num_buckets)

    def _rpe_index_setup_context(ctx, inputs, output):
        input, index = inputs
        ctx.save_for_backward(index)
        ctx.num_buckets = input.shape[3]

    def _rpe_index_backward(ctx, grad):
        index, = ctx.saved_tensors
        return torch.ops.rpe_ops.rpe_reduce.default(grad, index, ctx.num_buckets), None

    def _rpe_reduce_setup_context(ctx, inputs, output):
        _, index, _ = inputs
        ctx.save_for_backward(index)

    def _rpe_reduce_backward(ctx, grad):
        index, = ctx.saved_tensors
        return torch.ops.rpe_ops.rpe_index.default(grad, index), None, None

    @torch.library.register_fake('rpe_ops::rpe_index_qk')
    def _rpe_index_qk_fake(input, index, input_t, index_t):
        B, H, Lq, _ = input.shape
        return input.new_empty(B, H, Lq, index.shape[1])

    @torch.library.register_fake('rpe_ops::rpe_reduce_qk')
    def _rpe_reduce_qk_fake(values, index, num_buckets, index_t, num_buckets_t):
        B, H, Lq, Lk = values.shape
        return values.new_empty(B, H, Lq, num_buckets), values.new_empty(B, H, Lk, num_buckets_t)

    def _rpe_index_qk_setup_context(ctx, inputs, output):
        input, index, input_t, index_t = inputs
        ctx.save_for_backward(index, index_t)
        ctx.num_buckets, ctx.num_buckets_t = input.shape[3], input_t.shape[3]

    def _rpe_index_qk_backward(ctx, grad):
        index, index_t = ctx.saved_tensors
        grad_input, grad_input_t = torch.ops.rpe_ops.rpe_reduce_qk.default(
            grad, index, ctx.num_buckets, index_t, ctx.num_buckets_t)
        return grad_input, None, grad_input_t, None

    def _rpe_reduce_qk_setup_context(ctx, inputs, output):
        _, index, _, index_t, _ = inputs
        ctx.save_for_backward(index, index_t)

    def _rpe_reduce_qk_backward(ctx, grad_out, grad_out_t):
        index, index_t = ctx.saved_tensors
        return torch.ops.rpe_ops.rpe_index_qk.default(grad_out, index, grad_out_t, index_t), None, None, None, None

    torch.library.register_autograd('rpe_ops::rpe_index_qk', _rpe_index_qk_backward,
                                    setup_context=_rpe_index_qk_setup_context)
    torch.library.register_autograd('rpe_ops::rpe_reduce_qk', _rpe_reduce_qk_backward,
                                    setup_context=_rpe_reduce_qk_setup_context)
    torch.library.register_autograd('rpe_ops::rpe_index', _rpe_index_backward,
                                    setup_context=_rpe_index_setup_context)
    torch.library.register_autograd('rpe_ops::rpe_reduce', _rpe_reduce_backward,
                                    setup_context=_rpe_reduce_setup_context)

    from rpe_ops import cuda as _cuda  # noqa: E402  the CUDA kernels (Triton): rpe_ops/cuda.py
