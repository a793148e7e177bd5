"""The DETR detector (Carion et al., ECCV 2020) with iRPE in the encoder, and build_model."""
import torch
import torch.nn.functional as F
from torch import nn

from detr_irpe.backbone import build_backbone
from detr_irpe.criterion import build_criterion
from detr_irpe.irpe import rpe_config_from_string
from detr_irpe.postprocess import PostProcess
from detr_irpe.transformer import build_transformer

DEFAULT_NUM_CLASSES = {'coco': 91}
# above any detection dataset's classes (LVIS: 1,203): past it ids are a database's, and the class head would not fit
MAX_CLASSES = 10 ** 5


def batch_images(images, size_divisibility=1):
    """Pad a list of (3, H_i, W_i) images to one (B, 3, H, W) tensor and a (B, H, W) mask, True on padding; H and
    W are the largest sides rounded up to a multiple of size_divisibility (--size_divisibility)."""
    if not images:
        raise ValueError('the model got an empty list of images; pass at least one (3, H, W) tensor.')
    for i, img in enumerate(images):
        check_image_tensor(img, f'image {i}', 3)
        if img.dtype != images[0].dtype:
            raise TypeError(f'image {i} is {img.dtype}, image 0 {images[0].dtype}: one batch takes one dtype; convert '
                            f'them alike.')
    H = -(-max(img.shape[1] for img in images) // size_divisibility) * size_divisibility
    W = -(-max(img.shape[2] for img in images) // size_divisibility) * size_divisibility
    batch = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool, device=images[0].device)
    for img, b, m in zip(images, batch, mask):
        b[:, :img.shape[1], :img.shape[2]].copy_(img)
        m[:img.shape[1], :img.shape[2]] = False
    return batch, mask


def images_and_mask(samples, mask=None):
    """The model's inputs as a (B, 3, H, W) float batch and its (B, H, W) bool mask, True on padding, from a list of
    (3, H, W) images (padded here) or a batch with its mask (None: no padding); a usage error for anything else."""
    if isinstance(samples, (list, tuple)):
        return batch_images(list(samples))
    check_image_tensor(samples, 'images', 4)
    if mask is None:
        mask = torch.zeros(samples.shape[0], *samples.shape[2:], dtype=torch.bool, device=samples.device)
    check_mask(mask, samples)
    return samples, mask


def check_image_tensor(images, what, dims):
    """A usage error unless `images` is a float tensor of `dims` dimensions, 3 channels first."""
    expected = '(3, H, W)' if dims == 3 else '(B, 3, H, W)'
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'{what} is a {type(images).__name__}; expected a {expected} float tensor: read images with '
                        'detr_irpe_datasets.build.make_transforms, or torchvision.transforms.functional.to_tensor and '
                        "normalize with ImageNet's mean and std.")
    if images.dim() != dims or images.shape[-3] != 3:
        raise ValueError(f'{what} has shape {tuple(images.shape)}; expected {expected}: a list of (3, H, W) images, '
                         'or a (B, 3, H, W) batch with its (B, H, W) mask.')
    if not images.is_floating_point():
        raise TypeError(f'{what} is {images.dtype}; the model takes float images normalised as in training (0-1, then '
                        "ImageNet's mean and std: detr_irpe_datasets.build.make_transforms('val', ...)): convert it.")


def check_mask(mask, images):
    """A usage error unless `mask` is the (B, H, W) bool padding mask of (B, 3, H, W) `images`."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        given = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f'mask is {given}; expected a bool tensor, True on padding (transformers\' pixel_mask is the '
                        'opposite, 1 on pixels: pass pixel_mask == 0).')
    expected = (images.shape[0], *images.shape[2:])
    if mask.shape != expected:
        raise ValueError(f'mask has shape {tuple(mask.shape)}; expected {tuple(expected)}, the images\' (B, H, W).')


class MLP(nn.Module):
    """A few fully connected layers with ReLU between them (the box head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=True):
        super().__init__()
        hidden_dim = transformer.d_model
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples=None, mask=None, features=None):
        """samples: a list of (3, H_i, W_i) images, or a (B, 3, H, W) batch with its (B, H, W) padding mask; or,
        instead, features: a backbone.FrozenFeatures, the backbone's output for a batch computed elsewhere (in a
        data loader worker: --backbone_in_workers).

        Returns pred_logits (B, Q, num_classes + 1), pred_boxes (B, Q, 4) normalised cxcywh, and
        aux_outputs (the same for every decoder layer but the last) when aux_loss is on.
        """
        if features is not None:
            features, feature_mask, pos = self.backbone.with_position(features.features, features.mask)
        else:
            features, feature_mask, pos = self.backbone(*images_and_mask(samples, mask))
        hs = self.transformer(self.input_proj(features), feature_mask, self.query_embed.weight, pos)[0]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1]}
        if self.aux_loss:
            out['aux_outputs'] = [{'pred_logits': a, 'pred_boxes': b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


def resolve_num_classes(args):
    if getattr(args, 'num_classes', None):
        return args.num_classes
    dataset = getattr(args, 'dataset_file', 'coco')  # DETR's dataset where no data flags were parsed
    if dataset in DEFAULT_NUM_CLASSES:
        return DEFAULT_NUM_CLASSES[dataset]
    raise ValueError(f'--dataset_file {dataset!r} has no default number of classes: pass '
                     '--num_classes (largest category id + 1).')


def build_detector(args):
    """(model, postprocessors) on args.device: what inference needs. Downloads nothing unless
    --backbone_weights imagenet is asked for."""
    rpe_config = rpe_config_from_string(args.enc_rpe2d)
    model = DETR(build_backbone(args), build_transformer(args, rpe_config), num_classes=resolve_num_classes(args),
                 num_queries=args.num_queries, aux_loss=args.aux_loss)
    return model.to(torch.device(args.device)), {'bbox': PostProcess()}


def build_model(args):
    """(model, criterion, postprocessors) as in DETR, on args.device."""
    model, postprocessors = build_detector(args)
    criterion = build_criterion(args, resolve_num_classes(args))
    return model, criterion.to(torch.device(args.device)), postprocessors
