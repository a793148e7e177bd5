"""Triton kernels of the four rpe_ops (definitions in rpe_ops/__init__.py), the CUDA implementation
that rpe_ops/cuda.py registers. They run on CUDA tensors, or on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how the suite tests them.

rpe_index / rpe_index_qk: one program per (BLOCK_I, BLOCK_J) tile of the (Lq, Lk) pairs loads the tile's
    bucket ids once and gathers that tile for a share of the B*H (b, h) pairs.
rpe_reduce: out[bh, p, t] = sum_r values[bh, p, r] [index[p, r] == t] is, for one row p, the matrix
    product onehot(index[p, :])^T (K, R) @ values[:, p, :]^T (R, B*H): one program per (row p, BLOCK_K
    buckets, BLOCK_BH (b, h) pairs) runs it as a 2-D tl.dot over all of R, the buckets on the dot's M side,
    accumulating in float32 (tensor cores; float32 values as tf32x3), and writes its output block once: no
    atomics, and each id is read once for BLOCK_BH (b, h) pairs. The key side of rpe_reduce_qk is the same
    kernel on the transposed view (p = key j, r = query i), with shorter steps in r and longer in t.
    Block sizes are the fastest of a sweep on an H200 (docs/rpe_ops.md, docs/gpu_runs/2026-12-04/).
    When K is so large that re-reading values once per BLOCK_K buckets costs more than atomics (the
    flattened key-major layout of iRPE on queries alone, K = L * buckets), a scatter with float32
    atomics runs instead; there the ids of a row are spread, so the atomics rarely collide. float64
    (gradcheck) takes the scatter too, with float64 atomics: tl.dot's float64 support varies by GPU. The
    atomics' order varies, so under torch.use_deterministic_algorithms(True) the scatter is an error (a
    warning with warn_only), as torch's own such ops. In the one-hot product an inf or nan value makes its
    whole row of buckets nan (0 x inf), where the CPU op keeps it in its bucket: a float16 step that
    overflows is skipped by the GradScaler either way.
Shapes and bucket ids are checked on the host (rpe_ops/cuda.py) before these run: no device asserts.
"""
import json
import os
import subprocess
import sys
import warnings

import torch
import triton
import triton.language as tl

import rpe_ops

INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
# Above this many buckets the reductions scatter with atomics instead of one-hot products (see above).
ONE_HOT_MAX_BUCKETS = 512
_HALF = (torch.float16, torch.bfloat16)
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _index_kernel(in_ptr, idx_ptr, in_t_ptr, idx_t_ptr, out_ptr, BH, H, Lq, Lk,
                  s_in_b, s_in_h, s_in_i, s_in_k, s_t_b, s_t_h, s_t_j, s_t_k,
                  s_idx_i, s_idx_j, s_idxt_i, s_idxt_j, s_out_b, s_out_h, s_out_i, s_out_j,
                  KEYS: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[b, h, i, j] = in[b, h, i, idx[i, j]] (+ in_t[b, h, j, idx_t[i, j]] if KEYS)."""
    j = (tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)[None, :]
    i = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)[:, None]
    mask = (i < Lq) & (j < Lk)
    t = tl.load(idx_ptr + i * s_idx_i + j * s_idx_j, mask=mask, other=0).to(tl.int64)
    if KEYS:
        u = tl.load(idx_t_ptr + i * s_idxt_i + j * s_idxt_j, mask=mask, other=0).to(tl.int64)
    for bh in range(tl.program_id(2), BH, tl.num_programs(2)):
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        y = tl.load(in_ptr + b * s_in_b + h * s_in_h + i * s_in_i + t * s_in_k, mask=mask)
        if KEYS:  # one rounding of the sum, as the CPU op
            y = y.to(ACC) + tl.load(in_t_ptr + b * s_t_b + h * s_t_h + j * s_t_j + u * s_t_k, mask=mask).to(ACC)
        tl.store(out_ptr + b * s_out_b + h * s_out_h + i * s_out_i + j * s_out_j,
                 y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(v_ptr, idx_ptr, out_ptr, BH, H, R, K, s_v_b, s_v_h, s_v_p, s_v_r, s_idx_p, s_idx_r,
                   s_out_b, s_out_h, s_out_p, s_out_k, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_BH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, h, p, t] = sum_r v[b, h, p, r] [idx[p, r] == t]: per row p, onehot(idx[p, :])^T @ v[:, p, :]^T."""
    p = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    bh = tl.program_id(2) * BLOCK_BH + tl.arange(0, BLOCK_BH)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    row = p * s_v_p + b * s_v_b + h * s_v_h  # (BH,)
    acc = tl.zeros((BLOCK_K, BLOCK_BH), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        ids = tl.load(idx_ptr + p * s_idx_p + r * s_idx_r, mask=r < R, other=-1)
        onehot = t[:, None] == ids[None, :]  # (K, R)
        v = tl.load(v_ptr + row[None, :] + r[:, None] * s_v_r, mask=(r < R)[:, None] & (bh < BH)[None, :],
                    other=0)  # (R, BH)
        # 0/1 times a value is exact and tensor cores sum in float32; float32 values go in as two TF32 parts
        # (tf32x3: 21 of float32's 24 bits; 'ieee' ran 1.7x slower on an H200, docs/rpe_ops.md)
        acc = tl.dot(onehot.to(DOT), v.to(DOT), acc, input_precision=PRECISION)
    out = out_ptr + p * s_out_p + (b * s_out_b + h * s_out_h)[None, :] + t[:, None] * s_out_k
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(t < K)[:, None] & (bh < BH)[None, :])


@triton.jit
def _scatter_kernel(v_ptr, idx_ptr, out_ptr, BH, H, P, R,
                    s_v_b, s_v_h, s_v_p, s_v_r, s_idx_p, s_idx_r, s_out_b, s_out_h, s_out_p, s_out_k,
                    BLOCK_R: tl.constexpr):
    """out[b, h, p, idx[p, r]] += v[b, h, p, r] with atomics; out is float32 (float64 for float64 v)."""
    p = tl.program_id(0).to(tl.int64)
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask = r < R
    t = tl.load(idx_ptr + p * s_idx_p + r * s_idx_r, mask=mask, other=0).to(tl.int64)
    for bh in range(tl.program_id(2), BH, tl.num_programs(2)):
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        v = tl.load(v_ptr + b * s_v_b + h * s_v_h + p * s_v_p + r * s_v_r, mask=mask, other=0)
        tl.atomic_add(out_ptr + b * s_out_b + h * s_out_h + p * s_out_p + t * s_out_k,
                      v.to(out_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bh_programs(BH, tiles):
    """How many programs share the B*H loop of one tile: enough programs to fill a GPU, ids read few times."""
    return max(1, min(BH, triton.cdiv(1024, max(tiles, 1))))


def rpe_index(input, index):
    return _index(input, index)


def rpe_index_qk(input, index, input_t, index_t):
    return _index(input, index, input_t, index_t)


def rpe_reduce(values, index, num_buckets):
    return _reduce(values, index, num_buckets)


def rpe_reduce_qk(values, index, num_buckets, index_t, num_buckets_t):
    # The key side is the same reduction on the transposed view: out_t[b, h, j, t] sums over queries i.
    return (_reduce(values, index, num_buckets),
            _reduce(values.transpose(2, 3), index_t.t(), num_buckets_t))


def _index(input, index, input_t=None, index_t=None):
    B, H, Lq, _ = input.shape
    Lk = index.shape[1]
    out = input.new_empty(B, H, Lq, Lk)
    if out.numel() == 0:
        return out
    keys = input_t is not None
    if not keys:
        input_t, index_t = input, index  # unused by the kernel
    BLOCK_I = min(8, triton.next_power_of_2(Lq))  # Lq = 1 in iRPE on queries' key-major layout
    BLOCK_J = 1024 // BLOCK_I  # 8 x 128: 1.4x faster than 16 x 64 at DC5 on an H200
    # The longest dim on grid axis 0, which alone may exceed 65535 programs.
    grid_ji = (triton.cdiv(Lk, BLOCK_J), triton.cdiv(Lq, BLOCK_I))
    grid = (*grid_ji, _bh_programs(B * H, grid_ji[0] * grid_ji[1]))
    _index_kernel[grid](input, index, input_t, index_t, out, B * H, H, Lq, Lk, *input.stride(),
                        *input_t.stride(), *index.stride(), *index_t.stride(), *out.stride(),
                        KEYS=keys, ACC=_acc_dtype(input.dtype), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
                        num_warps=4)
    return out


def _reduce(values, index, num_buckets):
    """out[b, h, p, t] = sum_r values[b, h, p, r] [index[p, r] == t] for any strides of values and index."""
    B, H, P, R = values.shape
    BH, dtype = B * H, values.dtype
    if num_buckets > ONE_HOT_MAX_BUCKETS or dtype == torch.float64:  # float64 (gradcheck): see the docstring
        _alert_not_deterministic(f'rpe_ops.rpe_reduce on CUDA over {num_buckets} buckets in {dtype} (above '
                                 f'{ONE_HOT_MAX_BUCKETS} buckets, as iRPE on queries alone, or float64)')
        acc = torch.zeros(B, H, P, num_buckets, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=values.device)
        if acc.numel() == 0 or R == 0:
            return acc.to(dtype)
        BLOCK_R = 256
        grid = (P, triton.cdiv(R, BLOCK_R))  # P (up to Lq) on axis 0, which alone may exceed 65535 programs
        _scatter_kernel[(*grid, _bh_programs(BH, grid[0] * grid[1]))](
            values, index, acc, BH, H, P, R, *values.stride(), *index.stride(), *acc.stride(), BLOCK_R=BLOCK_R)
        return acc.to(dtype)
    out = values.new_empty(B, H, P, num_buckets)
    if out.numel() == 0:
        return out
    if R == 0:
        return out.zero_()
    dot = _TRITON_DTYPES[dtype]
    if INTERPRETING and dtype in _HALF:
        dot = tl.float32  # the interpreter's tl.dot (numpy) has no bfloat16; as exact for 0/1 products
    BLOCK_BH = min(64, max(16, triton.next_power_of_2(BH)))  # tl.dot needs dims >= 16
    # Query side (r contiguous): long steps in r; key side (r strided by L): short steps in r, all of K at once.
    BLOCK_R, BLOCK_K, stages = (128, 64, 3) if values.stride(3) == 1 else (32, 128, 4)
    grid = (P, triton.cdiv(num_buckets, BLOCK_K), triton.cdiv(BH, BLOCK_BH))
    _reduce_kernel[grid](values, index, out, BH, H, R, num_buckets, *values.stride(), *index.stride(),
                         *out.stride(), DOT=dot, PRECISION='tf32x3' if dtype == torch.float32 else 'ieee',
                         BLOCK_BH=BLOCK_BH, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4, num_stages=stages)
    return out


def _alert_not_deterministic(what):
    """As torch's own ops do under torch.use_deterministic_algorithms(True): an error, or a warning with warn_only."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f'{what} sums with atomics, in an order that varies from run to run, but '
               'torch.use_deterministic_algorithms(True) is set: call torch.use_deterministic_algorithms(True, '
               'warn_only=True) to accept it')
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message)
    else:
        raise RuntimeError(message)


def check_against_cpu(device='cpu'):
    """The four ops through their registered kernel on `device` (forward, and backward by autograd) against the
    CPU op and the reference_* functions in float64, over iRPE and random bucket ids, float32 / bfloat16 /
    float16 (and float64 once), contiguous and strided inputs, K past one tile, Lq != Lk.

    Returns {case: {'max_error': largest difference to either, 'bound_ratio': largest difference / its bound}};
    a case passes when bound_ratio <= 1. On CPU the Triton kernels run under the interpreter: in a subprocess
    with TRITON_INTERPRET=1 unless this process imported them so, with the CPU op's dispatch routed to
    rpe_ops/cuda.py's kernels for the duration.
    """
    device = torch.device(device)
    if device.type == 'cpu' and not INTERPRETING:
        return interpreted('import rpe_ops.triton_kernels as t', 't.check_against_cpu("cpu")')
    from rpe_ops import cuda
    return _check_cases(device, lambda: _routed_to(cuda.IMPLEMENTATIONS) if device.type == 'cpu' else None)


def interpreted(imports, expression):
    """The JSON value of `expression` evaluated after `imports` in a new Python with TRITON_INTERPRET=1 from the
    start (triton.jit reads it when it decorates a kernel) and this checkout on the path: how CPU tensors run
    Triton kernels without the rest of this process running interpreted."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(rpe_ops.__file__)))
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    script = f'import json; {imports}; print(json.dumps({expression}))'
    run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        hint = ''
        if 'only 0-dimensional arrays can be converted' in run.stderr:  # Triton 3.6's interpreter, NumPy >= 2.4
            hint = (f' (Triton {triton.__version__}\'s interpreter calls int() on one-element arrays, which NumPy 2.4 '
                    'and later refuse: install numpy<2.4 beside it, or a newer Triton: 3.8 has the fix)')
        raise RuntimeError(f'{expression} under the Triton interpreter failed{hint}:\n{run.stderr[-4000:]}')
    return json.loads(run.stdout.splitlines()[-1])


class _routed_to:
    """Within `with`, CPU calls of the ops run the given kernels (the CUDA implementation, interpreted)."""

    def __init__(self, implementations):
        self.implementations = implementations

    def __enter__(self):
        self.library = torch.library.Library('rpe_ops', 'IMPL')
        for op, kernel in self.implementations.items():
            self.library.impl(op, kernel, 'CPU')

    def __exit__(self, *exc):
        self.library._destroy()  # the compiled CPU kernels are active again


def _id_sets():
    """(name, index, K, index_t, Kt): iRPE's bucket ids of a 5 x 7 map and their transpose (as iRPE on queries
    and keys uses them), random ids with Lq != Lk and K past one and several 64-bucket tiles, one bucket, and the
    key-major flat layout of iRPE on queries alone (Lq = 1, K = L * buckets: the scatter path)."""
    from detr_irpe import irpe
    g = torch.Generator().manual_seed(0)
    ids, K = irpe.get_bucket_ids_2d('product', 5, 7)
    small, Ks = irpe.get_bucket_ids_2d('product', 4, 6)
    flat = irpe.key_major_ids(small, Ks).view(1, -1)
    return [('irpe', ids, K, irpe.key_major_ids(ids, 0), K),
            ('random_k81', torch.randint(0, 81, (20, 67), generator=g, dtype=torch.int32), 81,
             torch.randint(0, 33, (20, 67), generator=g, dtype=torch.int32), 33),
            ('random_k300', torch.randint(0, 300, (9, 24), generator=g, dtype=torch.int32), 300,
             torch.randint(0, 130, (9, 24), generator=g, dtype=torch.int32), 130),
            ('single_bucket', torch.zeros(4, 5, dtype=torch.int32), 1, torch.zeros(4, 5, dtype=torch.int32), 1),
            ('flat', flat, small.shape[0] * Ks, None, None)]


# Which dtypes and layouts each id set runs in (the interpreter takes about a second per reduction case).
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
_LAYOUTS = {'irpe': [(_F32, False), (_F32, True), (_BF16, False), (_F16, False), (_F64, False)],
            'random_k81': [(_F32, False), (_BF16, True), (_F16, False)],
            'random_k300': [(_F32, False), (_BF16, False)],
            'single_bucket': [(_F32, False)],
            'flat': [(_F32, True), (_BF16, False), (_F16, False)]}


def _check_cases(device, routing):
    from contextlib import nullcontext
    B, H = 2, 2
    g = torch.Generator().manual_seed(1)
    results = {}

    def table(*shape, dtype, strided):  # strided: a non-contiguous view of the same shape
        if not strided:
            return torch.randn(*shape, generator=g).to(dtype)
        return torch.randn(shape[0], shape[3], shape[1], shape[2], generator=g).to(dtype).permute(0, 2, 3, 1)

    for name, index, K, index_t, Kt in _id_sets():
        Lq, Lk = index.shape
        for dtype, strided in _LAYOUTS[name]:
            idx = index.t().contiguous().t() if strided else index  # column-major ids too
            calls = {'rpe_index': ((table(B, H, Lq, K, dtype=dtype, strided=strided), idx), ()),
                     'rpe_reduce': ((table(B, H, Lq, Lk, dtype=dtype, strided=strided), idx), (K,))}
            if index_t is not None:
                calls['rpe_index_qk'] = ((table(B, H, Lq, K, dtype=dtype, strided=strided), idx,
                                          table(B, H, Lk, Kt, dtype=dtype, strided=strided), index_t), ())
                calls['rpe_reduce_qk'] = ((table(B, H, Lq, Lk, dtype=dtype, strided=strided), idx), (K, index_t, Kt))
            for op, (tensors, rest) in calls.items():
                case = f'{op}/{name}/{str(dtype).split(".")[1]}/{"strided" if strided else "contiguous"}'
                results[case] = _compare(op, tensors, rest, device, routing() or nullcontext())
    return results


def _compare(op, tensors, rest, device, routing):
    """Forward and input gradients of op on device vs the CPU op and the float64 reference."""
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[0].dtype
    outs = _outputs(getattr(torch.ops.rpe_ops, op).default, tensors, rest, 'cpu', dtype)
    cpu = [o.clone() for o in outs[1]]
    with routing:
        under_test = _outputs(getattr(torch.ops.rpe_ops, op).default, tensors, rest, device, dtype)[1]
    reference = getattr(rpe_ops, 'reference_' + op)
    exact = _outputs(reference, tensors, rest, 'cpu', torch.float64)[1]
    magnitude = _outputs(reference, tensors, rest, 'cpu', torch.float64, absolute=True)[1]
    # A sum of n terms accumulated in float32 (float64 for float64) is within n * eps * sum|terms| of the
    # exact sum whatever the order, so two such sums differ by twice that; half outputs add one rounding.
    n = max(tensors[1].shape)
    eps_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    worst, ratio = 0.0, 0.0
    for got, want_cpu, want, size in zip(under_test, cpu, exact, magnitude):
        bound = 2 * n * eps_acc * size + torch.finfo(dtype).eps * want.abs()
        for other in (want_cpu.double(), want):
            error = (got.cpu().double() - other).abs()
            worst = max(worst, error.max().item())
            ratio = max(ratio, (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item())
    return {'max_error': worst, 'bound_ratio': ratio}


def _outputs(function, tensors, rest, device, dtype, absolute=False):
    """(inputs, forward outputs + gradients of the float inputs) of function on copies of tensors moved to
    device and cast to dtype; gradients against fixed random output gradients (their absolute values and
    absolute inputs with absolute=True, which gives the sums of |terms| that bound rounding)."""
    inputs = [(t.abs() if absolute else t).to(device=device, dtype=dtype).requires_grad_() if t.is_floating_point()
              else t.to(device) for t in tensors]
    args = inputs + [r.to(device) if isinstance(r, torch.Tensor) else r for r in rest]
    out = function(*args)
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    g = torch.Generator().manual_seed(2)  # the same output gradients, rounded to the inputs' dtype, for every run
    grads = [torch.randn(o.shape, generator=g).to(tensors[0].dtype).to(device=device, dtype=o.dtype) for o in out]
    grads = [x.abs() for x in grads] if absolute else grads
    floats = [x for x in inputs if x.is_floating_point()]
    return inputs, [o.detach() for o in out] + list(torch.autograd.grad(out, floats, grads))
