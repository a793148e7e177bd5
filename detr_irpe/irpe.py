"""Image relative position encoding (iRPE), Wu et al., "Rethinking and Improving Relative Position
Encoding for Vision Transformer", ICCV 2021.

Drop-in compatible with the published tutorial's API:

    from detr_irpe.irpe import get_rpe_config, build_rpe
    config = get_rpe_config(ratio=1.9, method='product', mode='ctx', shared_head=True, skip=0, rpe_on='k')
    rpe_q, rpe_k, rpe_v = build_rpe(config, head_dim=32, num_heads=8)
    attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)   # (B, H, L, L)
    attn = attn + rpe_k(q * head_dim ** -0.5, height=h, width=w)

A relative position (dr, dc) between a query and a key on an height x width map is mapped to a bucket
id; each bucket owns a learned entry of a lookup table. Bias mode adds the entry to the attention
logits; contextual mode (`ctx`) adds x_i . r_bucket(i, j) (Eq. 13-16).
"""
import collections
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

METHODS = ('euc', 'quant', 'cross', 'product')
MODES = {'bias': 'bias', 'ctx': 'contextual', 'contextual': 'contextual'}
INDEX_FUNCS = ('piecewise', 'clip')
RPE_STRING_FORMAT = 'rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}[-clip]'
# A lookup table larger than this many entries is surely a mistyped ratio (it would not fit in memory).
MAX_TABLE_ENTRIES = 1 << 28


class METHOD:
    """Method names, as constants for code written against the published `METHOD` enum."""
    EUCLIDEAN = 'euc'
    QUANT = 'quant'
    CROSS = 'cross'
    PRODUCT = 'product'


@dataclass(frozen=True)
class RPEConfig:
    """Settings of one iRPE table (on queries, keys or values)."""
    ratio: float
    method: str
    mode: str           # 'bias' or 'contextual'
    shared_head: bool
    skip: int = 0       # leading tokens (class tokens) without a position; they share one extra bucket
    index_func: str = 'piecewise'

    @property
    def alpha(self):
        return 1.0 * self.ratio

    @property
    def beta(self):
        return 2.0 * self.ratio

    @property
    def gamma(self):
        return 8.0 * self.ratio

    @property
    def beta_int(self):
        return int(self.beta)

    @property
    def num_buckets(self):
        """Buckets of one table, without the extra bucket of skip tokens."""
        side = 2 * self.beta_int + 1
        return side * side if self.method == 'product' else side


@dataclass(frozen=True)
class RPEConfigs:
    """Which of queries, keys and values carry iRPE; None where not requested."""
    rpe_q: Optional[RPEConfig] = None
    rpe_k: Optional[RPEConfig] = None
    rpe_v: Optional[RPEConfig] = None


def get_rpe_config(ratio=1.9, method='product', mode='ctx', shared_head=True, skip=0, rpe_on='k',
                   index_func='piecewise'):
    """Settings of iRPE on queries, keys and/or values.

    ratio: alpha:beta:gamma = 1:2:8 times ratio; the product method has (2*int(2*ratio)+1)^2 buckets.
    method: 'euc' | 'quant' | 'cross' | 'product'.  mode: 'bias' | 'ctx' ('contextual').
    shared_head: one table for all heads.  skip: leading tokens without a position.
    rpe_on: any of 'q', 'k', 'v'.  index_func: 'piecewise' (Eq. 18) or 'clip' (paper Table 3).
    """
    ratio = _check_ratio(ratio)
    method = _check_choice('method', method.lower() if isinstance(method, str) else method, METHODS)
    if mode not in MODES:
        raise ValueError(f"iRPE mode {mode!r} is not one of {sorted(MODES)}: use 'bias' or 'ctx'.")
    mode = MODES[mode]
    index_func = _check_choice('index_func', index_func, INDEX_FUNCS)
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise ValueError(f'iRPE skip must be a non-negative integer (leading tokens without a position), got {skip!r}.')
    if not isinstance(rpe_on, str) or not rpe_on or set(rpe_on) - set('qkv') or len(set(rpe_on)) != len(rpe_on):
        raise ValueError(f"iRPE rpe_on {rpe_on!r} must name each of 'q', 'k', 'v' at most once, e.g. 'k' or 'qkv'.")
    if mode == 'bias' and 'v' in rpe_on:
        raise ValueError(f"iRPE on values has no bias mode (rpe_on={rpe_on!r}, mode='bias'): "
                         "use mode 'ctx', or leave 'v' out of rpe_on.")
    one = RPEConfig(ratio=ratio, method=method, mode=mode, shared_head=bool(shared_head), skip=skip,
                    index_func=index_func)
    if one.num_buckets > MAX_TABLE_ENTRIES:
        raise ValueError(f'iRPE ratio {ratio} gives {one.num_buckets} buckets per table, which cannot fit in '
                         'memory; the paper uses ratios 1.9 to 3.0.')
    return RPEConfigs(**{f'rpe_{c}': one for c in rpe_on})


def rpe_config_from_string(text):
    """Parse an `--enc_rpe2d` string such as 'rpe-2.0-product-ctx-1-k' (format: RPE_STRING_FORMAT).

    Returns None for the empty string (no iRPE). Raises ValueError quoting the string otherwise.
    """
    if text is None or text == '':
        return None
    fields = text.split('-') if isinstance(text, str) else []
    hint = (f"expected {RPE_STRING_FORMAT}, e.g. 'rpe-2.0-product-ctx-1-k' (ratio a positive number; method "
            f"euc|quant|cross|product; mode bias|ctx; shared_head 0|1; rpe_on any of q, k, v; optional 'clip')")
    if len(fields) not in (6, 7) or fields[0] != 'rpe':
        raise ValueError(f'--enc_rpe2d {text!r} has {len(fields)} dash-separated fields: {hint}.')
    _, ratio, method, mode, shared_head, rpe_on = fields[:6]
    index_func = 'piecewise'
    if len(fields) == 7:
        if fields[6] != 'clip':
            raise ValueError(f"--enc_rpe2d {text!r}: the seventh field must be 'clip', got {fields[6]!r}; {hint}.")
        index_func = 'clip'
    try:
        ratio = float(ratio)
    except ValueError:
        raise ValueError(f'--enc_rpe2d {text!r}: ratio {ratio!r} is not a number; {hint}.') from None
    if shared_head not in ('0', '1'):
        raise ValueError(f'--enc_rpe2d {text!r}: shared_head must be 0 or 1, got {shared_head!r}; {hint}.')
    try:
        return get_rpe_config(ratio=ratio, method=method, mode=mode, shared_head=shared_head == '1', skip=0,
                              rpe_on=rpe_on, index_func=index_func)
    except ValueError as e:
        raise ValueError(f'--enc_rpe2d {text!r}: {e} ({hint})') from None


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f'iRPE ratio must be a finite positive number, got {ratio!r}; the paper uses 1.9 to 3.0.')
    return float(ratio)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'iRPE {name} {value!r} is not one of {list(choices)}.')
    return value


@torch.no_grad()
def piecewise_index(relative_position, alpha, beta, gamma, dtype=torch.int32):
    """The piecewise index function g(x) of Eq. 18.

    g(x) = round(x)                                                         if |x| <= alpha
         = sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))  otherwise
    Rounding is half to even (torch.round); the logarithm is evaluated in float32, as in the published
    code, so that bucket ids (and so published weights) agree exactly.
    """
    rp = relative_position
    near = rp.round() if rp.is_floating_point() else rp
    rp_abs = rp.abs()
    far_abs = (alpha + torch.log(rp_abs / alpha) / math.log(gamma / alpha) * (beta - alpha)).round().clip(max=beta)
    far = torch.sign(rp) * far_abs
    # Casting truncates towards zero: a clipped magnitude beta=3.8 becomes bucket 3.
    return torch.where(rp_abs <= alpha, near.to(far.dtype), far).to(dtype)


@torch.no_grad()
def clip_index(relative_position, beta_int, dtype=torch.int32):
    """The clip index function clip(round(x), -beta_int, beta_int) (paper Table 3)."""
    rp = relative_position
    near = rp.round() if rp.is_floating_point() else rp
    return near.clip(-beta_int, beta_int).to(dtype)


class BoundedCache:
    """Results of a function by argument set, least recently used first out once the tensors held exceed
    max_bytes: DETR's maps change size every batch, and one DC5 map's (L, L) ids take 46 MB."""

    def __init__(self, max_bytes):
        self.max_bytes, self.bytes, self.entries = max_bytes, 0, collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key, compute):
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        self.entries[key] = value
        self.bytes += _nbytes(value)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            self.bytes -= _nbytes(self.entries.popitem(last=False)[1])
        return value

    def clear(self):
        self.entries.clear()
        self.bytes = 0


def _nbytes(value):
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


# Bucket ids and their key-major forms, all devices together.
BUCKET_ID_CACHE = BoundedCache(max_bytes=256 << 20)


def cached_when_eager(function):
    """Cached in BUCKET_ID_CACHE in eager mode; the plain function while torch.compile or torch.export
    traces, so that bucket ids are computed in the graph from the feature map's size (a gather from a small
    table): a cache can hold neither a symbolic (dynamic) height and width nor the tracer's fake tensors."""

    @functools.wraps(function)
    def call(*args):
        if torch.compiler.is_compiling():
            return function(*args)
        return BUCKET_ID_CACHE.get((function.__name__, *args), lambda: function(*args))
    return call


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing: its steps are constants of the graph
def index_steps(index_func, ratio, of):
    """The index function (Eq. 18, or clip) of a non-negative integer n as the integers where it steps up: its
    value at n is the number of steps <= n. of: 'offset' (one coordinate's |dr| or |dc|: product and cross),
    'distance' (round(sqrt(n)) of the squared distance n: euc), 'square' (the squared distance itself: quant).

    Found by bisection on the float32 definition (piecewise_index / clip_index, evaluated on the CPU), which
    rises monotonically to beta_int: bucket ids are then integer comparisons, the same as that definition's on
    every device, and inside a compiled graph they are device ops (no CPU table, no copy to the GPU)."""
    key = (index_func, ratio, of)
    if key not in INDEX_STEPS:
        INDEX_STEPS[key] = _bisect_index_steps(*key)
    return INDEX_STEPS[key]


INDEX_STEPS = {}  # index_steps' results


def _bisect_index_steps(index_func, ratio, of):
    config = RPEConfig(ratio=ratio, method='euc', mode='bias', shared_head=True, index_func=index_func)

    def index(n):
        x = n if of == 'offset' else n.float().sqrt().round() if of == 'distance' else n.float()
        if index_func == 'clip':
            return clip_index(x, config.beta_int, torch.int64)
        return piecewise_index(x, config.alpha, config.beta, config.gamma, torch.int64)
    top = math.ceil(config.gamma) + 2  # index(top) = beta_int: the logarithm reaches beta at gamma
    top = (top + 1) ** 2 if of == 'distance' else top
    levels = torch.arange(1, config.beta_int + 1)
    lo, hi = torch.zeros_like(levels), torch.full_like(levels, top)  # index(lo) < level <= index(hi)
    assert index(torch.tensor([top])).item() == config.beta_int and index(torch.tensor([0])).item() == 0
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        reached = index(mid) >= levels
        lo, hi = torch.where(reached, lo, mid), torch.where(reached, mid, hi)
    return tuple(hi.tolist())


def _stepped(n, steps):
    """sum over steps of (n >= step): index_steps' function of the integers n."""
    out = torch.zeros_like(n)
    for step in steps:
        out = out + (n >= step).to(n.dtype)
    return out


def _axis_buckets(offsets, ratio, index_func):
    """g(x) + beta_int of signed offsets x along one axis: the cross method's buckets, and the product method's
    row or column factor. The index function is odd, g(-x) = -g(x)."""
    beta_int = RPEConfig(ratio=ratio, method='euc', mode='bias', shared_head=True).beta_int
    return torch.sign(offsets) * _stepped(offsets.abs(), index_steps(index_func, ratio, 'offset')) + beta_int


@torch.no_grad()
def offset_bucket_ids(method, height, width, ratio=1.9, index_func='piecewise', device='cpu'):
    """(2 height - 1, 2 width - 1) int64 on device: entry [dr + height - 1, dc + width - 1] is the bucket of the
    relative position (dr, dc), query minus key (Eq. 18-21 as get_bucket_ids_2d documents)."""
    beta_int = RPEConfig(ratio=ratio, method='euc', mode='bias', shared_head=True).beta_int
    dr = torch.arange(-(height - 1), height, device=device)[:, None]
    dc = torch.arange(-(width - 1), width, device=device)[None, :]
    shape = (2 * height - 1, 2 * width - 1)
    if method in ('euc', 'quant'):
        # The paper describes quant as a rank mapping; the published code applies g to the squared distance.
        # We follow the code, so published weights keep their meaning.
        steps = index_steps(index_func, ratio, 'distance' if method == 'euc' else 'square')
        return _stepped(dr * dr + dc * dc, steps) + beta_int
    if method == 'cross_rows':
        return _axis_buckets(dr, ratio, index_func).expand(shape)
    if method == 'cross_cols':
        return _axis_buckets(dc, ratio, index_func).expand(shape)
    if method == 'product':
        return _axis_buckets(dr, ratio, index_func) * (2 * beta_int + 1) + _axis_buckets(dc, ratio, index_func)
    raise ValueError(f"bucket method {method!r} is not one of 'euc', 'quant', 'product', 'cross_rows', "
                     "'cross_cols'.")


@cached_when_eager
def get_bucket_ids_2d(method, height, width, skip=0, ratio=1.9, index_func='piecewise', device='cpu'):
    """Bucket ids of every (query, key) pair of an height x width map in row-major token order.

    method: 'euc' | 'quant' | 'product' | 'cross_rows' | 'cross_cols'.
    Returns (bucket_ids (skip+L, skip+L) int32, num_buckets), with L = height * width. The relative
    position is the query's (row, col) minus the key's. Skip tokens map to one extra bucket whose id is
    the number of buckets of the map. Built on `device` by one gather from offset_bucket_ids' small table;
    cached per argument set (BUCKET_ID_CACHE): the tensor is shared, do not modify it.
    """
    table = offset_bucket_ids(method, height, width, ratio, index_func, device).to(torch.int32)
    # Token t at (row, col) -> row * (2 width - 1) + col: the table's flat index of (dr, dc) is then the
    # query's position minus the key's plus the index of (0, 0). Broadcasts, not repeat_interleave: the ONNX
    # exporter's repeat_interleave mistakes a symbolic repeat count.
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)
    position = (rows * (2 * width - 1) + cols).reshape(-1)
    ids = table.reshape(-1)[position[:, None] - position[None, :] + ((height - 1) * (2 * width - 1) + width - 1)]
    num_buckets = RPEConfig(ratio=ratio, method='product' if method == 'product' else 'euc', mode='bias',
                            shared_head=True).num_buckets
    if skip > 0:
        padded = torch.full((skip + height * width,) * 2, num_buckets, dtype=ids.dtype, device=device)
        padded[skip:, skip:] = ids
        ids, num_buckets = padded, num_buckets + 1
    return ids.contiguous(), num_buckets


@cached_when_eager
def product_factors(height, width, ratio=1.9, index_func='piecewise', device='cpu'):
    """The product method's bucket ids in factors (Eq. 19): (rows (2 height - 1,), cols (2 width - 1,), side) with
    the bucket of a relative position (dr, dc) = rows[dr + height - 1] * side + cols[dc + width - 1], numbered as
    get_bucket_ids_2d numbers them (no skip tokens); int32 on device, cached per argument set."""
    rows, cols = (_axis_buckets(torch.arange(-(n - 1), n, device=device), ratio, index_func).to(torch.int32)
                  for n in (height, width))
    return rows, cols, 2 * RPEConfig(ratio=ratio, method='product', mode='bias', shared_head=True).beta_int + 1


@cached_when_eager
def key_major_ids(bucket_ids, row_stride):
    """out[i, j] = j * row_stride + bucket_ids[j, i], int32 (L, L), contiguous.

    With row_stride 0 these are the transposed bucket ids; with row_stride K they index the flattened
    (L * K) per-key table, so that one gather yields a key-side term already transposed. Cached per
    bucket-id tensor (which get_bucket_ids_2d caches per map size): do not modify the result.
    """
    L = bucket_ids.shape[0]
    offsets = torch.arange(L, dtype=torch.int32, device=bucket_ids.device) * row_stride
    return (bucket_ids.t() + offsets[None, :]).contiguous()


def _map_size(num_tokens, skip, height, width):
    if height is None and width is None:
        side = math.isqrt(max(num_tokens - skip, 0))
        if side * side != num_tokens - skip:
            raise ValueError(f'iRPE got {num_tokens} tokens ({skip} skipped) and no height/width; pass '
                             'height= and width= of the feature map for non-square maps.')
        return side, side
    if height is None or width is None or height * width + skip != num_tokens:
        raise ValueError(f'iRPE got {num_tokens} tokens but height={height}, width={width}, skip={skip}: '
                         'height * width + skip must equal the number of tokens.')
    if isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt):
        return height, width  # a dynamic size under torch.export: int() would fix it to the example's
    return int(height), int(width)


class iRPE(nn.Module):
    """One iRPE lookup table, on queries (rpe_q), keys (rpe_k) or values (rpe_v).

    rpe_q / rpe_k: forward(x (B, H, L, head_dim), height, width) -> (B or 1, H or 1, L, L), the term
        added to the attention logits. Contextual: out[b,h,i,j] = x[b,h,i] . W[:, bucket(i,j)] (Eq. 14-15),
        computed as (x @ W) then an index by bucket: O(L*K*d + L^2), never a per-pair table.
    rpe_v: forward(attn (B, H, L, L), height, width) -> (B, H, L, head_dim), the term added to the
        attention output (Eq. 16): attention weights are summed per bucket, then times the table.
    """

    def __init__(self, head_dim, num_heads, config, rpe_on, method=None):
        super().__init__()
        if rpe_on not in ('q', 'k', 'v'):
            raise ValueError(f"rpe_on must be 'q', 'k' or 'v', got {rpe_on!r}.")
        self.config = config
        self.method = method or config.method
        self.transposed = rpe_on in ('q', 'k')
        self.mode = config.mode
        self.head_dim = head_dim
        self.num_heads = 1 if config.shared_head else num_heads
        self.num_buckets = get_bucket_ids_2d(self.method, 1, 1, config.skip, config.ratio, config.index_func)[1]
        # One tuple: torch 2.11's compile with dynamic=True makes a float attribute (config.ratio) an input of the
        # graph, which the bucket ids, constants of the graph, cannot take; a float inside a tuple stays constant.
        self.id_settings = (self.method, config.skip, config.ratio, config.index_func)
        tables = self.num_heads * self.num_buckets * (1 if self.mode == 'bias' else head_dim)
        if tables > MAX_TABLE_ENTRIES:
            raise ValueError(f'iRPE ratio {config.ratio} needs a lookup table of {tables} entries, which '
                             'cannot fit in memory; the paper uses ratios 1.9 to 3.0.')
        if self.mode == 'bias':
            if not self.transposed:
                raise ValueError("iRPE on values has no bias mode: use mode 'ctx'.")
            self.lookup_table_bias = nn.Parameter(torch.zeros(self.num_heads, self.num_buckets))
        elif self.transposed:
            self.lookup_table_weight = nn.Parameter(torch.zeros(self.num_heads, head_dim, self.num_buckets))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(self.num_heads, self.num_buckets, head_dim))

    def bucket_ids(self, num_tokens, height=None, width=None, device='cpu'):
        """(num_tokens, num_tokens) int32 bucket ids for a map of that size (cached)."""
        method, skip, ratio, index_func = self.id_settings
        height, width = _map_size(num_tokens, skip, height, width)
        return get_bucket_ids_2d(method, height, width, skip, ratio, index_func, torch.device(device))[0]

    def forward(self, x, height=None, width=None, transpose_output=False):
        """transpose_output (rpe_q / rpe_k): return the term transposed, (B, H, L, L) with entry [i, j] =
        x_j . W[:, bucket(j, i)], as the logits need it for rpe_q; computed in that layout, not copied."""
        import rpe_ops
        ids = self.bucket_ids(x.shape[2], height, width, x.device)
        if not self.transposed:
            per_bucket = rpe_ops.rpe_reduce(x, ids, self.num_buckets)          # (B, H, L, K)
            return torch.matmul(per_bucket, self.lookup_table_weight.to(x.dtype))
        per_bucket = self.per_bucket(x)                                         # (B or 1, H, L, K)
        if not transpose_output:
            return rpe_ops.rpe_index(per_bucket, ids)                           # (B, H, L, L)
        # out[i, j] = per_bucket[j, bucket(j, i)]: one gather from the flattened (L * K) row.
        B, H, L, K = per_bucket.shape
        flat = rpe_ops.rpe_index(per_bucket.reshape(B, H, 1, L * K), key_major_ids(ids, K).view(1, L * L))
        return flat.view(B, H, L, L)

    def per_bucket(self, x):
        """rpe_q / rpe_k: (B or 1, H, L, K), x_i . W[:, t] for every token i and bucket t (contextual, Eq. 14-15),
        or the bias table repeated per token (bias); the term of a pair (i, j) is entry [i, bucket(i, j)]."""
        if self.mode == 'bias':
            return self.lookup_table_bias.to(x.dtype)[None, :, None, :].expand(1, self.num_heads, x.shape[2], self.num_buckets)
        return torch.matmul(x, self.lookup_table_weight.to(x.dtype))

    def extra_repr(self):
        c = self.config
        return (f'method={self.method}, mode={self.mode}, ratio={c.ratio}, index_func={c.index_func}, '
                f'num_heads={self.num_heads}, num_buckets={self.num_buckets}, skip={c.skip}')


class iRPE_Cross(nn.Module):
    """The cross method: a rows table and a columns table, whose terms are summed (Eq. 21)."""

    def __init__(self, head_dim, num_heads, config, rpe_on):
        super().__init__()
        self.config = config
        self.rp_rows = iRPE(head_dim, num_heads, config, rpe_on, method='cross_rows')
        self.rp_cols = iRPE(head_dim, num_heads, config, rpe_on, method='cross_cols')

    def forward(self, x, height=None, width=None, transpose_output=False):
        return self.rp_rows(x, height, width, transpose_output).add_(self.rp_cols(x, height, width, transpose_output))


def query_key_terms(rpe_q, rpe_k, q, k, height=None, width=None):
    """rpe_k(q) + rpe_q(k, transpose_output=True): the iRPE terms on keys and on queries of the logits
    (Eq. 14 + 15), both gathered in one pass over the (L, L) pairs (rpe_ops.rpe_index_qk).

    q, k: (B, H, L, head_dim), already scaled. Returns (B or 1, H or 1, L, L), a fresh tensor.
    """
    import rpe_ops
    if isinstance(rpe_q, iRPE_Cross) and isinstance(rpe_k, iRPE_Cross):
        return (query_key_terms(rpe_q.rp_rows, rpe_k.rp_rows, q, k, height, width)
                .add_(query_key_terms(rpe_q.rp_cols, rpe_k.rp_cols, q, k, height, width)))
    per_query, per_key = rpe_k.per_bucket(q), rpe_q.per_bucket(k)
    if per_query.shape[:2] != per_key.shape[:2]:  # mixed settings (not from one get_rpe_config): two passes
        return rpe_k(q, height, width) + rpe_q(k, height, width, transpose_output=True)
    ids_k = rpe_k.bucket_ids(q.shape[2], height, width, q.device)
    ids_q = rpe_q.bucket_ids(k.shape[2], height, width, k.device)
    return rpe_ops.rpe_index_qk(per_query, ids_k, per_key, key_major_ids(ids_q, 0))


def rpe_parameters(model):
    """The iRPE lookup tables of a model. A module built here starts them at zero; DETR's transformer then
    Xavier-initialises them (--rpe_init) and its optimizer decays them (--rpe_weight_decay) by default."""
    return [p for m in model.modules() if isinstance(m, iRPE) for p in m.parameters(recurse=False)]


def build_rpe(config, head_dim, num_heads):
    """[rpe_q, rpe_k, rpe_v] modules for an RPEConfigs (from get_rpe_config); None where not requested."""
    if config is None:
        return [None, None, None]
    modules = []
    for on in 'qkv':
        one = getattr(config, f'rpe_{on}')
        if one is None:
            modules.append(None)
        elif one.method == 'cross':
            modules.append(iRPE_Cross(head_dim, num_heads, one, on))
        else:
            modules.append(iRPE(head_dim, num_heads, one, on))
    return modules
