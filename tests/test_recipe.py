"""The training recipe of the iRPE tables: the published code's (xavier init, decayed like the rest) by
default, the paper's appendix (zero init, no decay) behind --rpe_init zero / --rpe_weight_decay 0."""
import json
import math
import os

import pytest
import torch

from detr_irpe import build_model, engine
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.irpe import rpe_config_from_string
from detr_irpe.transformer import Transformer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu']


def xavier_bound(shape):
    """sqrt(6 / (fan_in + fan_out)) with fan_in = shape[1] * prod(shape[2:]), fan_out = shape[0] * prod(shape[2:])."""
    receptive = math.prod(shape[2:])
    return math.sqrt(6.0 / (shape[1] * receptive + shape[0] * receptive))


def tables_of(module):
    return {n: p for n, p in module.named_parameters() if 'lookup_table' in n}


@pytest.mark.parametrize('rpe', ['rpe-2.0-product-ctx-1-k', 'rpe-2.0-product-ctx-0-qkv', 'rpe-2.0-product-bias-0-qk'])
def test_tables_are_xavier_uniform_by_default(rpe):
    torch.manual_seed(0)
    transformer = Transformer(d_model=256, nhead=8, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=64,
                              rpe_config=rpe_config_from_string(rpe))
    tables = tables_of(transformer)
    assert tables
    for name, p in tables.items():
        bound = xavier_bound(tuple(p.shape))
        values = p.detach().flatten().double()
        # U(-a, a): inside the bound, mean 0, std a / sqrt(3), half of the values within a / 2.
        assert values.abs().max() <= bound, name
        assert abs(values.mean()) < 4 * bound / math.sqrt(3) / math.sqrt(values.numel()), name
        assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.08), name
        assert (values.abs() < bound / 2).double().mean() == pytest.approx(0.5, abs=0.06), name
    # rpe-2.0-product-ctx-1-k with head_dim 32: one shared (1, 32, 81) table, std about 0.027 (issue #12).
    if rpe == 'rpe-2.0-product-ctx-1-k':
        assert next(iter(tables.values())).std().item() == pytest.approx(0.0274, rel=0.08)


def test_zero_init_keeps_tables_at_zero_and_the_other_matrices_xavier():
    torch.manual_seed(0)
    transformer = Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32,
                              rpe_config=rpe_config_from_string('rpe-2.0-cross-ctx-0-qkv'), rpe_init='zero')
    tables = tables_of(transformer)
    assert len(tables) == 12 and all(torch.count_nonzero(p) == 0 for p in tables.values())
    for name, p in transformer.named_parameters():
        if p.dim() > 1 and name not in tables:
            assert 0 < p.abs().max() <= xavier_bound(tuple(p.shape)), name


def test_unknown_rpe_init_names_the_choices():
    with pytest.raises(ValueError, match="'gaussian'.*xavier.*zero"):
        Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, rpe_init='gaussian')


@pytest.mark.parametrize('rpe', ['rpe-2.0-cross-bias-0-qk', 'rpe-2.0-quant-ctx-0-qkv'])
def test_init_draws_follow_the_published_registration_order(rpe, monkeypatch):
    """The xavier calls run in the published state dict's key order (tables inside self_attn, after
    out_proj), so one seed gives the published code's starting weights: replaying the random stream in
    that order with the xavier formula gives every matrix exactly."""
    manifest = json.load(open(os.path.join(DATA, 'detr_r50_state_dict_manifests.json')))[f'detr_r50_{rpe}']
    published = [(k[len('transformer.'):], tuple(s)) for k, s in manifest if k.startswith('transformer.') and len(s) > 1]
    calls = []
    original = torch.nn.init.xavier_uniform_

    def recording(tensor, *a, **k):
        calls.append((tensor, torch.get_rng_state()))  # the tensor itself is kept, so ids are not reused
        return original(tensor, *a, **k)

    monkeypatch.setattr(torch.nn.init, 'xavier_uniform_', recording)
    torch.manual_seed(7)
    transformer = Transformer(d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                              dim_feedforward=2048, rpe_config=rpe_config_from_string(rpe))
    monkeypatch.undo()
    names = {id(p): n for n, p in transformer.named_parameters()}
    in_model = [(names[id(t)], state) for t, state in calls if id(t) in names]
    assert [n for n, _ in in_model] == [n for n, _ in published]

    torch.set_rng_state(in_model[0][1])
    params = dict(transformer.named_parameters())
    for name, shape in published:
        bound = xavier_bound(shape)
        expected = torch.empty(shape).uniform_(-bound, bound)
        torch.testing.assert_close(params[name].detach(), expected, rtol=1e-6, atol=1e-9, msg=name)


def _optimizer(*flags):
    args = get_args_parser().parse_args(TINY + ['--enc_rpe2d', 'rpe-2.0-product-ctx-1-qk', '--lr', '1e-3',
                                                '--lr_backbone', '1e-5', '--weight_decay', '0.1', *flags])
    model = build_model(args)[0]
    return model, engine.build_optimizer(model, args)


def _groups(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g['lr'], g['weight_decay'], [names[id(p)] for p in g['params']]) for g in optimizer.param_groups]


def _one_step_with_zero_gradients(model, optimizer):
    """AdamW with a zero gradient only decays: p <- p * (1 - lr * weight_decay)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in tables_of(model).items()}
    optimizer.step()
    return before, tables_of(model)


def test_default_optimizer_has_the_published_two_groups_and_decays_the_tables():
    model, optimizer = _optimizer()
    (rest_lr, rest_wd, rest), (bb_lr, bb_wd, backbone) = _groups(model, optimizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert (rest_lr, rest_wd, bb_lr, bb_wd) == (1e-3, 0.1, 1e-5, 0.1)
    # As the published main.py: 'backbone' in the name or not.
    assert backbone == [n for n in trainable if 'backbone' in n]
    assert rest == [n for n in trainable if 'backbone' not in n]
    assert sum('lookup_table' in n for n in rest) == 2
    before, after = _one_step_with_zero_gradients(model, optimizer)
    for name in before:
        torch.testing.assert_close(after[name].detach(), before[name] * (1 - 1e-3 * 0.1), rtol=1e-6, atol=0)
        assert not torch.equal(after[name].detach(), before[name])


def test_rpe_weight_decay_zero_gives_the_tables_a_group_without_decay():
    model, optimizer = _optimizer('--rpe_weight_decay', '0', '--rpe_init', 'zero')
    groups = _groups(model, optimizer)
    assert len(groups) == 3
    (_, rest_wd, rest), _, (tables_lr, tables_wd, tables) = groups
    assert rest_wd == 0.1 and not any('lookup_table' in n for n in rest)
    assert tables_lr == 1e-3 and tables_wd == 0.0 and sorted(tables) == sorted(tables_of(model))
    assert all(torch.count_nonzero(p) == 0 for p in tables_of(model).values())
    with torch.no_grad():
        for p in tables_of(model).values():
            p.normal_()
    before, after = _one_step_with_zero_gradients(model, optimizer)
    assert all(torch.equal(after[n].detach(), before[n]) for n in before)
