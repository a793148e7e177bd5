"""rpe_ops.rpe_index / rpe_reduce / rpe_index_qk / rpe_reduce_qk against their definitions, written here as loops.

    rpe_index:     Y[b, h, i, j]   = X[b, h, i, index[i, j]]
    rpe_reduce:    out[b, h, i, t] = sum_j V[b, h, i, j] [index[i, j] = t]
    rpe_index_qk:  Y[b, h, i, j]   = X[b, h, i, index[i, j]] + Z[b, h, j, index_t[i, j]]
    rpe_reduce_qk: out as rpe_reduce, out_t[b, h, j, t] = sum_i V[b, h, i, j] [index_t[i, j] = t]
    d rpe_index / dX  = rpe_reduce of the grad;  d rpe_reduce / dV = rpe_index of the grad (same for _qk)
"""
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import rpe_ops
from rpe_ops import block_cache

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (B, H, Lq, Lk, K): Lq != Lk both ways, a single bucket, a single position.
SIZES = [(2, 3, 5, 7, 4), (1, 2, 6, 3, 9), (2, 1, 4, 6, 1), (1, 1, 1, 1, 1), (3, 2, 1, 5, 3)]
LAYOUTS = ['contiguous', 'strided', 'transposed']
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
compiled = pytest.mark.skipif(not rpe_ops.build_info()['cpu'], reason='rpe_ops._C is not built')


# --- definitions, independent of the op -------------------------------------------------------

def index_by_loop(x, index):
    x, index = x.double().cpu().numpy(), index.cpu().numpy()
    B, H, Lq, _ = x.shape
    y = np.zeros((B, H, Lq, index.shape[1]))
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(index.shape[1]):
                    y[b, h, i, j] = x[b, h, i, index[i, j]]
    return torch.from_numpy(y)


def reduce_by_loop(v, index, K):
    v, index = v.double().cpu().numpy(), index.cpu().numpy()
    B, H, Lq, Lk = v.shape
    out = np.zeros((B, H, Lq, K))
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    out[b, h, i, index[i, j]] += v[b, h, i, j]
    return torch.from_numpy(out)


def index_qk_by_loop(x, index, z, index_t):
    x, z, index, index_t = x.double().cpu().numpy(), z.double().cpu().numpy(), index.cpu().numpy(), index_t.cpu().numpy()
    B, H, Lq, _ = x.shape
    y = np.zeros((B, H, Lq, index.shape[1]))
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(index.shape[1]):
                    y[b, h, i, j] = x[b, h, i, index[i, j]] + z[b, h, j, index_t[i, j]]
    return torch.from_numpy(y)


def reduce_qk_by_loop(v, index, K, index_t, Kt):
    v, index, index_t = v.double().cpu().numpy(), index.cpu().numpy(), index_t.cpu().numpy()
    B, H, Lq, Lk = v.shape
    out, out_t = np.zeros((B, H, Lq, K)), np.zeros((B, H, Lk, Kt))
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    out[b, h, i, index[i, j]] += v[b, h, i, j]
                    out_t[b, h, j, index_t[i, j]] += v[b, h, i, j]
    return torch.from_numpy(out), torch.from_numpy(out_t)


# --- inputs ------------------------------------------------------------------------------------

def bucket_ids(Lq, Lk, K, device='cpu', seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (Lq, Lk), generator=g, dtype=torch.int32).to(device)


def tensor(shape, dtype, layout='contiguous', device='cpu', seed=1):
    """Random values (the same for every layout), stored contiguously or not."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == 'strided':  # every other element of a wider buffer
        out = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2]
    elif layout == 'transposed':  # last two dims stored transposed
        out = torch.zeros(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).transpose(-1, -2)
    else:
        out = torch.zeros(shape, dtype=dtype, device=device)
    return out.copy_(values)


def assert_matches(actual, expected_float64):
    """Compare to the exact value rounded once to actual's dtype."""
    torch.testing.assert_close(actual.cpu(), expected_float64.to(actual.dtype))


# --- forward and backward against the definitions ---------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('size', SIZES, ids=str)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_rpe_index_gathers_bucket_of_each_key(dtype, size, layout, device):
    B, H, Lq, Lk, K = size
    x = tensor((B, H, Lq, K), dtype, layout, device).requires_grad_()
    index = bucket_ids(Lq, Lk, K, device)
    y = rpe_ops.rpe_index(x, index)
    assert y.shape == (B, H, Lq, Lk) and y.dtype == dtype
    assert torch.equal(y.detach().cpu().double(), index_by_loop(x.detach(), index))

    grad = tensor((B, H, Lq, Lk), dtype, layout, device, seed=2)
    y.backward(grad)
    assert_matches(x.grad, reduce_by_loop(grad, index, K))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('size', SIZES, ids=str)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_rpe_reduce_sums_keys_per_bucket(dtype, size, layout, device):
    B, H, Lq, Lk, K = size
    v = tensor((B, H, Lq, Lk), dtype, layout, device).requires_grad_()
    index = bucket_ids(Lq, Lk, K, device)
    out = rpe_ops.rpe_reduce(v, index, K)
    assert out.shape == (B, H, Lq, K) and out.dtype == dtype
    assert_matches(out, reduce_by_loop(v.detach(), index, K))

    grad = tensor((B, H, Lq, K), dtype, layout, device, seed=2)
    out.backward(grad)
    assert torch.equal(v.grad.cpu().double(), index_by_loop(grad, index))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('size', SIZES, ids=str)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_rpe_index_qk_adds_the_key_side_bucket_of_each_pair(dtype, size, layout, device):
    B, H, Lq, Lk, K = size
    Kt = K + 2  # the two tables may differ in size
    x = tensor((B, H, Lq, K), dtype, layout, device).requires_grad_()
    z = tensor((B, H, Lk, Kt), dtype, layout, device, seed=4).requires_grad_()
    index, index_t = bucket_ids(Lq, Lk, K, device), bucket_ids(Lq, Lk, Kt, device, seed=5)
    y = rpe_ops.rpe_index_qk(x, index, z, index_t)
    assert y.shape == (B, H, Lq, Lk) and y.dtype == dtype
    assert_matches(y, index_qk_by_loop(x.detach(), index, z.detach(), index_t))

    grad = tensor((B, H, Lq, Lk), dtype, layout, device, seed=2)
    y.backward(grad)
    want_x, want_z = reduce_qk_by_loop(grad, index, K, index_t, Kt)
    assert_matches(x.grad, want_x)
    assert_matches(z.grad, want_z)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('size', SIZES, ids=str)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_rpe_reduce_qk_sums_per_bucket_of_both_tables(dtype, size, layout, device):
    B, H, Lq, Lk, K = size
    Kt = K + 1
    v = tensor((B, H, Lq, Lk), dtype, layout, device).requires_grad_()
    index, index_t = bucket_ids(Lq, Lk, K, device), bucket_ids(Lq, Lk, Kt, device, seed=5)
    out, out_t = rpe_ops.rpe_reduce_qk(v, index, K, index_t, Kt)
    assert out.shape == (B, H, Lq, K) and out_t.shape == (B, H, Lk, Kt) and out.dtype == out_t.dtype == dtype
    want, want_t = reduce_qk_by_loop(v.detach(), index, K, index_t, Kt)
    assert_matches(out, want)
    assert_matches(out_t, want_t)

    grad, grad_t = tensor((B, H, Lq, K), dtype, layout, device, seed=2), tensor((B, H, Lk, Kt), dtype, device=device, seed=3)
    torch.autograd.backward([out, out_t], [grad, grad_t])
    assert_matches(v.grad, index_qk_by_loop(grad, index, grad_t, index_t))


@pytest.mark.parametrize('device', DEVICES)
def test_rpe_reduce_qk_of_half_sums_in_float32(device):
    v = torch.ones(1, 1, 4096, 1, dtype=torch.float16, device=device)
    index = torch.zeros(4096, 1, dtype=torch.int32, device=device)
    out, out_t = rpe_ops.rpe_reduce_qk(v, index, 1, index, 2)
    assert out_t.tolist() == [[[[4096.0, 0.0]]]] and out.sum().item() == 4096


@pytest.mark.parametrize('device', DEVICES)
def test_rpe_reduce_of_half_sums_in_float32(device):
    # 4096 ones into one bucket: float16 accumulation would stall at 2048.
    v = torch.ones(1, 1, 1, 4096, dtype=torch.float16, device=device)
    index = torch.zeros(1, 4096, dtype=torch.int32, device=device)
    assert rpe_ops.rpe_reduce(v, index, 2).tolist() == [[[[4096.0, 0.0]]]]


@pytest.mark.parametrize('device', DEVICES)
def test_rpe_reduce_with_more_buckets_than_one_shared_memory_tile(device):
    # The CUDA reduce holds 12288 float buckets per tile; 20000 needs two.
    Lq, Lk, K = 3, 4000, 20000
    v = tensor((1, 2, Lq, Lk), torch.float32, device=device)
    index = bucket_ids(Lq, Lk, K, device)
    expected = torch.zeros(1, 2, Lq, K, dtype=torch.float64)
    expected.scatter_add_(3, index.cpu().long().expand(1, 2, Lq, Lk), v.cpu().double())
    assert_matches(rpe_ops.rpe_reduce(v, index, K), expected)


@compiled
@pytest.mark.parametrize('device', DEVICES)
def test_gradients_pass_gradcheck_in_float64(device):
    index = bucket_ids(4, 5, 3, device)
    x = tensor((2, 2, 4, 3), torch.float64, 'strided', device).requires_grad_()
    v = tensor((2, 2, 4, 5), torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: rpe_ops.rpe_index(x, index), (x,))
    assert torch.autograd.gradcheck(lambda v: rpe_ops.rpe_reduce(v, index, 3), (v,))
    assert torch.autograd.gradgradcheck(lambda x: rpe_ops.rpe_index(x, index), (x,))
    assert torch.autograd.gradgradcheck(lambda v: rpe_ops.rpe_reduce(v, index, 3), (v,))
    index_t = bucket_ids(4, 5, 6, device, seed=5)
    z = tensor((2, 2, 5, 6), torch.float64, 'transposed', device, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, z: rpe_ops.rpe_index_qk(x, index, z, index_t), (x, z))
    assert torch.autograd.gradcheck(lambda v: rpe_ops.rpe_reduce_qk(v, index, 3, index_t, 6), (v,))
    assert torch.autograd.gradgradcheck(lambda x, z: rpe_ops.rpe_index_qk(x, index, z, index_t), (x, z))
    assert torch.autograd.gradgradcheck(lambda v: rpe_ops.rpe_reduce_qk(v, index, 3, index_t, 6), (v,))


@compiled
def test_custom_op_registration_passes_opcheck():
    # Schema, fake (meta) kernel, autograd registration and AOT dispatch, as torch checks them.
    index = bucket_ids(4, 5, 3)
    x = tensor((2, 2, 4, 3), torch.float32).requires_grad_()
    v = tensor((2, 2, 4, 5), torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.rpe_ops.rpe_index.default, (x, index))
    torch.library.opcheck(torch.ops.rpe_ops.rpe_reduce.default, (v, index, 3))
    index_t = bucket_ids(4, 5, 6, seed=5)
    z = tensor((2, 2, 5, 6), torch.float32, seed=4).requires_grad_()
    torch.library.opcheck(torch.ops.rpe_ops.rpe_index_qk.default, (x, index, z, index_t))
    torch.library.opcheck(torch.ops.rpe_ops.rpe_reduce_qk.default, (v, index, 3, index_t, 6))


# --- torch.compile, fallback, build ------------------------------------------------------------

def attention_logits_and_bucket_sums(q_r, attn, index):
    """The ways iRPE uses the ops: lookup on keys, on keys and queries at once, per-bucket sums on values."""
    K = q_r.shape[-1]
    index_t = index.flip(1)  # any (Lq, Lk) ids into a key-side table of K buckets
    logits = rpe_ops.rpe_index(q_r, index) * attn + rpe_ops.rpe_index_qk(q_r, index, attn.transpose(2, 3)[..., :K], index_t)
    out, out_t = rpe_ops.rpe_reduce_qk(attn.cos(), index, K, index_t, K)
    return logits, rpe_ops.rpe_reduce(attn.softmax(-1), index, K) + out + out_t.mean(2, keepdim=True)


def reference_attention_logits_and_bucket_sums(q_r, attn, index):
    K = q_r.shape[-1]
    index_t = index.flip(1)
    logits = (rpe_ops.reference_rpe_index(q_r, index) * attn
              + rpe_ops.reference_rpe_index_qk(q_r, index, attn.transpose(2, 3)[..., :K], index_t))
    out, out_t = rpe_ops.reference_rpe_reduce_qk(attn.cos(), index, K, index_t, K)
    return logits, rpe_ops.reference_rpe_reduce(attn.softmax(-1), index, K) + out + out_t.mean(2, keepdim=True)


def values_and_grads(fn, q_r, attn, index):
    q_r, attn = q_r.detach().requires_grad_(), attn.detach().requires_grad_()
    logits, sums = fn(q_r, attn, index)
    (logits.sin().sum() + sums.pow(2).sum()).backward()
    return logits, sums, q_r.grad, attn.grad


@compiled
@pytest.mark.parametrize('backend', ['aot_eager', pytest.param('inductor', marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_gives_same_values_and_grads(backend):
    torch._dynamo.reset()
    index = bucket_ids(6, 7, 5)
    q_r, attn = tensor((2, 3, 6, 5), torch.float32), tensor((2, 3, 6, 7), torch.float32, seed=3)
    eager = values_and_grads(attention_logits_and_bucket_sums, q_r, attn, index)
    compiled_fn = torch.compile(attention_logits_and_bucket_sums, fullgraph=True, backend=backend)
    for got, want in zip(values_and_grads(compiled_fn, q_r, attn, index), eager):
        torch.testing.assert_close(got, want)


@compiled
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_fallback_equals_compiled_op(dtype):
    index = bucket_ids(9, 11, 6)
    q_r, attn = tensor((2, 3, 9, 6), dtype, 'transposed'), tensor((2, 3, 9, 11), dtype, seed=3)

    for got, want in zip(values_and_grads(attention_logits_and_bucket_sums, q_r, attn, index),
                         values_and_grads(reference_attention_logits_and_bucket_sums, q_r, attn, index)):
        torch.testing.assert_close(got, want)


def test_without_extension_falls_back_and_warns_once_how_to_build(monkeypatch):
    monkeypatch.setattr(rpe_ops, '_C', None)
    monkeypatch.setattr(rpe_ops, '_warned_fallback', False)
    index = bucket_ids(3, 4, 2)
    x, v = tensor((1, 2, 3, 2), torch.float32), tensor((1, 2, 3, 4), torch.float32)
    with pytest.warns(RuntimeWarning, match=r'pip install --no-build-isolation -e \.'):
        y = rpe_ops.rpe_index(x, index)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = rpe_ops.rpe_reduce(v, index, 2)
        y_qk = rpe_ops.rpe_index_qk(x, index, v.transpose(2, 3)[..., :3], index)
        out_qk = rpe_ops.rpe_reduce_qk(v, index, 2, index, 3)
    assert torch.equal(y.double(), index_by_loop(x, index))
    assert_matches(out, reduce_by_loop(v, index, 2))
    assert_matches(y_qk, index_qk_by_loop(x, index, v.transpose(2, 3)[..., :3], index))
    for got, want in zip(out_qk, reduce_qk_by_loop(v, index, 2, index, 3)):
        assert_matches(got, want)


def test_build_has_cpu_kernels_and_triton_for_cuda():
    info = rpe_ops.build_info()
    assert info['cpu'], f"rpe_ops._C did not load ({info['import_error']}); run `pip install --no-build-isolation -e .`"
    assert info['cuda'] == (importlib.util.find_spec('triton') is not None)


# --- errors that say what to do ----------------------------------------------------------------

@pytest.mark.parametrize('call, error, message', [
    (lambda x, v, i: rpe_ops.rpe_index(x[0], i), ValueError, r'input must be 4-D \(B, H, Lq, K\), got shape \(3, 3, 2\)'),
    (lambda x, v, i: rpe_ops.rpe_reduce(v[0, 0], i, 2), ValueError, r'values must be 4-D'),
    (lambda x, v, i: rpe_ops.rpe_index(x, i.long()), TypeError, r'got torch.int64\. Pass index.to\(torch.int32\)'),
    (lambda x, v, i: rpe_ops.rpe_reduce(v, i.long(), 2), TypeError, r'index.to\(torch.int32\)'),
    (lambda x, v, i: rpe_ops.rpe_index(x, i[:2]), ValueError, r'index must have shape \(Lq, Lk\) = \(3, Lk\).*got \(2, 5\)'),
    (lambda x, v, i: rpe_ops.rpe_index(x, i[0]), ValueError, r'got \(5,\)'),
    (lambda x, v, i: rpe_ops.rpe_reduce(v, i[:, :4], 2), ValueError, r'values must have Lk = 4'),
    (lambda x, v, i: rpe_ops.rpe_reduce(v, i, 0), ValueError, r'num_buckets must be a positive int'),
    (lambda x, v, i: rpe_ops.rpe_index(x.int(), i), TypeError, r'input must be float64, float32, float16 or bfloat16, got torch.int32'),
    (lambda x, v, i: rpe_ops.rpe_index(x, i.to('meta')), ValueError, r'index is on meta but input is on cpu\. Move it with index.to\(input.device\)'),
    (lambda x, v, i: rpe_ops.rpe_index_qk(x, i, x, i), ValueError, r'expected input_t of shape \(B, H, Lk, Kt\) = \(2, 3, 5, Kt\)'),
    (lambda x, v, i: rpe_ops.rpe_index_qk(x, i, v.transpose(2, 3), i[:, :4]), ValueError, r'index_t of shape \(3, 5\)'),
    (lambda x, v, i: rpe_ops.rpe_index_qk(x, i, v.transpose(2, 3).double(), i), TypeError, r'input_t is torch.float64'),
    (lambda x, v, i: rpe_ops.rpe_reduce_qk(v, i, 2, i.long(), 2), TypeError, r'index.to\(torch.int32\)'),
    (lambda x, v, i: rpe_ops.rpe_reduce_qk(v, i, 2, i, 0), ValueError, r'num_buckets must be a positive int'),
])
def test_bad_inputs_raise_errors_that_say_what_to_do(call, error, message):
    x, v = tensor((1, 3, 4, 2), torch.float32), tensor((1, 3, 4, 5), torch.float32)
    x, v = x.expand(2, 3, 4, 2)[:, :, :3], v.expand(2, 3, 4, 5)[:, :, :3]
    with pytest.raises(error, match=message):
        call(x, v, bucket_ids(3, 5, 2))


@compiled
def test_bucket_ids_outside_the_table_raise_instead_of_reading_out_of_bounds():
    x, v = tensor((1, 1, 2, 3), torch.float32), tensor((1, 1, 2, 4), torch.float32)
    index = torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0]], dtype=torch.int32)
    with pytest.raises(IndexError, match=r'index\[0, 3\] = 3 is not a bucket id in \[0, 3\)'):
        rpe_ops.rpe_index(x, index)
    with pytest.raises(IndexError, match=r'index\[1, 1\] = -1 is not a bucket id in \[0, 2\)'):
        rpe_ops.rpe_reduce(v, index.clamp(max=1), 2)
    with pytest.raises(IndexError, match=r'index\[0, 3\] = 3 is not a bucket id in \[0, 3\)'):
        rpe_ops.rpe_index_qk(x, index.clamp(min=0, max=2), tensor((1, 1, 4, 3), torch.float32), index)
    with pytest.raises(IndexError, match=r'index\[1, 1\] = -1 is not a bucket id in \[0, 4\)'):
        rpe_ops.rpe_reduce_qk(v, index.clamp(min=0, max=1), 2, index, 4)


# --- the CPU loops (AVX-512 and portable) and the block cache ----------------------------

def product_bucket_ids(height, width):
    """Bucket ids of a real iRPE setting (rpe-2.0-product, as iRPE on keys uses them) and their count: long
    runs of keys in one bucket, unlike random ids."""
    from detr_irpe.irpe import build_rpe, rpe_config_from_string
    _, rpe_k, _ = build_rpe(rpe_config_from_string('rpe-2.0-product-ctx-1-k'), head_dim=32, num_heads=8)
    return rpe_k.bucket_ids(height * width, height, width), rpe_k.num_buckets


@pytest.fixture(params=['portable', 'avx512'])
def cpu_loops(request):
    """Run a test once on each set of CPU loops this host runs, forced for every op."""
    info = rpe_ops.build_info()['cpu_loops']
    if info is None:
        pytest.skip('rpe_ops._C is not built')
    if request.param not in info['available']:
        pytest.skip(f"this host runs only the portable loops ({info['reason']})")
    before = rpe_ops.set_cpu_loops(request.param)
    yield request.param
    rpe_ops.set_cpu_loops(before)


# (B, H, Lq, Lk): B*H below, at and past the 16 rows summed together, Lk with and without a tail of
# fewer than 16 keys, rows that start off 64-byte boundaries.
FLOAT_LOOP_SIZES = [(1, 1, 3, 37), (2, 1, 3, 16), (1, 16, 2, 48), (2, 9, 3, 35), (3, 7, 2, 21), (2, 17, 1, 70)]


@compiled
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('ids', ['random', 'runs'])
@pytest.mark.parametrize('size', FLOAT_LOOP_SIZES, ids=str)
def test_cpu_loops_agree_with_definitions(cpu_loops, size, ids, dtype):
    B, H, Lq, Lk = size
    K = 7
    if ids == 'random':
        index = bucket_ids(Lq, Lk, K)
    else:  # blocks of keys in one bucket, some spanning a whole 16-key vector
        index = ((torch.arange(Lk) // 19 + torch.arange(Lq)[:, None]) % K).to(torch.int32)
    x, v = tensor((B, H, Lq, K), dtype), tensor((B, H, Lq, Lk), dtype, seed=2)
    z = tensor((B, H, Lk, K + 2), dtype, seed=3)
    if ids == 'random':
        index_t = bucket_ids(Lq, Lk, K + 2, seed=4)
    else:  # runs too: rpe_index_qk's AVX-512 loop runs only on key-side ids with 10% of 16-id vectors in one bucket
        index_t = ((torch.arange(Lk) // 19 + 2 * torch.arange(Lq)[:, None]) % (K + 2)).to(torch.int32)
        vectors = index_t.flatten()[:index_t.numel() // 16 * 16].view(-1, 16)
        assert (vectors == vectors[:, :1]).all(1).float().mean() >= 0.1
    assert torch.equal(rpe_ops.rpe_index(x, index).double(), index_by_loop(x, index))
    assert_matches(rpe_ops.rpe_reduce(v, index, K), reduce_by_loop(v, index, K))
    assert_matches(rpe_ops.rpe_index_qk(x, index, z, index_t), index_qk_by_loop(x, index, z, index_t))
    for got, want in zip(rpe_ops.rpe_reduce_qk(v, index, K, index_t, K + 2),
                         reduce_qk_by_loop(v, index, K, index_t, K + 2)):
        assert_matches(got, want)


@compiled
@pytest.mark.parametrize('K', [1, 16, 17, 32, 33, 64, 65, 81, 96, 97, 128, 129, 300])
def test_cpu_index_loops_agree_with_definitions_for_every_table_length(cpu_loops, K):
    # The AVX-512 index loops hold tables of up to 128 entries in 1-4 register pairs and gather from
    # longer ones: every length on either side of each boundary, every id of the table used.
    B, H, Lq, Lk = 2, 3, 4, 53
    index = (bucket_ids(Lq, Lk, K).flatten().index_put((torch.arange(min(K, Lq * Lk)),), torch.arange(min(K, Lq * Lk),
             dtype=torch.int32))).view(Lq, Lk)
    x, z = tensor((B, H, Lq, K), torch.float32), tensor((B, H, Lk, K + 3), torch.float32, seed=3)
    index_t = bucket_ids(Lq, Lk, K + 3, seed=4)
    index_t[:, :32] = 0  # two 16-key vectors of one key-side bucket: the AVX-512 rpe_index_qk loop runs
    assert torch.equal(rpe_ops.rpe_index(x, index).double(), index_by_loop(x, index))
    # one float32 addition per entry, which the float64 sum rounded to float32 reproduces exactly
    assert torch.equal(rpe_ops.rpe_index_qk(x, index, z, index_t), index_qk_by_loop(x, index, z, index_t).float())


@compiled
def test_forced_loops_are_the_ones_reported(cpu_loops):
    info = rpe_ops.build_info()['cpu_loops']
    assert info['loops'] == cpu_loops and info['reason'] == f"forced by rpe_ops.set_cpu_loops('{cpu_loops}')", info


@compiled
def test_cpu_float32_loops_agree_on_real_bucket_ids_at_encoder_size(cpu_loops):
    index, K = product_bucket_ids(25, 38)
    x, v = tensor((2, 8, 950, K), torch.float32), tensor((2, 8, 950, 950), torch.float32, seed=2)
    expected = x.gather(3, index.long().expand(2, 8, 950, 950))  # a copy: bit-exact
    assert torch.equal(rpe_ops.rpe_index(x, index), expected)
    summed = torch.zeros(2, 8, 950, K, dtype=torch.float64).scatter_add_(3, index.long().expand(2, 8, 950, 950),
                                                                          v.double())
    torch.testing.assert_close(rpe_ops.rpe_reduce(v, index, K), summed.float(), rtol=1e-5, atol=1e-4)


@compiled
def test_large_outputs_come_back_from_the_block_cache_fully_overwritten(cpu_loops):
    index, K = product_bucket_ids(16, 16)
    x = [tensor((2, 8, 256, K), torch.float32, seed=s) for s in (1, 2)]  # outputs of 4 MiB
    block_cache.empty()
    first = rpe_ops.rpe_index(x[0], index)
    before = block_cache.stats()
    assert before['cached_blocks'] == 0
    del first
    kept = block_cache.stats()
    assert kept['cached_blocks'] == 1 and kept['cached_bytes'] >= 2 * 8 * 256 * 256 * 4
    second = rpe_ops.rpe_index(x[1], index)  # same size: the kept block, holding the first output
    after = block_cache.stats()
    assert after['hits'] == before['hits'] + 1 and after['misses'] == before['misses']
    assert torch.equal(second, x[1].gather(3, index.long().expand(2, 8, 256, 256)))
    del second
    block_cache.empty()
    assert block_cache.stats()['cached_bytes'] == 0


def run_python(code, **env):
    """`code` run by a fresh Python process, `env` added to its environment."""
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, **env})


# Calls the four ops and prints build_info()['cpu_loops'] as JSON.
USE_EVERY_OP = ('import json, torch, rpe_ops\n'
                'x, v, i = torch.ones(1, 1, 40, 5), torch.ones(1, 1, 40, 40), torch.zeros(40, 40, dtype=torch.int32)\n'
                'rpe_ops.rpe_index(x, i); rpe_ops.rpe_reduce(v, i, 5)\n'
                'rpe_ops.rpe_index_qk(x, i, x, i); rpe_ops.rpe_reduce_qk(v, i, 5, i, 5)\n'
                "print(json.dumps(rpe_ops.build_info()['cpu_loops']))\n")


def host_runs_avx512():
    """From the CPU's flags and torch's capability, not from rpe_ops: AVX-512 F, BW and VL, and torch's
    own AVX-512 kernels in use (ATEN_CPU_CAPABILITY=avx2 turns them off)."""
    with open('/proc/cpuinfo') as f:
        flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    return {'avx512f', 'avx512bw', 'avx512vl'} <= set(flags) and torch.backends.cpu.get_cpu_capability() == 'AVX512'


@compiled
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads the CPU flags from /proc/cpuinfo')
def test_auto_loops_go_by_cpu_feature_and_torch_capability():
    before = rpe_ops.set_cpu_loops('auto')
    try:
        info = rpe_ops.build_info()['cpu_loops']
    finally:
        rpe_ops.set_cpu_loops(before)
    want = 'avx512' if host_runs_avx512() else 'portable'
    assert info['loops'] == want and info['reason'].startswith('by CPU feature: '), info
    assert info['available'] == (['portable', 'avx512'] if want == 'avx512' else ['portable']), info


@compiled
def test_torch_capability_avx2_gives_the_portable_loops():
    # how a host without AVX-512 is emulated: torch's own kernels and rpe_ops' loops both step down
    run = run_python(USE_EVERY_OP, ATEN_CPU_CAPABILITY='avx2', RPE_OPS_CPU_LOOPS='')
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info['loops'] == 'portable' and info['available'] == ['portable'], info
    assert info['reason'].startswith('by CPU feature: '), info


@compiled
@pytest.mark.parametrize('setting', ['portable', 'vectorized'])
def test_loops_from_the_environment_are_checked_and_reported(setting):
    run = run_python(USE_EVERY_OP, RPE_OPS_CPU_LOOPS=setting)
    if setting == 'vectorized':
        assert run.returncode != 0
        assert ("RPE_OPS_CPU_LOOPS must be one of auto, portable, avx512, got 'vectorized'; 'auto' (the default) "
                "picks by CPU feature" in run.stderr), run.stderr
        return
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info['loops'] == 'portable' and info['reason'] == 'forced by RPE_OPS_CPU_LOOPS=portable', info


@compiled
def test_set_cpu_loops_says_what_it_takes():
    with pytest.raises(ValueError, match=r"must be one of auto, portable, avx512, got 'sse'"):
        rpe_ops.set_cpu_loops('sse')
    if 'avx512' not in rpe_ops.build_info()['cpu_loops']['available']:
        with pytest.raises(ValueError, match=r"asks for the 'avx512' loops, but .*; use 'portable' or 'auto'"):
            rpe_ops.set_cpu_loops('avx512')
    before = rpe_ops.set_cpu_loops('portable')
    assert rpe_ops.set_cpu_loops(before) == 'portable'
