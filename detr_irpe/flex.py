"""Fused iRPE attention with torch.nn.attention.flex_attention: the iRPE terms on queries and keys are
added inside the attention kernel, so no (B, H, L, L) iRPE tensor exists.

The logit of a query i and a key j is (as RPEMultiheadAttention writes it)
    q_i . k_j + rpe_k(q)[i, j] + rpe_q(k)[j, i]          (Eq. 14 + 15; q, k scaled by d^-0.5)
where rpe_k(q)[i, j] = per_query[i, bucket(i, j)], per_query = q @ W_k (B, H, L, K) in contextual mode and
the bias table W_k (H, K) itself in bias mode; rpe_q reads per_key = k @ W_q at [j, bucket(j, i)]. The
score_mod below gathers those entries per (i, j) from the (L, K) per-bucket values and the (L, L) bucket
ids; a padded key gets -inf.

What flex cannot do, the SDPA/explicit path of RPEMultiheadAttention does: iRPE on values (its term
needs the attention weights, which flex_attention does not produce), attention dropout (flex_attention
has none) and returning the weights. On CPU, torch's FlexAttention has a forward only (no backward) and
is slower than that path, so `auto` uses it on CUDA for large maps only, and on CPU it runs only when asked for.
"""
import functools

import torch

from detr_irpe.irpe import iRPE_Cross

from torch.nn.attention.flex_attention import flex_attention

ATTENTION_IMPLS = ('auto', 'sdpa', 'flex', 'triton')
# The dtypes torch's FlexAttention compiles for on CPU.
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Its CUDA kernels multiply with tl.dot, which needs at least 16 columns.
MIN_CUDA_HEAD_DIM = 16
# auto takes flex on CUDA from this many tokens: on an H200 it lost to SDPA at C5 (~900 tokens) and won at
# DC5 (~3300), where SDPA's (B, H, L, L) iRPE terms also double peak memory (docs/gpu_check.md).
MIN_AUTO_FLEX_TOKENS = 2048


def attention_impl_problem(attention_impl, rpe_config=None):
    """Why an attention implementation cannot compute iRPE as rpe_config (an RPEConfigs, or None) asks, or None:
    unknown, flex without torch.nn.attention.flex_attention, flex with iRPE on values, triton with the cross
    method. The layer raises it (check_attention_impl); the command line says it as a usage error."""
    if attention_impl not in ATTENTION_IMPLS:
        return (f'attention_impl {attention_impl!r} is not one of {list(ATTENTION_IMPLS)}: use --attention_impl '
                'auto (flex on CUDA where it applies, SDPA otherwise), sdpa, flex or triton.')
    if attention_impl == 'triton':
        from detr_irpe.triton_attention import settings_problem
        return settings_problem(*(() if rpe_config is None else (rpe_config.rpe_q, rpe_config.rpe_k,
                                                                  rpe_config.rpe_v)))
    if attention_impl != 'flex':
        return None
    if rpe_config is not None and rpe_config.rpe_v is not None:
        return ("--attention_impl flex cannot apply iRPE on values (rpe_on has 'v'): that term sums the attention "
                'weights per bucket, and flex_attention does not produce the weights. Use --attention_impl auto or '
                "sdpa, or leave 'v' out of --enc_rpe2d's rpe_on.")
    return None


def check_attention_impl(attention_impl, rpe_config=None):
    """Raise ValueError with attention_impl_problem's message, if any."""
    problem = attention_impl_problem(attention_impl, rpe_config)
    if problem is not None:
        raise ValueError(problem)


def use_flex(attention_impl, q, rpe_q, rpe_k, rpe_v, need_weights, dropout_p):
    """Whether RPEMultiheadAttention.forward runs flex_irpe_attention (True) or its SDPA/explicit path.

    q: (B, H, L, head_dim). auto: on CUDA, at least MIN_AUTO_FLEX_TOKENS tokens, head_dim at least
    MIN_CUDA_HEAD_DIM, iRPE on queries or keys (without, SDPA's own kernels are the fused attention), none on
    values, no weights asked for and no dropout. flex: always, but for need_weights (the explicit path gives
    them); attention dropout in training is an error.
    """
    if attention_impl == 'sdpa' or need_weights:
        return False
    if attention_impl == 'auto':
        return (flex_attention is not None and q.is_cuda and q.shape[-2] >= MIN_AUTO_FLEX_TOKENS
                and q.shape[-1] >= MIN_CUDA_HEAD_DIM and rpe_v is None and dropout_p == 0.0
                and (rpe_q is not None or rpe_k is not None))
    if dropout_p > 0.0:
        raise ValueError(f'--attention_impl flex has no attention dropout (dropout {dropout_p} in training): use '
                         '--dropout 0, or --attention_impl auto (SDPA, with dropout, while training).')
    return True


def cpu_refusal():
    """Why flex attention cannot run on this CPU, or None: it needs AVX-512 code (ATEN_CPU_CAPABILITY included)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == 'AVX512':
        return None
    return (f'flex attention on CPU needs AVX-512 (torch runs {capability} code here): the AVX2 code of torch '
            '2.14.1 computes some flex attentions wrong, differently from run to run (tests/flex_avx2_repro.py). '
            'Use --attention_impl auto or sdpa on this CPU.')


def per_bucket_values(part, x):
    """(B or 1, H or 1, L or 1, K): entry [b, h, i, t] is the logit term of token i against any token in
    bucket t. Contextual: x_i . W[:, t] (x @ W); bias: the table itself, (1, H or 1, 1, K)."""
    if part.mode == 'bias':
        return part.lookup_table_bias.to(x.dtype)[None, :, None, :]
    return part.per_bucket(x)


def irpe_score_mod(rpe_q=None, rpe_k=None, q=None, k=None, height=None, width=None, key_padding_mask=None):
    """A flex_attention score_mod(score, b, h, q_idx, kv_idx) that adds rpe_k(q)[b, h, q_idx, kv_idx] +
    rpe_q(k)[b, h, kv_idx, q_idx] to the score and puts -inf at padded keys.

    q, k: (B, H, L, head_dim), both scaled by head_dim^-0.5 (as the explicit path feeds rpe_k and rpe_q);
    key_padding_mask: (B, L) bool, True on padding, or None. Skip tokens are in the bucket ids.
    The captured tensors are (L, K) per-bucket values and (L, L) int32 bucket ids; the score_mod also
    evaluates densely on broadcast index grids (b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (L, 1), kv_idx (L,)).
    """
    terms = []  # (per-bucket values (B|1, H|1, L|1, K), bucket ids (L, L), whether on queries (transposed))
    for module, x, on_queries in ((rpe_k, q, False), (rpe_q, k, True)):
        if module is None:
            continue
        for part in (module.rp_rows, module.rp_cols) if isinstance(module, iRPE_Cross) else (module,):
            terms.append((per_bucket_values(part, x), part.bucket_ids(x.shape[2], height, width, x.device), on_queries))

    def score_mod(score, b, h, q_idx, kv_idx):
        for values, ids, on_queries in terms:
            # Index 0 along a broadcast dimension (shared head, bias table): decided once, when flex traces this.
            bb = b if values.shape[0] > 1 else 0
            hh = h if values.shape[1] > 1 else 0
            if on_queries:   # rpe_q: the key's values against the query, at bucket(j, i)
                row = kv_idx if values.shape[2] > 1 else 0
                score = score + values[bb, hh, row, ids[kv_idx, q_idx]]
            else:            # rpe_k: the query's values against the key, at bucket(i, j)
                row = q_idx if values.shape[2] > 1 else 0
                score = score + values[bb, hh, row, ids[q_idx, kv_idx]]
        if key_padding_mask is not None:
            score = torch.where(key_padding_mask[b, kv_idx], float('-inf'), score)
        return score

    return score_mod


def flex_irpe_attention(q, k, v, rpe_q=None, rpe_k=None, key_padding_mask=None, height=None, width=None):
    """softmax(q k^T + iRPE terms, -inf at padded keys) v in one flex_attention kernel.

    q: (B, H, L, d) already scaled by d^-0.5 (RPEMultiheadAttention.project); k, v: (B, H, L, d) unscaled;
    key_padding_mask: (B, L) True on padding, or None. Returns (B, H, L, d).
    """
    if q.is_cuda and q.shape[-1] < MIN_CUDA_HEAD_DIM:
        raise ValueError(f'flex attention on CUDA needs a head dimension of at least {MIN_CUDA_HEAD_DIM}, got '
                         f'{q.shape[-1]} (--hidden_dim / --nheads): use --attention_impl auto or sdpa, or fewer heads.')
    if not q.is_cuda:
        if q.dtype not in CPU_DTYPES:
            raise ValueError(f'flex attention on CPU runs in {[str(t) for t in CPU_DTYPES]}, got {q.dtype}: use '
                             '--attention_impl sdpa for other dtypes.')
        tables = [p for m in (rpe_q, rpe_k) if m is not None for p in m.parameters()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in [q, k, v] + tables):
            raise NotImplementedError('flex attention on CPU has a forward only (torch FlexAttention has no CPU '
                                      'backward): run it under torch.no_grad(), or train with --attention_impl '
                                      'auto or sdpa on CPU.')
        if cpu_refusal() is not None:
            raise NotImplementedError(cpu_refusal())
    score_mod = irpe_score_mod(rpe_q, rpe_k, q, k * q.shape[-1] ** -0.5, height, width, key_padding_mask)
    run = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention(q.is_cuda)
    return run(q, k, v, score_mod=score_mod, scale=1.0)


@functools.lru_cache(maxsize=None)
def compiled_flex_attention(cuda, backend='inductor'):
    """torch.compile(flex_attention): uncompiled it materialises the whole (B, H, L, L) scores.

    On CUDA, dynamic shapes from the first call: DETR's maps change size every batch, and each static
    size (like each precision) is a recompile, up to dynamo's limit of 8, past which flex runs uncompiled.
    One compile then serves every size of a precision, so training (autocast) and evaluation (float32)
    hold two. On CPU, static shapes (one compile per size): torch 2.14.1's inductor writes C++ that does
    not compile for a dynamic-size flex_attention whose score_mod reads a captured tensor at q_idx.
    """
    return torch.compile(flex_attention, dynamic=cuda, backend=backend)
