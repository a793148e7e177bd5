"""DETR with iRPE: exact to the published checkpoints and code, every setting runs."""
import json
import os

import pytest
import torch
from torch import nn

from detr_irpe import UsageError, build_model
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.irpe import get_bucket_ids_2d, rpe_config_from_string
from golden_weights import fill_state_dict, make_images  # tests/golden_weights.py, beside this file

DATA = os.path.join(os.path.dirname(__file__), 'data')

with open(os.path.join(DATA, 'detr_r50_state_dict_manifests.json')) as f:
    MANIFESTS = json.load(f)
with open(os.path.join(DATA, 'detr_small_golden.json')) as f:
    GOLDEN = json.load(f)

TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '2', '--dim_feedforward', '32', '--num_queries', '5',
        '--device', 'cpu', '--lr_backbone', '0']


def parse(argv):
    return get_args_parser().parse_args(argv)


def two_images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 128, 160, generator=g), torch.randn(3, 96, 192, generator=g)]


@pytest.mark.parametrize('name', sorted(MANIFESTS))
def test_state_dict_equals_published_checkpoint(name):
    rpe = name[len('detr_r50'):].lstrip('_')
    model = build_model(parse(['--backbone_weights', 'none', '--device', 'cpu', '--enc_rpe2d', rpe]))[0]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: shape for k, shape in MANIFESTS[name]}


@pytest.mark.parametrize('case', sorted(GOLDEN))
def test_predictions_equal_published_code(case):
    golden = GOLDEN[case]
    model, _, postprocessors = build_model(parse(golden['args'] + ['--backbone_weights', 'none']))
    model.load_state_dict(fill_state_dict(golden['manifest']))
    model.eval()
    with torch.no_grad():
        out = model(make_images())
        results = postprocessors['bbox'](out, torch.tensor([[320, 480], [352, 416]]))
    torch.testing.assert_close(out['pred_logits'], torch.tensor(golden['pred_logits']), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out['pred_boxes'], torch.tensor(golden['pred_boxes']), rtol=1e-5, atol=1e-5)
    for r, scores, labels, boxes in zip(results, golden['scores'], golden['labels'], golden['boxes']):
        torch.testing.assert_close(r['scores'], torch.tensor(scores), rtol=1e-5, atol=1e-5)
        assert r['labels'].tolist() == labels
        torch.testing.assert_close(r['boxes'], torch.tensor(boxes), rtol=1e-5, atol=1e-3)


def _train_step(args_list, images=None):
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse(TINY + args_list))
    images = images or two_images()
    targets = [{'labels': torch.tensor([1, 3]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
               {'labels': torch.tensor([2]), 'boxes': torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]
    out = model(images)
    losses = criterion(out, targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    return model, out, losses, loss


COMBINATIONS = [f'rpe-{ratio}-{method}-{mode}-{shared}-{on}'
                for method in ('euc', 'quant', 'cross', 'product') for mode in ('bias', 'ctx')
                for shared in (0, 1) for on in ('q', 'k', 'v', 'qk', 'qv', 'kv', 'qkv')
                for ratio in ('1.9',) if not (mode == 'bias' and 'v' in on)]


@pytest.mark.slow
@pytest.mark.parametrize('rpe', COMBINATIONS)
def test_every_enc_rpe2d_setting_trains_on_two_image_sizes(rpe):
    model, out, _, loss = _train_step(['--enc_rpe2d', rpe])
    assert out['pred_logits'].shape == (2, 5, 92) and out['pred_boxes'].shape == (2, 5, 4)
    assert torch.isfinite(loss)
    tables = [(n, p) for n, p in model.named_parameters() if 'lookup_table' in n]
    assert tables and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in tables)
    # Their gradient is not zero once the loss depends on them.
    assert any(p.grad.abs().sum() > 0 for _, p in tables)


def test_irpe_tables_of_a_new_model_with_rpe_init_zero_are_zero_so_it_starts_as_plain_detr():
    model = build_model(parse(TINY + ['--enc_rpe2d', 'rpe-2.0-cross-ctx-0-qkv', '--rpe_init', 'zero']))[0]
    tables = {n: p for n, p in model.named_parameters() if 'lookup_table' in n}
    assert len(tables) == 6 and all(torch.count_nonzero(p) == 0 for p in tables.values())
    others = [p for n, p in model.named_parameters() if n.startswith('transformer.') and p.dim() > 1 and n not in tables]
    assert all(torch.count_nonzero(p) > 0 for p in others)


def test_a_few_enc_rpe2d_settings_train():
    for rpe in ('rpe-2.0-product-ctx-1-k', 'rpe-1.9-cross-bias-0-qk', 'rpe-2.0-quant-ctx-0-qkv-clip'):
        _, _, _, loss = _train_step(['--enc_rpe2d', rpe])
        assert torch.isfinite(loss)


@pytest.mark.parametrize('embedding', ['sine', 'learned', 'none'])
def test_position_embeddings(embedding):
    model, out, _, loss = _train_step(['--position_embedding', embedding, '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k'])
    learned = [k for k in model.state_dict() if k.startswith('backbone.1.')]
    assert learned == (['backbone.1.row_embed.weight', 'backbone.1.col_embed.weight'] if embedding == 'learned' else [])
    assert torch.isfinite(loss)


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet34', 'resnet50'])
def test_backbones_and_dilation(backbone):
    args = TINY + ['--backbone', backbone, '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k']
    model = build_model(parse(args))[0].eval()
    images = two_images()
    with torch.no_grad():
        feats = model.backbone(*model_inputs(images))[0]
    assert feats.shape[1] == (512 if backbone in ('resnet18', 'resnet34') else 2048)
    assert feats.shape[-2:] == (4, 6)
    if backbone != 'resnet50':
        with pytest.raises(UsageError, match="--dilation needs a bottleneck resnet .* not --backbone resnet"):
            build_model(parse(args + ['--dilation']))  # torchvision's basic blocks cannot dilate
        return
    dc5 = build_model(parse(args + ['--dilation']))[0].eval()
    with torch.no_grad():
        feats_dc5 = dc5.backbone(*model_inputs(images))[0]
        out = dc5(images)
    assert feats_dc5.shape[-2:] == (8, 12)
    assert torch.isfinite(out['pred_boxes']).all()


def model_inputs(images):
    from detr_irpe.detr import batch_images
    return batch_images(images)


def test_batched_tensor_with_mask_equals_list_of_images():
    model = build_model(parse(TINY + ['--enc_rpe2d', 'rpe-2.0-product-ctx-1-k']))[0].eval()
    images = two_images()
    batch, mask = model_inputs(images)
    assert mask[1, :96, :192].logical_not().all() and mask[1, 96:].all() and not mask[0, :128, :160].any()
    with torch.no_grad():
        a, b = model(images), model(batch, mask)
    torch.testing.assert_close(a['pred_boxes'], b['pred_boxes'], rtol=0, atol=0)


def test_inputs_the_model_would_misread_are_refused_naming_what_was_given():
    """uint8 pixels in a float batch, a transformers pixel_mask (1 on pixels), a mask of another size, one image
    without its list: each once ran on, or failed deep in torch."""
    model = build_model(parse(TINY))[0].eval()
    images = two_images()
    batch, mask = model_inputs(images)
    as_bytes = (images[1].clamp(0, 1) * 255).to(torch.uint8)
    cases = [((images[0], as_bytes), TypeError, 'image 1 is torch.uint8; the model takes float images normalised'),
             ((as_bytes,), TypeError, 'image 0 is torch.uint8'),
             ((images[0], images[1].double()), TypeError, 'image 1 is torch.float64, image 0 torch.float32'),
             ((images[0], images[1].numpy()), TypeError, 'image 1 is a ndarray; expected a .3, H, W. float tensor'),
             ((images[0][None], images[1]), ValueError, r'image 0 has shape \(1, 3, 128, 160\); expected \(3, H, W\)')]
    for samples, error, message in cases:
        with pytest.raises(error, match=message):
            model(list(samples))
    with pytest.raises(TypeError, match=r"mask is torch.int64; expected a bool tensor, True on padding \(transformers' "
                                        'pixel_mask is the opposite'):
        model(batch, (~mask).long())
    with pytest.raises(ValueError, match=r'mask has shape \(2, 10, 10\); expected \(2, 128, 192\)'):
        model(batch, mask[:, :10, :10])
    with pytest.raises(ValueError, match=r'images has shape \(3, 128, 160\); expected \(B, 3, H, W\)'):
        model(images[0])
    with pytest.raises(TypeError, match='images is torch.uint8'):
        model(as_bytes[None])


def test_size_divisibility_pads_the_batch_to_multiples_and_only_pads():
    from detr_irpe.detr import batch_images
    images = two_images()  # 128x160 and 96x192
    plain, plain_mask = batch_images(images)
    for n in (1, 32, 100):
        batch, mask = batch_images(images, n)
        assert batch.shape[-2:] == (-(-128 // n) * n, -(-192 // n) * n) and mask.shape == (2, *batch.shape[-2:])
        # the images where they were, zeros and True elsewhere
        torch.testing.assert_close(batch[..., :128, :192], plain, rtol=0, atol=0)
        assert torch.equal(mask[:, :128, :192], plain_mask) and mask[:, 128:].all() and mask[..., 192:].all()
        assert not batch[..., 128:, :].any() and not batch[..., 192:].any()


def test_aux_losses_for_every_decoder_layer_but_the_last():
    _, out, losses, _ = _train_step(['--dec_layers', '3'])
    assert len(out['aux_outputs']) == 2
    for suffix in ('', '_0', '_1'):
        assert {f'loss_ce{suffix}', f'loss_bbox{suffix}', f'loss_giou{suffix}'} <= set(losses)
    _, out, losses, _ = _train_step(['--dec_layers', '3', '--no_aux_loss'])
    assert 'aux_outputs' not in out and 'loss_ce_0' not in losses


def test_postprocessed_boxes_are_in_pixels():
    model, _, post = build_model(parse(TINY))
    model.eval()
    with torch.no_grad():
        out = model(two_images())
    sizes = torch.tensor([[480, 640], [300, 200]])
    results = post['bbox'](out, sizes)
    for r, (h, w), boxes in zip(results, sizes.tolist(), out['pred_boxes']):
        cx, cy, bw, bh = boxes.unbind(-1)
        expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(r['boxes'], expected)


def _attention(rpe, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    attn = RPEMultiheadAttention(16, 4, dropout=dropout, rpe_config=rpe_config_from_string(rpe))
    with torch.no_grad():
        for n, p in attn.named_parameters():
            if 'lookup_table' in n:
                p.normal_()
    return attn


def _attention_inputs(h=3, w=5, B=2, E=16):
    torch.manual_seed(1)
    x = torch.randn(h * w, B, E, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(h * w, B, E, dtype=torch.float64)
    mask = torch.zeros(B, h * w, dtype=torch.bool)
    mask[1, -4:] = True
    return x, pos, mask


def test_attention_without_irpe_equals_torch_multihead_attention():
    ours = _attention('').double()
    theirs = nn.MultiheadAttention(16, 4).double()
    theirs.load_state_dict(ours.state_dict())
    x, pos, mask = _attention_inputs()
    q = x + pos
    a = ours(q, q, x, key_padding_mask=mask, height=3, width=5)[0]
    b = theirs(q, q, x, key_padding_mask=mask)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize('rpe', ['rpe-2.0-product-ctx-0-k', 'rpe-2.0-cross-bias-0-qk', 'rpe-1.9-euc-ctx-1-qk'])
def test_attention_with_irpe_equals_per_pair_formula(rpe):
    """logits_ij = q_i.k_j + q_i.Wk[b(i,j)] + k_j.Wq[b(j,i)] (q, k scaled), padded keys masked."""
    attn = _attention(rpe).double()
    x, pos, mask = _attention_inputs()
    h, w, B, E, H = 3, 5, 2, 16, 4
    d = E // H
    out = attn(x + pos, x + pos, x, key_padding_mask=mask, height=h, width=w)[0]
    Wq, Wk, Wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    split = lambda t: t.reshape(h * w, B, H, d).permute(1, 2, 0, 3)  # noqa: E731
    q = split((x + pos) @ Wq.T + bq) * d ** -0.5
    k = split((x + pos) @ Wk.T + bk)
    v = split(x @ Wv.T + bv)
    logits = q @ k.transpose(-1, -2)
    config = rpe_config_from_string(rpe)

    def term(module, one, vec):
        """(B, H, L, L) with entry [i, j] = vec_i . table[bucket(i, j)], by explicit per-pair tables."""
        parts = [(module, one.method)] if one.method != 'cross' else [(module.rp_rows, 'cross_rows'),
                                                                     (module.rp_cols, 'cross_cols')]
        total = 0
        for part, method in parts:
            ids = get_bucket_ids_2d(method, h, w, 0, one.ratio)[0].long()
            if one.mode == 'bias':
                total = total + part.lookup_table_bias[:, ids][None]
            else:
                total = total + torch.einsum('bhic,hcij->bhij', vec, part.lookup_table_weight[:, :, ids].expand(H, -1, -1, -1))
        return total

    if config.rpe_k is not None:
        logits = logits + term(attn.rpe_k, config.rpe_k, q)
    if config.rpe_q is not None:
        logits = logits + term(attn.rpe_q, config.rpe_q, k * d ** -0.5).transpose(-1, -2)
    logits = logits.masked_fill(mask[:, None, None, :], float('-inf'))
    expected = (logits.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(h * w, B, E)
    expected = attn.out_proj(expected)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('rpe', ['', 'rpe-2.0-product-ctx-1-k', 'rpe-2.0-cross-bias-0-qk', 'rpe-1.9-quant-ctx-0-qk'])
def test_sdpa_path_equals_explicit_path_in_values_and_gradients(rpe):
    x, pos, mask = _attention_inputs()
    results = []
    for need_weights in (False, True):
        attn = _attention(rpe).double()
        xi = x.detach().clone().requires_grad_()
        out, weights = attn(xi + pos, xi + pos, xi, key_padding_mask=mask, height=3, width=5, need_weights=need_weights)
        assert (weights is None) != need_weights
        out.pow(2).sum().backward()
        grads = {n: p.grad for n, p in attn.named_parameters()}
        results.append((out, xi.grad, grads))
    (a, ga, pa), (b, gb, pb) = results
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], msg=n)


def test_model_sdpa_path_equals_explicit_path():
    """The whole model: encoder attention through SDPA, and forced through the explicit softmax."""
    model = build_model(parse(TINY + ['--enc_rpe2d', 'rpe-2.0-product-ctx-0-qk']))[0].eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lookup_table' in n:
                p.normal_()
        fast = model(two_images())
        for layer in model.transformer.encoder.layers:
            forward = layer.self_attn.forward
            layer.self_attn.forward = lambda *a, _f=forward, **k: _f(*a, **{**k, 'need_weights': True})
        explicit = model(two_images())
    torch.testing.assert_close(fast['pred_logits'], explicit['pred_logits'], rtol=1e-5, atol=1e-5)


MALFORMED = ['rpe', 'rpe-2.0', 'rpe-2.0-product-ctx-1', 'rpe-2.0-product-ctx-1-k-clip-more', 'irpe-2.0-product-ctx-1-k',
             'rpe-two-product-ctx-1-k', 'rpe-2.0-manhattan-ctx-1-k', 'rpe-2.0-product-context2-1-k',
             'rpe-2.0-product-ctx-2-k', 'rpe-2.0-product-ctx-yes-k', 'rpe-2.0-product-ctx-1-z', 'rpe-2.0-product-ctx-1-kk',
             'rpe-2.0-product-bias-1-v', 'rpe-0-product-ctx-1-k', 'rpe--2.0-product-ctx-1-k', 'rpe-nan-product-ctx-1-k',
             'rpe-inf-product-ctx-1-k', 'rpe-1e9-product-ctx-1-k', 'rpe-2.0-product-ctx-1-k-clap', 'rpe-2.0-product-ctx-1-']


@pytest.mark.parametrize('text', MALFORMED)
def test_malformed_enc_rpe2d_is_a_clear_error(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(['--enc_rpe2d', text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert repr(text) in err and 'rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}' in err
    args = parse(TINY)
    args.enc_rpe2d = text
    with pytest.raises(ValueError) as value_error:
        build_model(args)
    assert repr(text) in str(value_error.value) and 'rpe-2.0-product-ctx-1-k' in str(value_error.value)


def test_dataset_without_default_class_count_asks_for_num_classes():
    args = parse(TINY + ['--dataset_file', 'synthetic'])
    with pytest.raises(ValueError, match='--num_classes'):
        build_model(args)
    args.num_classes = 4
    assert build_model(args)[0].class_embed.out_features == 5
