"""ResNet backbone + position embedding: DETR's state-dict layout, freezing, masks, weight loading."""
import json
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from detr_irpe import UsageError
from detr_irpe.backbone import build_backbone

MANIFESTS = Path(__file__).parent / 'data' / 'detr_r50_state_dict_manifests.json'


def args(**overrides):
    defaults = dict(backbone='resnet50', dilation=False, lr_backbone=1e-5, backbone_weights='none',
                    position_embedding='sine', hidden_dim=256)
    return SimpleNamespace(**{**defaults, **overrides})


def randomise_statistics(body):
    """Non-trivial frozen batch-norm statistics."""
    for name, buf in body.named_buffers():
        if name.endswith('running_mean'):
            buf.normal_(0, 0.1)
        elif name.endswith('running_var'):
            buf.uniform_(0.5, 1.5)


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_resnet50_state_dict_matches_published_detr():
    manifest = json.loads(MANIFESTS.read_text())['detr_r50']
    expected = OrderedDict((k[len('backbone.'):], tuple(s)) for k, s in manifest if k.startswith('backbone.'))
    backbone = build_backbone(args())
    assert list(shapes(backbone.state_dict()).items()) == list(expected.items())
    assert backbone.num_channels == 2048


def test_learned_embedding_adds_row_and_column_tables():
    sd = shapes(build_backbone(args(backbone='resnet18', position_embedding='learned')).state_dict())
    assert sd['1.row_embed.weight'] == (50, 128) and sd['1.col_embed.weight'] == (50, 128)
    assert [k for k in sd if not k.startswith('0.body.')] == ['1.row_embed.weight', '1.col_embed.weight']


@pytest.mark.parametrize('name, channels', [('resnet18', 512), ('resnet34', 512), ('resnet101', 2048)])
def test_output_channels_and_stride_32(name, channels):
    backbone = build_backbone(args(backbone=name, hidden_dim=64))
    assert backbone.num_channels == channels
    features, feature_mask, pos = backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert features.shape == (1, channels, 2, 3)
    assert feature_mask.shape == (1, 2, 3) and feature_mask.dtype == torch.bool
    assert pos.shape == (1, 64, 2, 3)


def test_dilation_halves_the_stride():
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    plain, _, _ = build_backbone(args())(images, mask)
    dilated, _, _ = build_backbone(args(dilation=True))(images, mask)
    assert plain.shape[-2:] == (2, 2) and dilated.shape[-2:] == (4, 4)
    assert shapes(build_backbone(args(dilation=True)).state_dict()) == shapes(build_backbone(args()).state_dict())


def test_dilation_needs_a_bottleneck_resnet():
    with pytest.raises(ValueError, match='resnet50'):
        build_backbone(args(backbone='resnet18', dilation=True))


def test_stem_and_layer1_frozen_layer2_to_4_train():
    backbone = build_backbone(args(backbone='resnet18', lr_backbone=1e-5, position_embedding='learned'))
    for name, p in backbone[0].body.named_parameters():
        assert p.requires_grad == name.startswith(('layer2', 'layer3', 'layer4')), name
    # the learned position embedding is part of the transformer's parameters, always trained
    assert all(p.requires_grad for p in backbone[1].parameters())
    # frozen batch norm: statistics and affine terms are buffers, not parameters
    assert not any('bn' in name or 'downsample.1' in name for name, _ in backbone[0].body.named_parameters())


def test_zero_backbone_lr_freezes_everything():
    backbone = build_backbone(args(backbone='resnet18', lr_backbone=0.0))
    assert not any(p.requires_grad for p in backbone[0].parameters())


def test_features_equal_torchvision_resnet_in_eval_mode():
    """Frozen batch norm is batch norm with fixed statistics: compare with torchvision's own resnet."""
    torch.manual_seed(0)
    backbone = build_backbone(args(backbone='resnet18'))
    body = backbone[0].body
    randomise_statistics(body)
    reference = torchvision.models.resnet18().eval()
    missing, unexpected = reference.load_state_dict(body.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith('fc.') or k.endswith('num_batches_tracked') for k in missing)

    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
        features, _, _ = backbone(images, torch.zeros(2, 96, 64, dtype=torch.bool))
    # The backbone runs channels_last, the reference contiguous: different convolution kernels, so the
    # sums round differently (up to ~3e-5 here on features of order 1).
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_mask_downsampled_by_nearest_neighbour():
    mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    mask[1, 70:, :] = True   # image 1 is 70 x 40 inside the 128 x 96 batch
    mask[1, :, 40:] = True
    features, feature_mask, pos = build_backbone(args(backbone='resnet18'))(torch.randn(2, 3, 128, 96), mask)
    assert features.shape[-2:] == (4, 3)
    # nearest: feature pixel (i, j) takes the mask at input pixel (32 i, 32 j)
    assert torch.equal(feature_mask, mask[:, ::32, ::32])
    assert feature_mask[1].tolist() == [[False, False, True], [False, False, True],
                                        [False, False, True], [True, True, True]]
    assert pos.shape == (2, 256, 4, 3) and pos.dtype == features.dtype


def test_no_position_embedding_gives_none():
    backbone = build_backbone(args(backbone='resnet18', position_embedding='none'))
    assert all(k.startswith('0.body.') for k in backbone.state_dict())
    _, _, pos = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert pos is None


def test_loads_plain_torchvision_state_dict(tmp_path):
    # trainable batch norm (num_batches_tracked) and the classifier (fc) are ignored
    resnet = torchvision.models.resnet18()
    for name, buf in resnet.named_buffers():
        if name.endswith('running_mean'):
            buf.normal_()
    path = tmp_path / 'resnet18.pth'
    torch.save(resnet.state_dict(), path)
    body_sd = build_backbone(args(backbone='resnet18', backbone_weights=str(path)))[0].body.state_dict()
    source = resnet.state_dict()
    assert set(body_sd) == {k for k in source if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}
    for k, v in body_sd.items():
        assert torch.equal(v, source[k]), k
    # loaded from contiguous tensors, the convolution weights stay channels_last (the fast layout)
    convs = [v for k, v in body_sd.items() if v.dim() == 4]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)


def test_loads_detr_checkpoint_with_model_key(tmp_path):
    donor = build_backbone(args(backbone='resnet18'))
    model = {f'backbone.{k}': v for k, v in donor.state_dict().items()}
    model['transformer.encoder.layers.0.linear1.weight'] = torch.zeros(2, 2)  # rest of DETR, ignored
    path = tmp_path / 'detr.pth'
    torch.save({'model': model, 'epoch': 3}, path)
    loaded = build_backbone(args(backbone='resnet18', backbone_weights=str(path)))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, donor.state_dict()[k]), k


def test_weights_of_another_resnet_are_refused_naming_keys(tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UsageError) as err:
        build_backbone(args(backbone='resnet50', backbone_weights=str(path)))
    message = str(err.value)
    assert str(path) in message
    assert 'layer1.0.conv3.weight' in message      # missing in a resnet18 file
    assert 'layer1.0.conv1.weight: (64, 64, 3, 3) given, (64, 64, 1, 1) expected' in message


def test_non_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('not a checkpoint')
    with pytest.raises(UsageError, match='Could not load'):
        build_backbone(args(backbone='resnet18', backbone_weights=str(path)))


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'conv1.weight': RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(UsageError, match='could run code, which is refused'):
        build_backbone(args(backbone='resnet18', backbone_weights=str(path)))
    assert not marker.exists()


def test_imagenet_weights_are_torchvision_v1(monkeypatch):
    # stands in for the download: the state dict torchvision would return for IMAGENET1K_V1
    source = torchvision.models.resnet18().state_dict()
    asked = []

    def fake_download(self, *a, **k):
        asked.append(self)
        return source
    monkeypatch.setattr(torchvision.models.WeightsEnum, 'get_state_dict', fake_download)
    body_sd = build_backbone(args(backbone='resnet18', backbone_weights='imagenet'))[0].body.state_dict()
    assert asked == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    for k, v in body_sd.items():
        assert torch.equal(v, source[k]), k


def test_offline_imagenet_weights_error_says_what_to_do(monkeypatch):
    def offline(self, *a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torchvision.models.WeightsEnum, 'get_state_dict', offline)
    with pytest.raises(UsageError, match='--backbone_weights none'):
        build_backbone(args(backbone='resnet18', backbone_weights='imagenet'))


# --- residual blocks closed by a zero-scale norm -----------------------------------------------

def _branch_convs(block):
    return [m for name, m in block.named_children() if name.startswith('conv')]


@pytest.mark.parametrize('name,closed', [('resnet18', ['layer2.1', 'layer4.0', 'layer4.1']),
                                         ('resnet50', ['layer1.0', 'layer3.2', 'layer4.2'])])
def test_blocks_closed_by_a_zero_scale_norm_give_the_same_bits_without_their_convolutions(name, closed):
    torch.manual_seed(0)
    backbone = build_backbone(args(backbone=name, lr_backbone=0.0))[0]
    body = backbone.body
    randomise_statistics(body)
    with torch.no_grad():  # and non-trivial norm scales and biases
        for key, p in body.named_parameters():
            if 'bn' in key or 'downsample.1' in key:
                p.normal_(0.5 if key.endswith('weight') else 0.0, 0.2)
    state = body.state_dict()
    for block in closed:  # what the demo's ResNet-18 does to layer4: the branch's last norm has zero scale
        norm = 'bn3' if name == 'resnet50' else 'bn2'
        state[f'{block}.{norm}.weight'] = torch.zeros_like(state[f'{block}.{norm}.weight'])
    assert backbone.closed_blocks == frozenset()
    # loaded through the whole backbone's load_state_dict, as a checkpoint is
    backbone.load_state_dict({f'body.{k}': v for k, v in state.items()})
    assert backbone.closed_blocks == frozenset(closed)

    calls = []
    for block_name in closed:
        for conv in _branch_convs(body.get_submodule(block_name)):
            conv.register_forward_hook(lambda *a, block_name=block_name: calls.append(block_name))
    images = torch.randn(2, 3, 80, 64).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(2, 80, 64, dtype=torch.bool)
    with torch.no_grad():
        features, _ = backbone(images, mask)
        assert calls == []
        expected = body(images)  # the plain Sequential runs every convolution
        assert len(calls) == len(closed) * len(_branch_convs(body.get_submodule(closed[0])))
        torch.testing.assert_close(features, expected, rtol=0, atol=0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            features, _ = backbone(images, mask)
            expected = body(images)
        assert features.dtype == expected.dtype
        torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_a_closed_block_that_trains_still_runs_so_its_convolutions_get_their_zero_gradients():
    torch.manual_seed(0)
    backbone = build_backbone(args(backbone='resnet18', lr_backbone=1e-5))[0]
    with torch.no_grad():
        backbone.body.layer4[1].bn2.weight.zero_()
    backbone.find_closed_blocks()  # weights changed in place
    assert backbone.closed_blocks == {'layer4.1'}
    features, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    features.sum().backward()
    block = backbone.body.layer4[1]
    assert block.conv1.weight.grad is not None and torch.count_nonzero(block.conv1.weight.grad) == 0
    assert torch.count_nonzero(backbone.body.layer4[0].conv2.weight.grad) > 0


def test_the_demo_backbone_closes_layer4s_branches_and_nothing_else():
    weights = Path(__file__).parent.parent / 'configs' / 'weights' / 'synthetic_resnet18.pth'
    backbone = build_backbone(args(backbone='resnet18', lr_backbone=0.0, backbone_weights=str(weights)))[0]
    assert backbone.closed_blocks == {'layer4.0', 'layer4.1'}
