"""--attention_impl triton (detr_irpe/triton_attention.py): iRPE attention fused into Triton kernels.

The kernels run on CPU tensors under the Triton interpreter, in one subprocess that gpu_check's check starts
(TRITON_INTERPRET must be set before triton.jit decorates them), against the SDPA/explicit path in float64; and
they are compiled here, without a GPU, for each CUDA architecture by Triton's own ptxas, to see what they spill.
"""
import argparse

import pytest
import torch

from detr_irpe import triton_attention
from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.cli.flags import check_flag_combinations
from detr_irpe.irpe import rpe_config_from_string

needs_triton = pytest.mark.skipif(triton_attention.triton is None, reason='triton is not installed')


@needs_triton
def test_output_and_every_gradient_equal_the_explicit_path_in_each_dtype_with_dropout_and_compiled():
    from detr_irpe.lab import gpu_check
    result = gpu_check.check_triton_attention('cpu', quick=False)
    configs = result['configs']
    # no iRPE; q, k, v with head dim 24, two tiles a row; a map smaller than one tile; bias mode; values alone; keys and
    # values; q, k, v per head with 81 buckets; image rows wider than a tile (the product method's factored buckets,
    # the others' ids)
    expected = {f'{rpe or "plain"} {h}x{w} {dtype}' for rpe, (h, w), _, _ in gpu_check.TRITON_ATTENTION_CONFIGS
                for dtype in ('float32', 'bfloat16')}
    # with dropout (what the kernels drop, the explicit path drops) and under torch.compile
    expected |= {'rpe-1.9-product-ctx-1-qkv 2x9 float32 dropout 0.3', 'rpe-1.9-product-ctx-1-qkv 2x9 float32 compiled'}
    assert set(configs) == expected
    share, (kept, sigma) = result['dropout_kept_share'], result['dropout_kept_share_expected']
    assert kept == 0.7 and abs(share - kept) <= 5 * sigma
    # each error to float64 within 16x the explicit path's own in that dtype (a wrong term is orders above)
    assert result['passed'], configs


@needs_triton
@pytest.mark.parametrize('arch', [75, 80, 86, 89, 90])
def test_kernels_compile_for_each_gpu_architecture_without_spilling_more_than_a_few_words(arch):
    from detr_irpe.lab.kernel_resources import attention_kernel_resources
    # as a layer's launches specialise them nothing spills (float32 on sm_75: 28 bytes in the keys' backward);
    # a whole (16, 32, 64) select per tile spilled 300-900 bytes
    # --amp's dtype there: float16 on sm_75 (no bfloat16), bfloat16 from sm_80; float32 on one
    half = 'float16' if arch == 75 else 'bfloat16'
    for dtype, factored in [(half, True), (half, False)] + ([('float32', True)] if arch == 90 else []):
        resources = attention_kernel_resources(arch, dtype, rpe_on='qkv', mask=True, dropout=True, factored=factored)
        assert len(resources) == 3
        assert all(r['spill_bytes'] <= 32 and 0 < r['registers'] <= 255 for r in resources.values()), resources


def test_what_the_kernels_cannot_do_is_refused_with_what_to_use(monkeypatch):
    with pytest.raises(ValueError, match='no cross method.*--attention_impl auto'):
        RPEMultiheadAttention(16, 2, rpe_config=rpe_config_from_string('rpe-2.0-cross-ctx-1-k'),
                              attention_impl='triton')
    layer = RPEMultiheadAttention(16, 2, rpe_config=rpe_config_from_string('rpe-2.0-product-ctx-1-qkv'),
                                  attention_impl='triton')
    x = torch.randn(12, 2, 16)
    if not triton_attention.INTERPRETING and triton_attention.triton is not None:
        with pytest.raises(ValueError, match='runs on CUDA, but the encoder runs on cpu'):
            layer(x, x, x, height=3, width=4)
    if triton_attention.triton is not None:  # float64 (model.double()) ran interpreted, and compiles for no GPU
        monkeypatch.setattr(triton_attention, 'INTERPRETING', True)  # the device check passes on CPU tensors
        assert triton_attention.problem(torch.zeros(1, 2, 12, 8, dtype=torch.float64), None, layer.rpe_k, None) == (
            '--attention_impl triton computes in float32, bfloat16 or float16, not torch.float64: use '
            '--attention_impl sdpa for this precision.')
        assert triton_attention.problem(torch.zeros(1, 2, 12, 8), None, layer.rpe_k, None) is None
    problem = check_flag_combinations(argparse.Namespace(attention_impl='triton', enc_rpe2d='rpe-2.0-cross-ctx-1-k',
                                                         device='cuda'))
    assert problem.startswith('--attention_impl triton has no cross method')  # on the command line too
    problem = check_flag_combinations(argparse.Namespace(attention_impl='triton', device='cpu'))
    assert problem.startswith('--attention_impl triton runs Triton kernels on a GPU; --device cpu has none')
    assert check_flag_combinations(argparse.Namespace(attention_impl='triton', device='cuda:1')) is None


def test_weights_asked_for_come_from_the_explicit_path():
    torch.manual_seed(0)
    config = rpe_config_from_string('rpe-2.0-product-ctx-1-qkv')
    explicit = RPEMultiheadAttention(16, 2, rpe_config=config, attention_impl='sdpa')
    fused = RPEMultiheadAttention(16, 2, rpe_config=config, attention_impl='triton')
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(12, 2, 16)
    out, weights = fused(x, x, x, height=3, width=4, need_weights=True)  # no kernel: runs on CPU
    want_out, want_weights = explicit(x, x, x, height=3, width=4, need_weights=True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


@needs_triton
@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_cases_under_the_interpreter():
    """What `make gpu-check` times on a GPU, tried on CPU at a tiny map (the times mean nothing there)."""
    from rpe_ops.triton_kernels import interpreted
    result = interpreted('from detr_irpe.lab import gpu_benchmarks as g', 'g.bench_triton_attention("cpu", True)')
    assert set(result['rows']) == {f'{name} 3x5' for name in ('plain', 'irpe_k sdpa', 'irpe_k triton', 'irpe_qkv sdpa',
                                                               'irpe_qkv triton')}
    assert all(row['ms'] > 0 for row in result['rows'].values())
    timings = result['irpe_qkv triton 3x5 ms']  # the block sizes tried, and the product method's ids unfactored
    assert set(timings) == {'16x16x16x4', 'ids not factored'} and all(t > 0 for t in timings.values())
