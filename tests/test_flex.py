"""Fused iRPE attention (detr_irpe.flex): flex_attention with the iRPE terms in its score_mod.

On CPU, torch's FlexAttention compiles a forward only, so: the compiled forward is checked against
textbook attention with per-pair iRPE tables, and the score_mod's term and its gradients (wrt q, k and the
tables) are checked by evaluating it densely on broadcast index grids. The references use per-pair tables
(W[:, :, bucket_ids]) and no code of detr_irpe.flex, detr_irpe.attention or rpe_ops.
"""
import re
import types

import pytest
import torch

from detr_irpe import build_model
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.flex import flex_irpe_attention, irpe_score_mod, use_flex
from detr_irpe.irpe import build_rpe, get_bucket_ids_2d, get_rpe_config, rpe_config_from_string

B, HEADS, D, H_MAP, W_MAP = 2, 2, 8, 6, 7    # L = 42 (+ skip): small enough for a few-second CPU compile


@pytest.fixture(scope='module', autouse=True)
def compile_every_config():
    """Each config below is one compile of flex_attention; past dynamo's recompile limit (8) it would
    quietly run uncompiled, which is not what these tests check: raise instead."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture
def cpu_flex():
    """For tests that run flex on CPU: where torch runs no AVX-512 code (ATEN_CPU_CAPABILITY=avx2 or an older
    CPU), flex_irpe_attention must refuse, naming the reason; the test is then done."""
    if torch.backends.cpu.get_cpu_capability() != 'AVX512':
        _, rpe_q, rpe_k = rpe_modules('product', 'ctx', True, 'k', 0)
        q, k, v, _ = random_inputs(0, False)
        with torch.no_grad(), pytest.raises(NotImplementedError, match='needs AVX-512.*auto or sdpa'):
            flex_irpe_attention(q, k, v, rpe_q, rpe_k, None, H_MAP, W_MAP)
        pytest.skip('flex on CPU is refused without AVX-512 (the refusal was checked)')


def rpe_modules(method, mode, shared, rpe_on, skip, ratio=2.0, dtype=torch.float32):
    """(config, rpe_q, rpe_k) with random tables; None where not requested."""
    config = get_rpe_config(ratio=ratio, method=method, mode=mode, shared_head=shared, skip=skip, rpe_on=rpe_on)
    rpe_q, rpe_k, _ = build_rpe(config, D, HEADS)
    torch.manual_seed(0)
    for module in (rpe_q, rpe_k):
        if module is not None:
            module.to(dtype)
            for p in module.parameters():
                torch.nn.init.normal_(p)
    return config, rpe_q, rpe_k


def reference_term(module, one, x):
    """(B|1, H|1, L, L), entry [i, j] = x_i . W[:, bucket(i, j)] (bias: W[bucket(i, j)]), by per-pair tables."""
    tables = [(module, one.method)] if one.method != 'cross' else [(module.rp_rows, 'cross_rows'),
                                                                  (module.rp_cols, 'cross_cols')]
    total = 0
    for part, method in tables:
        ids = get_bucket_ids_2d(method, H_MAP, W_MAP, one.skip, one.ratio)[0].long()
        if one.mode == 'bias':
            total = total + part.lookup_table_bias.to(x.dtype)[:, ids][None]
        else:
            per_pair = part.lookup_table_weight.to(x.dtype)[:, :, ids].expand(x.shape[1], -1, -1, -1)
            total = total + torch.einsum('bhic,hcij->bhij', x, per_pair)
    return total


def reference_logits_term(config, rpe_q, rpe_k, q, k_scaled):
    """rpe_k(q)[i, j] + rpe_q(k)[j, i] as the paper's Eq. 14 + 15 add them to the logits."""
    term = 0
    if rpe_k is not None:
        term = term + reference_term(rpe_k, config.rpe_k, q)
    if rpe_q is not None:
        term = term + reference_term(rpe_q, config.rpe_q, k_scaled).transpose(-1, -2)
    return term


def random_inputs(skip, padding, dtype=torch.float32, seed=1):
    """q (scaled), k, v: (B, H, L, D); key padding mask (B, L) or None."""
    g = torch.Generator().manual_seed(seed)
    L = skip + H_MAP * W_MAP
    q, k, v = (torch.randn(B, HEADS, L, D, generator=g, dtype=dtype) for _ in range(3))
    mask = None
    if padding:
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[1, -9:] = True
    return q * D ** -0.5, k, v, mask


# One compile each; together they cover every method, bias and ctx, shared and per-head tables, iRPE on
# q, k and qk, with and without key padding, skip 0, 1 and 2.
FORWARD_CASES = [  # method, mode, shared, rpe_on, skip, padding
    ('product', 'ctx', True, 'k', 0, True),
    ('product', 'bias', False, 'qk', 1, False),
    ('euc', 'ctx', False, 'q', 0, True),
    ('euc', 'bias', True, 'k', 2, True),
    ('quant', 'ctx', True, 'qk', 1, True),
    ('quant', 'bias', False, 'q', 0, False),
    ('cross', 'ctx', False, 'qk', 0, True),
    ('cross', 'bias', True, 'k', 1, True),
]


@pytest.mark.parametrize('method, mode, shared, rpe_on, skip, padding', FORWARD_CASES)
def test_compiled_flex_forward_equals_textbook_attention(method, mode, shared, rpe_on, skip, padding, cpu_flex):
    config, rpe_q, rpe_k = rpe_modules(method, mode, shared, rpe_on, skip)
    q, k, v, mask = random_inputs(skip, padding)
    with torch.no_grad():
        out = flex_irpe_attention(q, k, v, rpe_q, rpe_k, mask, H_MAP, W_MAP)
        q64, k64, v64 = q.double(), k.double(), v.double()
        logits = q64 @ k64.transpose(-1, -2) + reference_logits_term(config, rpe_q, rpe_k, q64, k64 * D ** -0.5)
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None, :], float('-inf'))
        expected = logits.softmax(-1) @ v64
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=2e-5)


def test_compiled_flex_forward_in_bfloat16_under_autocast(cpu_flex):
    """As --amp runs it: bfloat16 q, k, v and per-bucket values; to bfloat16's precision (a wrong bucket
    or row would be off by about the size of the output)."""
    config, rpe_q, rpe_k = rpe_modules('product', 'ctx', False, 'qk', 1)
    q, k, v, mask = (t if t.dtype == torch.bool else t.bfloat16() for t in random_inputs(1, True))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = flex_irpe_attention(q, k, v, rpe_q, rpe_k, mask, H_MAP, W_MAP)
    with torch.no_grad():
        q64, k64, v64 = q.double(), k.double(), v.double()
        logits = q64 @ k64.transpose(-1, -2) + reference_logits_term(config, rpe_q, rpe_k, q64, k64 * D ** -0.5)
        expected = logits.masked_fill(mask[:, None, None, :], float('-inf')).softmax(-1) @ v64
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def dense_score_mod(score_mod, L, dtype):
    """The score_mod on every (b, h, q_idx, kv_idx) at once, from a zero score: (B, H, L, L)."""
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(HEADS).view(1, HEADS, 1, 1)
    return score_mod(torch.zeros(B, HEADS, L, L, dtype=dtype), b, h, torch.arange(L).view(L, 1), torch.arange(L))


@pytest.mark.parametrize('skip', [0, 1])
@pytest.mark.parametrize('rpe_on', ['q', 'k', 'qk'])
@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('mode', ['bias', 'ctx'])
@pytest.mark.parametrize('method', ['euc', 'quant', 'cross', 'product'])
def test_score_mod_term_and_gradients_equal_per_pair_terms(method, mode, shared, rpe_on, skip):
    """What flex_attention's backward differentiates on GPU: the score_mod's term, wrt q, k and the tables."""
    config, rpe_q, rpe_k = rpe_modules(method, mode, shared, rpe_on, skip, ratio=1.9, dtype=torch.float64)
    tables = [p for m in (rpe_q, rpe_k) if m is not None for p in m.parameters()]
    q, k, _, mask = random_inputs(skip, padding=True, dtype=torch.float64)
    L = q.shape[2]
    upstream = torch.randn(B, HEADS, L, L, dtype=torch.float64).masked_fill(mask[:, None, None, :], 0)

    def term_and_grads(term_of):
        qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
        term = term_of(qi, ki)
        loss = (term.masked_fill(mask[:, None, None, :], 0) * upstream).sum()
        grads = torch.autograd.grad(loss, [qi, ki] + tables, materialize_grads=True)  # bias mode: 0 for q, k
        return [term.detach()] + list(grads)

    ours = term_and_grads(lambda q, k: dense_score_mod(
        irpe_score_mod(rpe_q, rpe_k, q, k * D ** -0.5, H_MAP, W_MAP, mask), L, q.dtype))
    theirs = term_and_grads(lambda q, k: reference_logits_term(config, rpe_q, rpe_k, q, k * D ** -0.5).expand(
        B, HEADS, L, L).masked_fill(mask[:, None, None, :], float('-inf')))
    assert torch.isinf(ours[0]).sum() == mask.sum() * HEADS * L   # -inf exactly at padded keys
    for name, a, b in zip(['term', 'grad q', 'grad k'] + [f'grad table {i}' for i in range(len(tables))], ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def parse(argv):
    return get_args_parser().parse_args(argv)


TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '2', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5',
        '--device', 'cpu', '--enc_rpe2d', 'rpe-2.0-cross-ctx-0-qk']


def test_model_with_flex_attention_equals_model_with_sdpa(cpu_flex):
    """Two images of different sizes (a padded batch), two encoder layers: one compile, reused."""
    models = {}
    for impl in ('sdpa', 'flex'):
        torch.manual_seed(0)
        models[impl] = build_model(parse(TINY + ['--attention_impl', impl]))[0].eval()
    with torch.no_grad():
        for n, p in models['sdpa'].named_parameters():
            if 'lookup_table' in n:
                p.normal_()
        models['flex'].load_state_dict(models['sdpa'].state_dict())
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(3, 128, 160, generator=g), torch.randn(3, 96, 192, generator=g)]
        flex, sdpa = models['flex'](images), models['sdpa'](images)
    assert [layer.self_attn.attention_impl for layer in models['flex'].transformer.encoder.layers] == ['flex'] * 2
    for key in ('pred_logits', 'pred_boxes'):
        torch.testing.assert_close(flex[key], sdpa[key], rtol=1e-4, atol=1e-5)


def test_auto_keeps_the_sdpa_path_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('flex_irpe_attention ran on CPU under attention_impl auto')
    monkeypatch.setattr('detr_irpe.attention.flex_irpe_attention', refuse)
    attn = RPEMultiheadAttention(16, 2, rpe_config=get_rpe_config(rpe_on='qk')).eval()
    x = torch.randn(9, 2, 16)
    assert attn(x, x, x, height=3, width=3)[0].shape == (9, 2, 16)


def test_where_flex_applies():
    # DC5-sized maps (3,300 tokens) on CUDA take flex under auto; C5-sized ones (950) keep SDPA
    cpu, cuda = (types.SimpleNamespace(is_cuda=on_cuda, shape=(2, 8, 3300, 32)) for on_cuda in (False, True))
    c5 = types.SimpleNamespace(is_cuda=True, shape=(2, 8, 950, 32))
    narrow_heads = types.SimpleNamespace(is_cuda=True, shape=(2, 8, 3300, 8))
    rpe = object()
    #            impl, q, rpe_q, rpe_k, rpe_v, need_weights, dropout_p
    assert use_flex('auto', cuda, None, rpe, None, False, 0.0)
    assert use_flex('auto', cuda, rpe, None, None, False, 0.0)
    assert not use_flex('auto', cpu, None, rpe, None, False, 0.0)       # CPU keeps the faster SDPA path
    assert not use_flex('auto', c5, None, rpe, None, False, 0.0)        # SDPA was faster at C5 on an H200
    assert not use_flex('auto', cuda, None, None, None, False, 0.0)     # no iRPE: SDPA's own fused kernels
    assert not use_flex('auto', cuda, None, rpe, rpe, False, 0.0)       # iRPE on values needs the weights
    assert not use_flex('auto', cuda, None, rpe, None, True, 0.0)       # weights asked for
    assert not use_flex('auto', cuda, None, rpe, None, False, 0.1)      # flex has no attention dropout
    assert not use_flex('auto', narrow_heads, None, rpe, None, False, 0.0)  # its CUDA kernels need head_dim >= 16
    assert not use_flex('sdpa', cuda, None, rpe, None, False, 0.0)
    assert use_flex('flex', cpu, None, None, None, False, 0.0)
    assert not use_flex('flex', cpu, None, rpe, None, True, 0.0)        # the explicit path gives the weights
    with pytest.raises(ValueError, match='--dropout 0'):
        use_flex('flex', cuda, None, rpe, None, False, 0.1)


def test_flex_cannot_be_asked_for_what_it_cannot_do(capsys):
    with pytest.raises(ValueError, match="iRPE on values.*--attention_impl auto or sdpa"):
        RPEMultiheadAttention(32, 2, rpe_config=rpe_config_from_string('rpe-2.0-product-ctx-1-kv'),
                              attention_impl='flex')
    with pytest.raises(SystemExit):  # on the command line, a usage error before anything is built
        parse(TINY[:-1] + ['rpe-2.0-product-ctx-1-kv', '--attention_impl', 'flex'])
    assert re.search("error: --attention_impl flex cannot apply iRPE on values.*--attention_impl auto or sdpa",
                     capsys.readouterr().err)
    with pytest.raises(ValueError, match="'fused' is not one of"):
        RPEMultiheadAttention(16, 2, attention_impl='fused')
    with pytest.raises(SystemExit):
        parse(['--attention_impl', 'fused'])
    _, rpe_q, rpe_k = rpe_modules('product', 'ctx', True, 'k', 0)
    q, k, v, _ = random_inputs(0, False)
    with pytest.raises(NotImplementedError, match='torch.no_grad'):   # torch's CPU FlexAttention has no backward
        flex_irpe_attention(q.requires_grad_(), k, v, rpe_q, rpe_k, None, H_MAP, W_MAP)
    with pytest.raises(ValueError, match='float64'):
        flex_irpe_attention(q.double(), k.double(), v.double(), rpe_q, rpe_k, None, H_MAP, W_MAP)


# One compile per precision across map sizes and train/eval switches: gpu_check's flex_recompiles check, which
# tests/test_gpu_check.py runs on CPU (aot_eager) and `make gpu-check` on CUDA (inductor).
