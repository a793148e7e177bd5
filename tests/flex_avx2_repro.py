"""Minimal reproduction: torch 2.14.1's CPU flex_attention in AVX2 code, one score_mod term read per (batch,
head) from a captured (B, H, L, K) tensor at [b, h, q_idx, ids[q_idx, kv_idx]], 24 tokens, the last 6 of the
second image padded. Prints {"max_error": ...} against the attention written out, as JSON.

    ATEN_CPU_CAPABILITY=avx2 python tests/flex_avx2_repro.py    # errors ~1 or nan in some runs, not in others
    python tests/flex_avx2_repro.py                             # AVX-512 host: ~5e-7 every run

So detr_irpe.flex refuses flex attention on CPUs where torch runs no AVX-512 code.
"""
import json

import torch
from torch.nn.attention.flex_attention import flex_attention

from detr_irpe.inductor_cache import use_cache_per_cpu

use_cache_per_cpu()
B, H, L, D, K = 2, 2, 24, 16, 9
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
values = torch.randn(B, H, L, K, generator=g)
ids = torch.randint(0, K, (L, L), dtype=torch.int32, generator=g)
padding = torch.zeros(B, L, dtype=torch.bool)
padding[1, -6:] = True


def score_mod(score, b, h, q_idx, kv_idx):
    score = score + values[b, h, q_idx, ids[q_idx, kv_idx]]
    return torch.where(padding[b, kv_idx], float('-inf'), score)


out = torch.compile(flex_attention, dynamic=False)(q, k, v, score_mod=score_mod)
logits = q @ k.transpose(-1, -2) * D ** -0.5 + values.gather(3, ids.long().expand(B, H, L, L))
expected = logits.masked_fill(padding[:, None, None, :], float('-inf')).softmax(-1) @ v
print(json.dumps({'max_error': (out - expected).abs().max().item()}))
