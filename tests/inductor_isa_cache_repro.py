"""Minimal reproduction: torch.compile's CPU flex_attention with a score_mod that reads captured tensors,
compared with the same attention written out. Prints {"max_error": ...} as JSON.

    python tests/inductor_isa_cache_repro.py               # inductor's cache in TORCHINDUCTOR_CACHE_DIR or its default
    python tests/inductor_isa_cache_repro.py --per-cpu     # the folder detr_irpe picks for this CPU ISA

torch 2.14.1, AVX-512 host: run it with ATEN_CPU_CAPABILITY=avx2, then without, sharing one
TORCHINDUCTOR_CACHE_DIR: the second run reuses code tiled for the other ISA and is wrong (errors ~1, or
"index out of bounds" from the generated C++). With --per-cpu both runs are right.
"""
import json
import sys

import torch

if '--per-cpu' in sys.argv:
    from detr_irpe.inductor_cache import use_cache_per_cpu
    use_cache_per_cpu()
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

B, H, L, D, K = 2, 2, 42, 16, 5
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
values = torch.randn(L, K, generator=g)
ids = torch.randint(0, K, (L, L), dtype=torch.int32, generator=g)
padding = torch.zeros(B, L, dtype=torch.bool)
padding[1, -9:] = True


def score_mod(score, b, h, q_idx, kv_idx):
    score = score + values[q_idx, ids[q_idx, kv_idx]]
    return torch.where(padding[b, kv_idx], float('-inf'), score)


out = torch.compile(flex_attention, dynamic=False)(q, k, v, score_mod=score_mod)
logits = q @ k.transpose(-1, -2) * D ** -0.5 + values.gather(1, ids.long())
expected = logits.masked_fill(padding[:, None, None, :], float('-inf')).softmax(-1) @ v
print(json.dumps({'max_error': (out - expected).abs().max().item()}))
