"""ResNet backbone with frozen batch norm, joined with the position embedding (DETR, Sec. 3.2).

State-dict keys are those of published DETR: `0.body.<torchvision resnet keys without fc>` and,
for the learned position embedding, `1.row_embed.weight` / `1.col_embed.weight`.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from detr_irpe import UsageError

from .position_encoding import build_position_encoding

NUM_CHANNELS = {'resnet18': 512, 'resnet34': 512, 'resnet50': 2048, 'resnet101': 2048}
DETR_PREFIX = 'backbone.0.body.'


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """torchvision's frozen batch norm (the same buffers and state-dict keys) as one F.batch_norm call: one kernel
    each way instead of seven, and under autocast the output keeps the activations' half type (the affine in
    float32, as cuDNN's batch norm computes it) instead of becoming float32 for the next convolution to cast
    back (docs/performance.md)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Backbone(nn.Module):
    """A torchvision ResNet cut after layer4; only layer4's output is used."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool):
        super().__init__()
        if name not in NUM_CHANNELS:
            raise ValueError(f"--backbone {name!r} is not supported; expected one of {sorted(NUM_CHANNELS)}")
        if dilation and NUM_CHANNELS[name] == 512:
            raise UsageError(f"--dilation needs a bottleneck resnet (resnet50, resnet101), not --backbone {name}: "
                             "torchvision's basic blocks cannot dilate")
        resnet = getattr(torchvision.models, name)(
            weights=None, norm_layer=FrozenBatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation])
        # Everything up to layer4; dropping avgpool and fc keeps torchvision's key names.
        self.body = nn.Sequential(OrderedDict(list(resnet.named_children())[:-2]))
        # channels_last (NHWC): oneDNN and cuDNN run their fastest convolutions on it, with the same
        # results up to float rounding (a DETR-R50 training step here: 3.7 s -> 3.0 s on CPU). Weights
        # loaded later keep this layout (load_state_dict copies into the parameters).
        self.body.to(memory_format=torch.channels_last)
        self.num_channels = NUM_CHANNELS[name]
        # As DETR: the stem and layer1 never train; layer2-4 train only with a positive backbone lr.
        for param_name, param in self.body.named_parameters():
            trainable = train_backbone and param_name.split('.')[0] in ('layer2', 'layer3', 'layer4')
            param.requires_grad_(trainable)
        self.closed_blocks = frozenset()  # blocks whose residual branch ends in a zero-scale norm
        # on the body: weights are loaded into it alone (load_body_weights) as well as with the whole model
        self.body.register_load_state_dict_post_hook(self._body_loaded)
        self.find_closed_blocks()

    def _body_loaded(self, body, incompatible_keys):
        self.find_closed_blocks()

    def find_closed_blocks(self):
        """Note the residual blocks whose branch ends in a frozen batch norm of all-zero scale: such a branch
        adds only the norm's bias, whatever its convolutions compute, so forward skips them (the demo's
        ResNet-18 closes layer4's branches this way: a third of its convolutions' time). Runs on every
        load_state_dict; call it after changing the weights in place."""
        closed = []
        for layer_name, layer in self.body.named_children():
            if not layer_name.startswith('layer'):
                continue
            for index, block in enumerate(layer):
                if bool((last_norm(block).weight == 0).all()):
                    closed.append(f'{layer_name}.{index}')
        self.closed_blocks = frozenset(closed)

    def run_body(self, x: Tensor) -> Tensor:
        """self.body(x), skipping the convolutions of closed blocks while none of their weights train."""
        if not self.closed_blocks:
            return self.body(x)
        for layer_name, layer in self.body.named_children():
            if not layer_name.startswith('layer'):
                x = layer(x)
                continue
            for index, block in enumerate(layer):
                closed = f'{layer_name}.{index}' in self.closed_blocks
                if closed and not any(p.requires_grad for p in block.parameters()):
                    x = shortcut_only(block, x)
                else:
                    x = block(x)
        return x

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images: (B, 3, H, W); mask: (B, H, W) bool, True on padding.
        Returns features (B, C, h, w) and the mask at feature resolution (B, h, w) bool."""
        features = self.run_body(images.contiguous(memory_format=torch.channels_last))
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, feature_mask


def last_norm(block: nn.Module) -> FrozenBatchNorm2d:
    """The norm that closes a torchvision BasicBlock's (bn2) or Bottleneck's (bn3) residual branch."""
    return block.bn3 if hasattr(block, 'bn3') else block.bn2


def shortcut_only(block: nn.Module, x: Tensor) -> Tensor:
    """block(x) for a block whose branch's last norm has zero scale: the norm computes
    (branch - mean) * rsqrt(var + eps) * 0 + bias, i.e. (+-0) + bias, so the block's `branch + shortcut` is
    `shortcut + bias`, the same bits (for finite activations) without the branch's convolutions."""
    norm = last_norm(block)
    shortcut = x if block.downsample is None else block.downsample(x)
    return block.relu(shortcut + norm.bias.reshape(1, -1, 1, 1).to(shortcut.dtype))


class Joiner(nn.Sequential):
    """(backbone, position embedding); the embedding may be None ('none')."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module | None):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor):
        """images: (B, 3, H, W); mask: (B, H, W) bool, True on padding.
        Returns features (B, C, h, w), feature_mask (B, h, w) bool and
        pos (B, hidden_dim, h, w) in the features' dtype, or None without a position embedding."""
        features, feature_mask = self[0](images, mask)
        return self.with_position(features, feature_mask)

    def with_position(self, features: Tensor, feature_mask: Tensor):
        """(features, feature_mask, pos) for features the backbone already computed (FrozenFeatures)."""
        pos = None
        if self[1] is not None:
            pos = self[1](features, feature_mask).to(features.dtype)
        return features, feature_mask, pos


@dataclass
class FrozenFeatures:
    """A batch on which the frozen backbone already ran (engine.FrozenBackboneCollate, in a data loader
    worker). DETR takes it in place of the images and runs only the position embedding and what follows.

    features: (B, C, h, w) the backbone's output; mask: (B, h, w) bool, True on padding."""
    features: Tensor
    mask: Tensor

    def __len__(self):
        return self.features.shape[0]

    def to(self, device, non_blocking=False):
        return FrozenFeatures(self.features.to(device, non_blocking=non_blocking),
                              self.mask.to(device, non_blocking=non_blocking))


def imagenet_state_dict(name: str) -> dict:
    """The torchvision IMAGENET1K_V1 weights of resnet `name` (what DETR starts from)."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        state_dict = weights.get_state_dict(progress=False)
    except Exception as err:  # offline: URLError, OSError, ...
        raise UsageError(
            f"Could not fetch the ImageNet weights of {name} ({weights.url}): {err}. "
            "Pass --backbone_weights none for a random initialisation, or --backbone_weights "
            "<path> to a local resnet state dict.") from err
    return {k: v for k, v in state_dict.items() if not k.startswith('fc.')}


def file_state_dict(path: str) -> dict:
    """Read backbone weights from `path`: a torchvision resnet state dict (fc.* is ignored), a
    checkpoint {'model': state_dict}, or a DETR state dict with `backbone.0.body.` keys.
    Only tensors are unpickled (weights_only), so a file cannot run code when loaded."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise UsageError(
            f"Could not load --backbone_weights {path} as a state dict of tensors: either it is not a "
            f"torch checkpoint, or it holds objects whose unpickling could run code, which is refused. "
            f"({type(err).__name__}: {err})") from err
    if isinstance(obj, dict) and 'model' in obj:
        obj = obj['model']
    if not isinstance(obj, dict):
        raise UsageError(f"--backbone_weights {path} holds a {type(obj).__name__}, expected a state dict")
    if any(k.startswith(DETR_PREFIX) for k in obj):
        return {k[len(DETR_PREFIX):]: v for k, v in obj.items() if k.startswith(DETR_PREFIX)}
    return {k: v for k, v in obj.items() if not k.startswith('fc.')}


def load_body_weights(body: nn.Module, state_dict: dict, source: str) -> None:
    """Load `state_dict` into `body` (the resnet without avgpool and fc), naming any mismatching keys."""
    expected = body.state_dict()
    # Frozen batch norm has no counter; checkpoints of trainable batch norm do.
    given = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    wrong_shape = sorted(f"{k}: {tuple(given[k].shape)} given, {tuple(expected[k].shape)} expected"
                         for k in expected.keys() & given.keys() if given[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')
        problems = [f"{label}: {show(keys)}" for label, keys in
                    (('missing keys', missing), ('unexpected keys', unexpected), ('wrong shapes', wrong_shape))
                    if keys]
        raise UsageError(f"Backbone weights from {source} do not fit this backbone; "
                           + '; '.join(problems)
                           + ". Check --backbone matches the weights (resnet18/34/50/101).")
    body.load_state_dict(given)


def build_backbone(args) -> Joiner:
    """ResNet body + position embedding from DETR's flags (backbone, dilation, lr_backbone,
    backbone_weights, position_embedding, hidden_dim)."""
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0, dilation=args.dilation)
    weights = args.backbone_weights
    if weights == 'imagenet':
        load_body_weights(backbone.body, imagenet_state_dict(args.backbone), f"torchvision {args.backbone}")
    elif weights != 'none':
        load_body_weights(backbone.body, file_state_dict(weights), weights)
    return Joiner(backbone, build_position_encoding(args))
