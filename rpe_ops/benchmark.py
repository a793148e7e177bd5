"""Time rpe_index against torch.gather, side by side in one run.

    from rpe_ops.benchmark import benchmark, benchmark_loops
    result = benchmark()          # DETR encoder size: B=2, H=8, L=25*38, K=81
    result['speedup']             # {'forward': gather/op, 'forward_backward': gather/op}
    benchmark_loops()['vs_portable']   # the CPU loop sets and gather, each time / the portable loops'

The gather baselines are what a user writes without the op: the (L, L) bucket
ids as int64 expanded to (B, H, L, L), once, outside the timed region -- as a
stride-0 view ('gather') and materialized ('gather_contiguous_index'). Their
backward is a scatter_add. Timings are medians over repeats in which the
methods take turns, so a slow spell of the machine hits all of them alike.
"""
import os
import platform
import statistics
import time

import torch

import rpe_ops


def host():
    """The CPU figures come from and what decides its code paths: {'cpu_model', 'cpu_count', 'avx512f',
    'avx512_bf16', 'amx' (None where torch cannot tell), 'torch_cpu_capability' (the kernels torch runs),
    'torch_threads', 'rpe_ops_cpu_loops': rpe_ops.build_info()['cpu_loops'] (None without the extension)}."""
    model, family = platform.processor() or platform.machine(), ''
    try:  # Linux: the marketing name and, for hosts that show only 'AMD EPYC', family and model
        with open('/proc/cpuinfo') as f:
            fields = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get('model name', model)
        family = f" (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    except OSError:
        pass
    cpu = getattr(torch, 'cpu', None)

    def feature(name):
        fn = getattr(cpu, name, None)
        return bool(fn()) if fn is not None else None

    return {'cpu_model': model + family, 'cpu_count': os.cpu_count(), 'avx512f': feature('_is_avx512_supported'),
            'avx512_bf16': feature('_is_avx512_bf16_supported'), 'amx': feature('_is_amx_tile_supported'),
            'torch_cpu_capability': torch.backends.cpu.get_cpu_capability(), 'torch_threads': torch.get_num_threads(),
            'rpe_ops_cpu_loops': rpe_ops.build_info()['cpu_loops']}


def describe_host(h):
    """One line naming the host of a measurement: CPU, deciding features, the rpe_ops CPU loops and why."""
    loops = h['rpe_ops_cpu_loops']
    loops = 'not compiled' if loops is None else f"{loops['loops']} ({loops['reason']})"
    return (f"host: {h['cpu_model']}, {h['cpu_count']} cores ({h['torch_threads']} torch threads); avx512f "
            f"{h['avx512f']}, avx512_bf16 {h['avx512_bf16']}, amx {h['amx']}; torch CPU capability "
            f"{h['torch_cpu_capability']}; rpe_ops CPU loops: {loops}")


def benchmark(batch=2, heads=8, length=25 * 38, buckets=81, dtype=torch.float32, device='cpu',
              repeats=15, warmup=2, seed=0, index=None):
    """Median seconds of forward and forward+backward, op vs gather, and their ratios.

    index: (length, length) int32 bucket ids in [0, buckets); default uniformly random ids
    (real iRPE ids have long runs of one bucket, which helps the op's reduce).
    Also times 'memory_floor': writing a fresh (B, H, L, L) tensor (plus reading
    grad, for forward+backward), which a fresh output from torch's allocator costs.
    """
    g = torch.Generator().manual_seed(seed)
    index_given = index
    if index is None:
        index = torch.randint(0, buckets, (length, length), generator=g, dtype=torch.int32)
    elif index.shape != (length, length) or int(index.max()) >= buckets:
        raise ValueError(f'expected index of shape ({length}, {length}) with ids below {buckets}, got '
                         f'{tuple(index.shape)} with max {int(index.max())}')
    index = index.to(device, torch.int32)
    x = torch.randn(batch, heads, length, buckets, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(batch, heads, length, length, generator=g).to(device, dtype)
    index_bhll = index.long().expand(batch, heads, length, length)
    index_bhll_contiguous = index_bhll.contiguous()
    methods = {
        'rpe_index': lambda: rpe_ops.rpe_index(x, index),
        'gather': lambda: x.gather(3, index_bhll),
        'gather_contiguous_index': lambda: x.gather(3, index_bhll_contiguous),
    }

    def forward(fn):
        with torch.no_grad():
            fn()

    def forward_backward(fn):
        x.grad = None
        fn().backward(grad)

    def write_output():  # allocate and write one (B, H, L, L) tensor: the least any forward costs
        return torch.empty_like(grad).fill_(1)

    cases = {(kind, name): (lambda run=run, fn=fn: run(fn)) for name, fn in methods.items()
             for kind, run in [('forward', forward), ('forward_backward', forward_backward)]}
    # Memory traffic no implementation avoids: forward writes the output, backward also reads grad.
    cases['forward', 'memory_floor'] = write_output
    cases['forward_backward', 'memory_floor'] = lambda: (write_output(), grad.sum())
    times = {case: [] for case in cases}
    for r in range(warmup + repeats):
        for case, run in cases.items():
            seconds = _time(run, device)
            if r >= warmup:
                times[case].append(seconds)
    median = {kind: {name: statistics.median(times[kind, name]) for name in [*methods, 'memory_floor']}
              for kind in ('forward', 'forward_backward')}
    return {
        'sizes': {'B': batch, 'H': heads, 'Lq': length, 'Lk': length, 'K': buckets,
                  'dtype': str(dtype).replace('torch.', ''), 'device': device,
                  'index': 'random' if index_given is None else 'given'},
        'machine': {'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                    'host': host(),
                    'gpu': torch.cuda.get_device_name() if device == 'cuda' else None,
                    'load_average_1min': os.getloadavg()[0],
                    # 1 = huge pages for big tensors: fewer page faults when the (B, H, L, L) outputs are allocated
                    'THP_MEM_ALLOC_ENABLE': os.environ.get('THP_MEM_ALLOC_ENABLE', '0'),
                    'torch': torch.__version__, 'rpe_ops_build': rpe_ops.build_info(),
                    'rpe_ops_block_cache_limit_bytes': rpe_ops.block_cache.stats()['limit_bytes']},
        'repeats': repeats,
        'median_seconds': median,
        # how many times faster rpe_index is than each baseline
        'speedup': {kind: {name: median[kind][name] / median[kind]['rpe_index']
                           for name in methods if name != 'rpe_index'} for kind in median},
        # fraction of rpe_index's time that is the memory floor (1.0: nothing left to gain)
        'floor_fraction': {kind: median[kind]['memory_floor'] / median[kind]['rpe_index'] for kind in median},
    }


def benchmark_qk(batch=2, heads=8, length=25 * 38, buckets=81, dtype=torch.float32, device='cpu',
                 repeats=9, warmup=2, seed=0):
    """The iRPE terms on keys and on queries of self-attention logits, forward + backward: one
    rpe_index_qk (backward: one rpe_reduce_qk) vs two rpe_index passes and an add (backward: two
    rpe_reduce), as the encoder computed them before. Median seconds and their ratio, interleaved.
    """
    g = torch.Generator().manual_seed(seed)
    B, H, L, K = batch, heads, length, buckets
    ids = torch.randint(0, K, (L, L), generator=g, dtype=torch.int32).to(device)
    per_query = torch.randn(B, H, L, K, generator=g).to(device, dtype).requires_grad_()
    per_key = torch.randn(B, H, L, K, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(B, H, L, L, generator=g).to(device, dtype)
    # as detr_irpe.irpe.key_major_ids makes them: bucket_ids[j, i], and j * K + bucket_ids[j, i]
    transposed = ids.t().contiguous()
    flat = (transposed + K * torch.arange(L, dtype=torch.int32, device=device)).view(1, L * L)

    def separate():
        key_term = rpe_ops.rpe_index(per_key.reshape(B, H, 1, L * K), flat).view(B, H, L, L)
        return rpe_ops.rpe_index(per_query, ids).add_(key_term)

    methods = {'rpe_index_qk': lambda: rpe_ops.rpe_index_qk(per_query, ids, per_key, transposed),
               'two_rpe_index_and_add': separate}

    def forward_backward(fn):
        per_query.grad = per_key.grad = None
        fn().backward(grad)

    times = {name: [] for name in methods}
    for r in range(warmup + repeats):
        for name, fn in methods.items():
            seconds = _time(lambda: forward_backward(fn), device)
            if r >= warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {'sizes': {'B': B, 'H': H, 'L': L, 'K': K, 'dtype': str(dtype).replace('torch.', ''), 'device': device},
            'median_seconds_forward_backward': median,
            'speedup': median['two_rpe_index_and_add'] / median['rpe_index_qk']}


def benchmark_loops(batch=2, heads=8, length=25 * 38, buckets=81, repeats=9, warmup=1, seed=0, index=None,
                    ops=('rpe_index', 'rpe_index_qk')):
    """The CPU loop sets side by side: each op's forward and forward+backward (float32) under every set this
    host runs ('portable', and 'avx512' where it runs), forced with rpe_ops.set_cpu_loops, and torch.gather
    (backward: scatter_add) with its int64 index made once, outside the timed region. Median seconds,
    interleaved, and each time / the portable loops' time; 'loops': the set the ops run here unforced.
    """
    g = torch.Generator().manual_seed(seed)
    B, H, L, K = batch, heads, length, buckets
    if index is None:
        index = torch.randint(0, K, (L, L), generator=g, dtype=torch.int32)
    index_t = index.t().contiguous()  # the iRPE-on-queries term's ids, as irpe.key_major_ids makes them
    x = torch.randn(B, H, L, K, generator=g).requires_grad_()
    x_t = torch.randn(B, H, L, K, generator=g).requires_grad_()
    grad = torch.randn(B, H, L, L, generator=g)
    index_bhll, index_t_bhll = index.long().expand(B, H, L, L), index_t.t().long().expand(B, H, L, L)
    calls = {'rpe_index': {'op': lambda: rpe_ops.rpe_index(x, index),
                           'gather': lambda: x.gather(3, index_bhll)},
             'rpe_index_qk': {'op': lambda: rpe_ops.rpe_index_qk(x, index, x_t, index_t),
                              'gather': lambda: x.gather(3, index_bhll) + x_t.gather(3, index_t_bhll).transpose(2, 3)}}
    info = rpe_ops.build_info()['cpu_loops']
    methods = [*info['available'], 'gather']

    def forward(fn):
        with torch.no_grad():
            fn()

    def forward_backward(fn):
        x.grad = x_t.grad = None
        fn().backward(grad)

    times = {(op, kind, m): [] for op in ops for kind in ('forward', 'forward_backward') for m in methods}
    previous = rpe_ops.set_cpu_loops('auto')
    try:
        for r in range(warmup + repeats):
            for op, kind, m in times:
                if m != 'gather':
                    rpe_ops.set_cpu_loops(m)
                fn = calls[op]['gather' if m == 'gather' else 'op']
                seconds = _time(lambda: (forward if kind == 'forward' else forward_backward)(fn), 'cpu')
                if r >= warmup:
                    times[op, kind, m].append(seconds)
    finally:
        rpe_ops.set_cpu_loops(previous)
    median = {key: statistics.median(t) for key, t in times.items()}
    return {'sizes': {'B': B, 'H': H, 'L': L, 'K': K, 'dtype': 'float32'},
            'loops': info['loops'],
            'median_seconds': {op: {kind: {m: median[op, kind, m] for m in methods}
                                    for kind in ('forward', 'forward_backward')} for op in ops},
            'vs_portable': {op: {kind: {m: median[op, kind, m] / median[op, kind, 'portable'] for m in methods}
                                 for kind in ('forward', 'forward_backward')} for op in ops}}


def _time(fn, device):
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start
