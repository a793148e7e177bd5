"""Every fast path of the encoder attention equals a plain-torch reference, in values and gradients.

The references below use only torch.gather / scatter_add on per-pair bucket ids and the textbook
softmax attention; they share no code with detr_irpe.attention's fast paths.
"""
import pytest
import torch
from torch import nn

from detr_irpe import build_model
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.lab.benchmark import NNMultiheadAttention
from detr_irpe.irpe import build_rpe, get_bucket_ids_2d, get_rpe_config, key_major_ids, rpe_config_from_string

H_MAP, W_MAP, B, E, HEADS = 3, 5, 2, 16, 4
D = E // HEADS
SETTINGS = ['', 'rpe-2.0-product-ctx-1-k', 'rpe-2.0-product-ctx-0-q', 'rpe-2.0-product-ctx-1-qk',
            'rpe-1.9-euc-ctx-0-qkv', 'rpe-2.0-cross-bias-0-qk', 'rpe-2.0-cross-ctx-1-qkv', 'rpe-1.9-quant-ctx-0-v',
            'rpe-2.0-product-bias-1-k-clip']


def random_tables(module):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if 'lookup_table' in n:
                p.normal_()


def parts(module, config):
    """[(table module, bucket method)]: one per table, two for the cross method."""
    if config.method == 'cross':
        return [(module.rp_rows, 'cross_rows'), (module.rp_cols, 'cross_cols')]
    return [(module, config.method)]


def reference_qk_term(module, config, x, transpose):
    """(B, H, L, L): entry [i, j] = x_i . table[bucket(i, j)] (transpose: x_j . table[bucket(j, i)])."""
    total = 0
    for part, method in parts(module, config):
        ids = get_bucket_ids_2d(method, H_MAP, W_MAP, config.skip, config.ratio, config.index_func)[0].long()
        if config.mode == 'bias':
            term = part.lookup_table_bias[:, ids][None]                              # (1, H, L, L)
        else:
            per_bucket = x @ part.lookup_table_weight                                # (B, H, L, K)
            term = per_bucket.gather(3, ids.expand(*per_bucket.shape[:2], *ids.shape))
        total = total + (term.transpose(-1, -2) if transpose else term)
    return total


def reference_v_term(module, config, weights):
    """(B, H, L, d): sum_j weights[i, j] table[bucket(i, j)], by scatter_add over buckets."""
    total = 0
    for part, method in parts(module, config):
        ids = get_bucket_ids_2d(method, H_MAP, W_MAP, config.skip, config.ratio, config.index_func)[0].long()
        per_bucket = weights.new_zeros(*weights.shape[:3], part.num_buckets)
        per_bucket = per_bucket.scatter_add(3, ids.expand_as(weights), weights)
        total = total + per_bucket @ part.lookup_table_weight
    return total


def reference_attention(attn, config, query, value, mask, dropout_p):
    """Textbook multi-head attention with the iRPE terms added to explicit logits."""
    L = query.shape[0]
    Wq, Wk, Wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    split = lambda t: t.reshape(L, B, HEADS, D).permute(1, 2, 0, 3)  # noqa: E731
    q = split(query @ Wq.T + bq) * D ** -0.5
    k = split(query @ Wk.T + bk)
    v = split(value @ Wv.T + bv)
    logits = q @ k.transpose(-1, -2)
    if config is not None and config.rpe_k is not None:
        logits = logits + reference_qk_term(attn.rpe_k, config.rpe_k, q, transpose=False)
    if config is not None and config.rpe_q is not None:
        logits = logits + reference_qk_term(attn.rpe_q, config.rpe_q, k * D ** -0.5, transpose=True)
    logits = logits.masked_fill(mask[:, None, None, :], float('-inf'))
    weights = torch.nn.functional.dropout(logits.softmax(-1), dropout_p)
    out = weights @ v
    if config is not None and config.rpe_v is not None:
        out = out + reference_v_term(attn.rpe_v, config.rpe_v, weights)
    return attn.out_proj(out.permute(2, 0, 1, 3).reshape(L, B, E))


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(H_MAP * W_MAP, B, E, dtype=torch.float64, generator=g)
    pos = torch.randn(H_MAP * W_MAP, B, E, dtype=torch.float64, generator=g)
    mask = torch.zeros(B, H_MAP * W_MAP, dtype=torch.bool)
    mask[1, -4:] = True
    return x, pos, mask


def values_and_grads(fn, module, x):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = fn(x)
    out.pow(2).sum().backward()
    return [out, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize('need_weights', [False, True], ids=['no_weights', 'weights'])
@pytest.mark.parametrize('padding', [True, False], ids=['padded', 'unpadded'])
@pytest.mark.parametrize('rpe', SETTINGS)
def test_attention_equals_textbook_reference_in_values_and_gradients(rpe, padding, need_weights):
    """The SDPA path (no weights needed) and the explicit path (weights, or iRPE on values)."""
    config = rpe_config_from_string(rpe)
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(E, HEADS, rpe_config=config).double()
    random_tables(attn)
    x, pos, mask = inputs()
    mask = mask if padding else torch.zeros_like(mask)
    ours = values_and_grads(lambda x: attn(x + pos, x + pos, x, key_padding_mask=mask, height=H_MAP, width=W_MAP,
                                           need_weights=need_weights)[0], attn, x)
    theirs = values_and_grads(lambda x: reference_attention(attn, config, x + pos, x, mask, 0.0), attn, x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('rpe', SETTINGS)
def test_training_mode_with_dropout_equals_reference_with_the_same_dropout_mask(rpe):
    """With dropout on CPU the explicit path runs; it draws one mask of the weights' shape, as the reference."""
    config = rpe_config_from_string(rpe)
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(E, HEADS, dropout=0.3, rpe_config=config).double().train()
    random_tables(attn)
    x, pos, mask = inputs()

    def ours(x):
        torch.manual_seed(5)
        return attn(x + pos, x + pos, x, key_padding_mask=mask, height=H_MAP, width=W_MAP)[0]

    def theirs(x):
        torch.manual_seed(5)
        return reference_attention(attn, config, x + pos, x, mask, 0.3)
    for a, b in zip(values_and_grads(ours, attn, x), values_and_grads(theirs, attn, x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('method,mode', [('product', 'ctx'), ('euc', 'ctx'), ('quant', 'bias'), ('cross', 'ctx'),
                                         ('cross', 'bias')])
@pytest.mark.parametrize('skip', [0, 1])
def test_transposed_output_equals_transposed_gather(method, mode, skip):
    """forward(..., transpose_output=True)[i, j] = x_j . table[bucket(j, i)], values and gradients."""
    config = get_rpe_config(ratio=1.9, method=method, mode=mode, shared_head=False, skip=skip, rpe_on='q')
    module = build_rpe(config, D, HEADS)[0].double()
    random_tables(module)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, HEADS, skip + H_MAP * W_MAP, D, dtype=torch.float64, generator=g)
    ours = values_and_grads(lambda x: module(x, H_MAP, W_MAP, transpose_output=True), module, x)
    theirs = values_and_grads(lambda x: reference_qk_term(module, config.rpe_q, x, transpose=True).expand_as(ours[0]),
                              module, x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_key_major_ids_by_loop():
    ids = torch.randint(0, 7, (4, 4), dtype=torch.int32)
    out = key_major_ids(ids, 7)
    for i in range(4):
        for j in range(4):
            assert out[i, j] == j * 7 + ids[j, i]
    assert torch.equal(key_major_ids(ids, 0), ids.t())


TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '2', '--dec_layers', '2', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu']


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train_with_dropout'])
def test_plain_model_equals_the_same_model_on_torch_multihead_attention(train):
    """The plain encoder (no iRPE) computes what torch.nn.MultiheadAttention computes, dropout included."""
    torch.manual_seed(0)
    model = build_model(get_args_parser().parse_args(TINY))[0].double().train(train)
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 96, 128, generator=g, dtype=torch.float64), torch.randn(3, 64, 160, generator=g, dtype=torch.float64)]
    results = []
    for swap in (False, True):
        if swap:
            for layer in model.transformer.encoder.layers:
                old = layer.self_attn
                layer.self_attn = NNMultiheadAttention(old.embed_dim, old.num_heads, dropout=old.dropout).double().train(train)
                layer.self_attn.load_state_dict(old.state_dict())
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model(images)
        out['pred_logits'].pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out['pred_logits'], out['pred_boxes'], grads))
    (la, ba, ga), (lb, bb, gb) = results
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ba, bb)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], msg=n)


def test_nn_multihead_attention_adapter_is_torchs_module():
    assert issubclass(NNMultiheadAttention, nn.MultiheadAttention)
