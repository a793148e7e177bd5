"""Pre-train a small ResNet-18 backbone on the built-in synthetic shapes, the way COCO DETR starts from
ImageNet weights, and save it as a state dict that `--backbone resnet18 --backbone_weights PATH` loads.

    .venv/bin/python tools/pretrain_backbone.py            # writes outputs/synthetic_resnet18.pth
    .venv/bin/python tools/pretrain_backbone.py --output configs/weights/synthetic_resnet18.pth  # the shipped file

By default it writes under outputs/ (relative to the current folder), so that a try never replaces the weights
configs/demo.yaml (`make demo`) loads; regenerating those takes the explicit --output above.

What is trained: the ResNet-18 stem, layer1, layer2, layer3 and the stride-2 projection shortcut of layer4
(`layer4.0.downsample`), so the output keeps ResNet-18's 512 channels and stride 32. The 3x3 residual
branches of layer4 (8.4M of ResNet-18's 11.2M parameters) are left out to keep the file small: in the saved
state dict their convolutions are zero and the frozen batch norms closing them (`layer4.*.bn2`, and `bn1`)
have zero scale, so each layer4 block reduces exactly to its shortcut (block 0: relu(bn(conv1x1 stride 2)),
block 1: identity on the non-negative input). Zero tensors are stored as one expanded element, so the file
holds about 2.9M float16 numbers (~6 MB); it loads as a complete resnet18 body.

Objective: dense, CenterNet-like (Zhou et al. 2019) on the stride-32 output: per class a centre heatmap
(Gaussian bumps, penalty-reduced focal loss), and at each object's centre cell the sub-cell offset and the log
box size. This makes the features say "which shape is centred here and how big it is" -- what DETR's encoder
and decoder then read. Images come from datasets.synthetic's generator (all 8 shapes, 1-4 objects, sizes
0.15-0.5 of the side; seeds disjoint from the demo's train/val splits), JPEG round-tripped like the dataset on
disk, normalised with the ImageNet mean/std like DETR's transforms and flipped at random; by default at the
demo's 128 px (--scales can mix input sizes). Batch norm trains here and is saved as the statistics
FrozenBatchNorm2d reads. Everything is seeded. 500 steps of 16 images: about 10 minutes on 2 idle CPU cores,
about 40 on a loaded one.
"""
import io
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from detr_irpe import UsageError
from detr_irpe.checkpoint import check_output_file, save_checkpoint
from detr_irpe.cli.flags import (MAX_COUNT, MAX_IMAGE_SIDE, MAX_SEED, ArgumentParser, HelpFormatter,
                                 float_range, int_range, non_empty)
from detr_irpe.cli.runner import run_tool
from detr_irpe_datasets.synthetic import SHAPES, make_image
from detr_irpe_datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

PRETRAIN_SPLIT = 7  # datasets.synthetic uses split index 0 (train) and 1 (val); these images are disjoint


def get_parser():
    p = ArgumentParser(description='\n\n'.join(__doc__.split('\n\n')[:3]), formatter_class=HelpFormatter)
    p.add_argument('--output', default='outputs/synthetic_resnet18.pth', type=non_empty,
                   help='where to write the weights (relative to the current folder); the shipped file, '
                        'configs/weights/synthetic_resnet18.pth, is replaced only when named here')
    p.add_argument('--images', type=int_range(1, MAX_COUNT), default=6000,
                   help='distinct pre-training images (kept in memory)')
    p.add_argument('--image_size', type=int_range(32, MAX_IMAGE_SIDE), default=128)
    p.add_argument('--classes', type=int_range(1, len(SHAPES)), default=len(SHAPES))
    p.add_argument('--objects', type=int_range(0, 100), nargs=2, default=[1, 4], metavar=('MIN', 'MAX'))
    p.add_argument('--object_size', type=float_range(0.01, 1), nargs=2, default=[0.15, 0.5],
                   metavar=('MIN', 'MAX'))
    p.add_argument('--scales', type=int_range(32, MAX_IMAGE_SIDE), nargs='+', default=[128],
                   help='each batch is resized to one of these sides (e.g. 128 192 256 for several input sizes)')
    p.add_argument('--steps', type=int_range(1), default=500)
    p.add_argument('--batch_size', type=int_range(1), default=16)
    p.add_argument('--lr', type=float_range(0), default=2e-3)
    p.add_argument('--weight_decay', type=float_range(0), default=1e-4)
    p.add_argument('--seed', type=int_range(0, MAX_SEED), default=0)
    p.add_argument('--threads', type=int_range(1, 4096), default=2)
    p.add_argument('--save_every', type=int_range(0), default=0,
                   help='also write the weights every N steps (0: only at the end)')
    return p


def make_images(args):
    """uint8 images (N, H, W, 3) and, per image, a float array of [class 0.., cx, cy, w, h] in [0, 1]."""
    images, objects = [], []
    for i in range(args.images):
        rng = np.random.default_rng([args.seed, PRETRAIN_SPLIT, i])
        pixels, objs = make_image(rng, args.image_size, args.classes, args.objects, args.object_size)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format='JPEG', quality=95)  # as written to disk by the dataset
        images.append(np.asarray(Image.open(buf).convert('RGB')))
        rows = []
        for category_id, mask in objs:
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            rows.append([category_id - 1, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        rows = np.array(rows, dtype=np.float32).reshape(-1, 5)
        rows[:, 1:] /= args.image_size
        objects.append(rows)
    return np.stack(images), objects


class Net(nn.Module):
    """ResNet-18 up to layer3, then layer4's projection shortcut; a small dense head on top."""

    def __init__(self, num_classes):
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.body = nn.Sequential(OrderedDict(list(r.named_children())[:-3]))  # conv1 .. layer3
        self.down = r.layer4[0].downsample  # conv1x1 stride 2 (256 -> 512) + bn
        self.head = nn.Sequential(nn.Conv2d(512, 128, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(128, num_classes + 4, 1))
        nn.init.constant_(self.head[-1].bias[:num_classes], -2.19)  # prior 0.1 for the heatmap

    def forward(self, x):
        return self.head(F.relu(self.down(self.body(x))))


def targets_for(objects, h, w, num_classes):
    """Heatmap (B, C, h, w), regression targets (B, 4, h, w) and their mask (B, h, w) on the stride-32 grid."""
    B = len(objects)
    heat = torch.zeros(B, num_classes, h, w)
    reg = torch.zeros(B, 4, h, w)
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing='ij')
    for b, rows in enumerate(objects):
        for c, cx, cy, bw, bh in rows.tolist():
            gx, gy = cx * w, cy * h  # centre in cells
            sigma = max(0.35, 0.15 * (bw * w + bh * h))
            bump = torch.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * sigma ** 2))
            i, j = min(int(gy), h - 1), min(int(gx), w - 1)
            bump[i, j] = 1.0
            heat[b, int(c)] = torch.maximum(heat[b, int(c)], bump)
            reg[b, :, i, j] = torch.tensor([gx - j, gy - i, math.log(bw), math.log(bh)])
            mask[b, i, j] = True
    return heat, reg, mask


def focal_loss(logits, heat):
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def export_state_dict(net):
    """A complete torchvision resnet18 body state dict (FrozenBatchNorm2d layout), float16."""
    full = torchvision.models.resnet18(weights=None)
    body = nn.Sequential(OrderedDict(list(full.named_children())[:-2]))
    sd = {}
    trained = {k: v for k, v in net.body.state_dict().items()}
    trained.update({f'layer4.0.downsample.{k}': v for k, v in net.down.state_dict().items()})
    for k, v in body.state_dict().items():
        if k.endswith('num_batches_tracked'):
            continue
        if k in trained:
            sd[k] = trained[k].detach().to(torch.float16).clone()
        elif k.startswith('layer4.'):
            # residual branches of layer4: zero convolutions closed by zero-scale batch norm. The running
            # variance is 1 (so the scale is exactly 0); everything else is 0, stored as one expanded element.
            value = 1.0 if k.endswith('running_var') else 0.0
            sd[k] = torch.full((1,), value, dtype=torch.float16).expand(v.shape)
        else:
            raise KeyError(f'no pre-trained value for {k}')
    return sd


def check_args(args):
    """Raise UsageError for flags that pass their own checks but cannot train together, before any work."""
    if args.batch_size > args.images:
        raise UsageError(f'--batch_size {args.batch_size} is larger than --images {args.images}: a batch draws '
                         f'distinct images; give --batch_size {args.images} or less, or more --images.')
    if args.objects[1] == 0:
        raise UsageError('--objects 0 0 draws images without objects: nothing to learn; give a MAX of 1 or more '
                         '(e.g. --objects 1 4).')
    check_output_file('--output', args.output, 'synthetic_resnet18.pth')


def run(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    images, objects = make_images(args)
    print(f'{len(images)} images generated in {time.time() - t0:.0f}s', flush=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    net = Net(args.classes)
    decay = [p for n, p in net.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in net.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=args.lr)
    warmup = max(1, min(200, args.steps // 10))  # at least 1: under 10 steps, steps // 10 is 0 (a division by 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    net.train()
    running = None
    for step in range(args.steps):
        idx = rng.choice(len(images), args.batch_size, replace=False)
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255
        objs = [objects[i].copy() for i in idx]
        flip = rng.random(args.batch_size) < 0.5
        x[torch.from_numpy(flip)] = x[torch.from_numpy(flip)].flip(-1)
        for o, f in zip(objs, flip):
            if f:
                o[:, 1] = 1 - o[:, 1]
        side = int(rng.choice(args.scales))
        if side != args.image_size:
            x = F.interpolate(x, size=(side, side), mode='bilinear', antialias=True, align_corners=False)
        x = (x - mean) / std
        out = net(x)
        h, w = out.shape[-2:]
        heat, reg, mask = targets_for(objs, h, w, args.classes)
        loss_heat = focal_loss(out[:, :args.classes], heat)
        pred_reg = out[:, args.classes:].permute(0, 2, 3, 1)[mask]
        # mean over the centres' values; 0 for a batch without objects (--objects 0 MAX), whose mean is nan
        loss_reg = F.l1_loss(pred_reg, reg.permute(0, 2, 3, 1)[mask], reduction='sum') / max(1, pred_reg.numel())
        loss = loss_heat + loss_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        vals = np.array([loss_heat.item(), loss_reg.item()])
        running = vals if running is None else 0.98 * running + 0.02 * vals
        if step % 50 == 0 or step == args.steps - 1:
            print(f'step {step:5d}  heatmap {running[0]:.3f}  offset/size {running[1]:.3f}  '
                  f'lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s', flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(net, args.output)
    save(net, args.output)
    print(f'done in {time.time() - t0:.0f}s')


def save(net, output):
    state = export_state_dict(net)
    save_checkpoint(state, output)
    print(f'wrote {output} ({os.path.getsize(output) / 1e6:.1f} MB)', flush=True)


def main(argv=None):
    run_tool(run, argv)
