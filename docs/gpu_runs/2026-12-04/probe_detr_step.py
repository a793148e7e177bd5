"""Why detr_step_cuda_vs_cpu's backbone gradients differed on CUDA: one config's worst gradient error (CUDA float32
vs CPU float64, over CPU float32's) with cuDNN on / off, padded / same-size images, and how many pre-ReLU
activations are exactly 0 on each device. Run from the repository root: python3 docs/gpu_runs/2026-12-04/probe_detr_step.py"""
import copy
import json
import sys

import torch

sys.path.insert(0, '.')
from detr_irpe.lab import gpu_check as G  # noqa: E402


def zeros_before_relu(model, images):
    """Exact zeros entering the backbone's ReLUs (the layer inputs of torchvision's blocks)."""
    count = [0, 0]

    def hook(module, inputs):
        count[0] += int((inputs[0] == 0).sum())
        count[1] += inputs[0].numel()
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return count


def worst(sizes, cudnn):
    images, targets = G.batch(sizes, 'cpu')
    model, criterion = G.tiny_detr('rpe-2.0-euc-bias-0-qk', '--attention_impl', 'sdpa')
    with G.float32_exact(cudnn=cudnn):
        _, _, g64 = G.loss_and_grads(copy.deepcopy(model).double(), copy.deepcopy(criterion).double(),
                                     [i.double() for i in images],
                                     [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets])
        _, _, g32 = G.loss_and_grads(model, criterion, images, targets)
        gm, gc = copy.deepcopy(model).cuda(), copy.deepcopy(criterion).cuda()
        gi, gt = G.batch(sizes, 'cuda')
        _, _, gg = G.loss_and_grads(gm, gc, gi, gt)
        zeros = {'cpu': zeros_before_relu(model, images), 'cuda': zeros_before_relu(gm, gi)}
    rel = {n: (gg[n].double() - g64[n]).norm().item() / max(g64[n].norm().item(), 1e-300) for n in g64}
    rel_cpu = {n: (g32[n].double() - g64[n]).norm().item() / max(g64[n].norm().item(), 1e-300) for n in g64}
    name = max(rel, key=rel.get)
    return {'sizes': sizes, 'cudnn': cudnn, 'worst_parameter': name, 'cuda_rel_error': rel[name],
            'cpu_rel_error': rel_cpu[name], 'exact_zeros_before_relu': zeros}


for sizes in ([(96, 128), (80, 112)], [(96, 128), (96, 128)]):
    for cudnn in (True, False):
        print(json.dumps(worst(sizes, cudnn)), flush=True)
