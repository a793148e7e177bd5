"""The two index ops of image relative position encoding (iRPE), compiled.

iRPE gives every (query i, key j) pair a bucket id index[i, j] in [0, K)
(`bucket_ids` in detr_irpe). Attention then needs

    rpe_index(input, index)               Y[b, h, i, j] = input[b, h, i, index[i, j]]
        (B, H, Lq, K) -> (B, H, Lq, Lk)   e.g. q_i . r_{index[i,j]} from q @ lookup_table_weight.T
    rpe_reduce(values, index, K)          out[b, h, i, t] = sum_j values[b, h, i, j] [index[i, j] = t]
        (B, H, Lq, Lk) -> (B, H, Lq, K)   e.g. attention weights summed per bucket (iRPE on values)

Each is the other's backward, and both are torch custom ops (schema in
csrc/rpe_index.cpp), so autograd and torch.compile(fullgraph=True) see them.
Without the compiled extension the same functions run on torch.gather /
scatter_add (`reference_rpe_index`, `reference_rpe_reduce`) after one warning.
"""
import warnings

import torch

try:
    from rpe_ops import _C
    _IMPORT_ERROR = None
except ImportError as error:  # not built: fall back to the reference path
    _C = None
    _IMPORT_ERROR = error

__all__ = ['rpe_index', 'rpe_reduce', 'reference_rpe_index', 'reference_rpe_reduce', 'build_info']


def build_info():
    """Which compiled kernels this install has: {'cpu': bool, 'cuda': bool, ...}."""
    return {
        'cpu': _C is not None,
        'cuda': _C is not None and _C.compiled_with_cuda(),
        'torch': torch.__version__,
        'import_error': None if _IMPORT_ERROR is None else str(_IMPORT_ERROR),
    }


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
    _check_args('rpe_reduce', 'values', values, index, 'Lk')
    if index.shape[1] != values.shape[3]:
        raise ValueError(
            f'rpe_ops.rpe_reduce: index has shape {tuple(index.shape)}, so values must have '
            f'Lk = {index.shape[1]} in its last dim, but values has shape {tuple(values.shape)}. '
            f'Pass the (Lq, Lk) bucket ids that belong to these values.')
    if not isinstance(num_buckets, (int, torch.SymInt)) or num_buckets < 1:
        raise ValueError(f'rpe_ops.rpe_reduce: num_buckets must be a positive int (the K of the '
                         f'lookup table), got {num_buckets!r}')
    if _C is None:
        _warn_fallback()
        return reference_rpe_reduce(values, index, num_buckets)
    return torch.ops.rpe_ops.rpe_reduce.default(values, index, num_buckets)


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

    torch.library.register_autograd('rpe_ops::rpe_index', _rpe_index_backward,
                                    setup_context=_rpe_index_setup_context)
    torch.library.register_autograd('rpe_ops::rpe_reduce', _rpe_reduce_backward,
                                    setup_context=_rpe_reduce_setup_context)
