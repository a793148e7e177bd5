"""The benchmarks of tools/gpu_check.py (detr_irpe/cli/gpu_check.py): each a function(device, quick) returning a
dict of figures (an 'error' key when a part failed), registered in BENCHMARKS; the checks are in gpu_check.py."""
import json
import traceback
import warnings

import torch

from detr_irpe.lab.gpu_check import IRPE_K, IRPE_QKV, Skip, batch, free_memory, interleaved, rounded, timed

# The training-step tables (docs/gpu_check.md): (row, --enc_rpe2d, --attention_impl, --compile, batch size)
STEP_MODELS = [('plain', '', 'sdpa', None, 2), ('irpe_k sdpa', IRPE_K, 'sdpa', None, 2),
               ('irpe_k flex', IRPE_K, 'flex', None, 2), ('irpe_k triton', IRPE_K, 'triton', None, 2),
               ('irpe_qkv', IRPE_QKV, 'sdpa', None, 2), ('irpe_qkv triton', IRPE_QKV, 'triton', None, 2)]
# Where the host's time goes at batch 2: with the model's kernels replayed as CUDA graphs (torch.compile's
# default mode was 1.57x eager in run 3), and with 4x the images per step
HOST_BOUND_MODELS = [('plain', '', 'sdpa', None, 2), ('plain cuda graphs', '', 'sdpa', 'reduce-overhead', 2),
                     ('irpe_k cuda graphs', IRPE_K, 'sdpa', 'reduce-overhead', 2),
                     ('plain batch 8', '', 'sdpa', None, 8), ('irpe_k batch 8', IRPE_K, 'sdpa', None, 8)]
STEP_TARGETS = {'irpe_k sdpa / plain': 1.03, 'irpe_qkv / plain (DC5)': 1.15, 'irpe_qkv peak / plain (DC5)': 1.5,
                'plain gpu_busy_share': 0.6}
STEP_IMAGES = [(800, 1066), (736, 970)]  # a batch of 2; batch 8 repeats them


def gpu_activity(fn):
    """(kernels and copies run on the GPU, milliseconds it was busy: the union of their intervals, the 10 CPU-side
    ops called most often with their counts) during fn(), from torch.profiler's events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    ops = [e for e in prof.key_averages() if e.device_type != DeviceType.CUDA and e.key.startswith('aten::')]
    top = {e.key: e.count for e in sorted(ops, key=lambda e: -e.count)[:10]}
    return len(spans), covered(spans) / 1e3, top


def covered(spans):
    """Length of the union of (start, end) intervals: time the GPU ran something, overlaps counted once."""
    total, end = 0, None
    for start, stop in sorted(spans):
        if end is None or start >= end:
            total, end = total + stop - start, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total


def bench_train_steps(device, quick):
    """DETR-R50 training steps (forward, loss, backward, AdamW; dropout 0) at C5 and DC5, batch 2 (800x1066 and
    736x970), under --amp's precision: plain, iRPE-K through SDPA, flex and Triton, iRPE-QKV through SDPA/explicit
    and Triton (step_table)."""
    cuda = device == 'cuda'
    # CPU: no flex backward, and the Triton kernels only under the interpreter
    models = STEP_MODELS if cuda else [m for m in STEP_MODELS if m[2] not in ('flex', 'triton')]
    cases = [(m, stage) for stage in ('C5', 'DC5') for m in models
             if cuda or not quick or stage == 'C5' or m[1] != IRPE_K]
    out = step_table(cases, device, quick)
    rows = out['rows']

    def ratio(a, b, key='step_ms'):
        return rows[a][key] / rows[b][key] if key in rows.get(a, {}) and key in rows.get(b, {}) else None
    out['ratios'] = {}
    for row in rows:
        model_name, stage = row.rsplit(' ', 1)
        if model_name != 'plain':
            out['ratios'][f'{model_name} / plain ({stage})'] = ratio(row, f'plain {stage}')
    if cuda:
        for name in ('irpe_qkv', 'irpe_qkv triton'):
            out['ratios'][f'{name} peak / plain (DC5)'] = ratio(f'{name} DC5', 'plain DC5', 'peak_gib')
    out['targets'] = STEP_TARGETS
    return out


def bench_host_bound(device, quick):
    """What holds a batch-2 step on the host: plain and iRPE-K C5 under torch.compile, and at batch 8, beside plain
    at batch 2 (step_table). CUDA only: the GPU's busy share is what it measures."""
    if device != 'cuda':
        raise Skip('measures how busy the GPU is: run with --device cuda')
    return step_table([(m, 'C5') for m in HOST_BOUND_MODELS], device, quick)


def step_table(cases, device, quick):
    """Rows ((name, --enc_rpe2d, --attention_impl, --compile mode or None, batch size), stage C5|DC5) of DETR-R50
    training steps under --amp's precision: every model built and warmed (2 steps; the first compiles), then timed
    in turns (5 rounds, the order rotating, so a slow spell of the host hits all rows alike). Per row: median ms, first
    step s, and on CUDA the peak GiB above the memory held before the step, weights counted (AdamW's moments, held
    between steps, not), the GPU's busy share of the step (kernel time in one profiled step / the median step), its
    GPU events (kernels, copies), how often the host waited for the GPU, and the most called ops.
    An out-of-memory or an error is that row's result (an error fails the benchmark)."""
    from detr_irpe.engine import cudagraph_skips
    from detr_irpe.precision import choose_precision
    cuda = device == 'cuda'
    precision = choose_precision(device, amp=cuda)
    sizes = [(64, 96), (48, 80)] if quick else STEP_IMAGES
    rows, steps = {}, {}
    for (name, rpe, impl, compile_mode, batch_size), stage in cases:
        row = f'{name} {stage}'
        flags = ['--attention_impl', impl, '--enc_rpe2d', rpe] + (['--dilation'] if stage == 'DC5' else [])
        try:
            steps[row] = training_step(flags, compile_mode, batch(sizes * (batch_size // 2), device), precision,
                                       device)
            skips = cudagraph_skips()
            rows[row] = {'first_step_s': timed(steps[row], device)}
            steps[row]()
            if compile_mode == 'reduce-overhead':
                rows[row]['cudagraph_skips'] = cudagraph_skips() - skips
        except Exception as e:  # noqa: BLE001 -- one row's failure is that row's result; the table goes on
            rows[row] = _row_error(e)
            steps.pop(row, None)
        print(f'{row}: warmed', flush=True)
    seconds = interleaved(steps, device, repeats=1 if quick else 5, warmup=0)
    for row, step in steps.items():
        rows[row]['step_ms'] = 1e3 * seconds[row]
        if cuda:
            try:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated() - step.parameter_bytes
                torch.cuda.reset_peak_memory_stats()
                step()
                rows[row]['peak_gib'] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
                events, busy_ms, top_ops = gpu_activity(step)
                rows[row].update(gpu_busy_share=busy_ms / rows[row]['step_ms'], gpu_events_per_step=events,
                                 host_syncs_per_step=host_syncs(step), top_ops=top_ops)
            except Exception as e:  # noqa: BLE001
                rows[row].update(_row_error(e))
        print(json.dumps({row: rounded({k: v for k, v in rows[row].items() if k != 'traceback'})}), flush=True)
    del steps
    torch._dynamo.reset()
    free_memory(device)
    out = {'images': sizes, 'precision': precision.describe(), 'rows': rows}
    failed = [row for row, r in rows.items() if 'error' in r]
    if failed:
        out['error'] = f"rows failed: {', '.join(failed)} (see rows)"
    return out


def _row_error(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {'out_of_memory': str(e).splitlines()[0][:300]}
    return {'error': f'{type(e).__name__}: {e}'[:600], 'traceback': traceback.format_exc()[-2000:]}


def training_step(flags, compile_mode, data, precision, device):
    """step(): one training step as the training loop takes it (padding, then engine.train_step: forward under
    precision's autocast, loss, backward, clipping to --clip_max_norm, AdamW's step) of DETR-R50 with these model
    flags and random weights (seed 0), the model compiled in compile_mode (None: eager), on data = (images, targets);
    gradients dropped after, so that between steps a model holds its weights and AdamW's moments.
    step.parameter_bytes: the weights and buffers."""
    from detr_irpe import build_model, engine
    from detr_irpe.cli.flags import get_model_parser
    from detr_irpe.detr import batch_images
    torch.manual_seed(0)
    args = get_model_parser().parse_args(['--backbone_weights', 'none', '--device', device, '--dropout', '0', *flags])
    model, criterion, _ = build_model(args)
    model, criterion = model.to(device).train(), criterion.to(device).train()
    optimizer, scaler = engine.build_optimizer(model, args), precision.grad_scaler()
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    images, targets = data

    def step():
        inputs = dict(zip(('samples', 'mask'), batch_images(images)))
        engine.train_step(forward, criterion, optimizer, scaler, precision, inputs, targets, args.clip_max_norm)
        model.zero_grad(set_to_none=True)
    step.parameter_bytes = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    return step


def host_syncs(fn):
    """How many times fn() made the host wait for the GPU: torch.cuda.set_sync_debug_mode's warnings (item(),
    tolist(), copies to or from pageable memory, ...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return sum('synchronizing' in str(w.message) for w in caught)


def bench_op(device, quick):
    """rpe_index against torch.gather, forward + backward, on iRPE-K's bucket ids: a 25x42 map (800x1333 / 32)
    and, on CUDA, a DC5 map of 50x84 (L = 4,200)."""
    import rpe_ops.benchmark
    from detr_irpe.lab.benchmark import irpe_k_bucket_ids
    maps = [(8, 10)] if quick else [(25, 42)] + ([(50, 84)] if device == 'cuda' else [])
    out = {'target': 2.0 if device == 'cuda' else 3.0}  # fwd+bwd: #24's on CUDA, docs/performance.md's on CPU
    for h, w in maps:
        ids, K = irpe_k_bucket_ids(h, w)
        result = rpe_ops.benchmark.benchmark(batch=2, heads=8, length=h * w, buckets=K, device=device,
                                             repeats=2 if quick else 15, warmup=1 if quick else 3, index=ids)
        out[f'{h}x{w}'] = {'median_seconds': result['median_seconds'], 'gather / rpe_index': result['speedup']}
        free_memory(device)
    out['gather / rpe_index'] = out[f'{maps[0][0]}x{maps[0][1]}']['gather / rpe_index']
    return out


def bench_flex(device, quick):
    """The encoder attention layer with iRPE-K (dropout 0), flex vs the op path (SDPA with the iRPE term as
    its mask): forward + backward on CUDA, forward on CPU."""
    from detr_irpe.attention import RPEMultiheadAttention
    from detr_irpe.flex import cpu_refusal
    if device == 'cpu' and cpu_refusal() is not None:
        return {'skipped': cpu_refusal()}
    from detr_irpe.irpe import rpe_config_from_string
    torch._dynamo.reset()  # past torch's recompile limit flex would run uncompiled, and this would time that
    h, w = (6, 8) if quick else (25, 42)
    L, B, E = h * w, 2, 256
    layers = {}
    for impl in ('sdpa', 'flex'):
        torch.manual_seed(0)
        layers[impl] = RPEMultiheadAttention(E, 8, rpe_config=rpe_config_from_string(IRPE_K),
                                             attention_impl=impl).to(device)
    x = torch.randn(L, B, E, device=device, requires_grad=device == 'cuda')
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[1, -(L // 10):] = True

    def step(layer):
        if device == 'cuda':
            layer(x, x, x, key_padding_mask=mask, height=h, width=w)[0].sum().backward()
        else:
            with torch.no_grad():
                layer(x, x, x, key_padding_mask=mask, height=h, width=w)
    seconds = interleaved({impl: (lambda m=m: step(m)) for impl, m in layers.items()}, device,
                          repeats=1 if quick else 20, warmup=1 if quick else 3)
    return {'map': [h, w], 'backward': device == 'cuda', 'median_seconds': seconds,
            'flex / sdpa': seconds['flex'] / seconds['sdpa']}


# (BLOCK_M, BLOCK_N, CHUNK, NUM_WARPS) of detr_irpe.triton_attention tried by bench_triton_attention; all compile
# without spills for sm_80 and sm_90, as timed (no dropout; detr_irpe.lab.kernel_resources), and the suite checks the
# default, dropout included, for every GPU
TRITON_ATTENTION_BLOCKS = [(16, 16, 16, 4), (16, 32, 16, 8), (32, 16, 16, 8), (16, 32, 8, 4), (32, 32, 8, 8),
                           (16, 64, 8, 8)]


def bench_triton_attention(device, quick):
    """One encoder attention layer (E 256, 8 heads, batch 2, bfloat16 autocast, padded keys), forward + backward,
    at C5 (25x42) and DC5 (50x84): --attention_impl triton against SDPA/explicit for iRPE-QKV and iRPE-K (flex
    too), beside plain SDPA; ms and peak MiB per case, then Triton's iRPE-QKV at DC5 over the block sizes of
    TRITON_ATTENTION_BLOCKS and with the product method's ids unfactored. CUDA only; on CPU under the Triton
    interpreter (TRITON_INTERPRET=1 from the start), quick, once each, without flex and memory, only to try the
    code."""
    from detr_irpe import triton_attention
    cuda = device == 'cuda'
    if not cuda and not triton_attention.INTERPRETING:
        raise Skip('times the Triton kernels on a GPU: run with --device cuda')
    from detr_irpe.attention import RPEMultiheadAttention
    from detr_irpe.irpe import rpe_config_from_string
    cases = [('plain', '', 'sdpa'), ('irpe_k sdpa', IRPE_K, 'sdpa'), ('irpe_k flex', IRPE_K, 'flex'),
             ('irpe_k triton', IRPE_K, 'triton'), ('irpe_qkv sdpa', IRPE_QKV, 'sdpa'),
             ('irpe_qkv triton', IRPE_QKV, 'triton')]
    cases = cases if cuda else [c for c in cases if c[2] != 'flex']  # no flex backward on CPU
    maps = ([(6, 8)] if cuda else [(3, 5)]) if quick else [(25, 42), (50, 84)]
    # timed runs of each case and of each variant, after a call that compiles; interpreted times mean nothing
    repeats, variant_repeats, warmup = (20, 10, 1) if not quick else (3, 3, 1) if cuda else (1, 1, 0)
    out = {'rows': {}}

    def layer_step(rpe, impl, h, w):
        torch.manual_seed(0)
        layer = RPEMultiheadAttention(256, 8, rpe_config=rpe_config_from_string(rpe), attention_impl=impl).to(device)
        L = h * w
        x = torch.randn(L, 2, 256, device=device, requires_grad=True)
        mask = torch.zeros(2, L, dtype=torch.bool, device=device)
        mask[1, -(L // 10):] = True

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                out = layer(x, x, x, key_padding_mask=mask, height=h, width=w)[0]
            out.float().sum().backward()
        return step

    def peak_mib(step):
        if not cuda:
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20

    for h, w in maps:
        steps = {name: layer_step(rpe, impl, h, w) for name, rpe, impl in cases}
        for step in steps.values():
            step()  # compiles
        seconds = interleaved(steps, device, repeats, warmup)
        for name, step in steps.items():
            out['rows'][f'{name} {h}x{w}'] = {'ms': 1e3 * seconds[name], 'peak_mib': peak_mib(step)}
        free_memory(device)
    # Triton's iRPE-QKV at the largest map under other settings of the module: block sizes (named
    # BLOCK_M x BLOCK_N x CHUNK x NUM_WARPS), and the product method's buckets as any method's ids
    variants = {'x'.join(map(str, blocks)): dict(zip(('BLOCK_M', 'BLOCK_N', 'CHUNK', 'NUM_WARPS'), blocks))
                for blocks in (TRITON_ATTENTION_BLOCKS[:1] if quick else TRITON_ATTENTION_BLOCKS)}
    variants['ids not factored'] = {'FACTOR_PRODUCT': False}
    h, w = maps[-1]
    out[f'irpe_qkv triton {h}x{w} ms'] = timings = {}
    for name, settings in variants.items():
        saved = {k: getattr(triton_attention, k) for k in settings}
        try:
            for k, v in settings.items():
                setattr(triton_attention, k, v)
            step = layer_step(IRPE_QKV, 'triton', h, w)
            step()  # compiles
            timings[name] = 1e3 * interleaved({name: step}, device, variant_repeats, warmup)[name]
        finally:
            for k, v in saved.items():
                setattr(triton_attention, k, v)
    rows = out['rows']
    out['ratios'] = {f'{name} / plain ({h}x{w})': rows[f'{name} {h}x{w}']['ms'] / rows[f'plain {h}x{w}']['ms']
                     for h, w in maps for name, _, _ in cases[1:]}
    return out


# checks' kernels and ops first, the model-sized steps last (DC5 may run the GPU out of memory)
BENCHMARKS = {'op_vs_gather': bench_op, 'flex_vs_op': bench_flex,
              'triton_attention_vs_explicit': bench_triton_attention, 'train_steps': bench_train_steps,
              'host_bound': bench_host_bound}
