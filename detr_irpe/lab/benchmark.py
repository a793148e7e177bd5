"""What iRPE costs over plain attention, measured side by side in one run.

    from detr_irpe.lab.benchmark import run
    result = run(quick=False)      # dict of medians and ratios; tools/benchmark.py prints and saves it

Models are compared within one process, taking turns in every repeat, so that a busy spell of the
machine hits all of them alike; the reported times are medians. Peak memory is measured in one fresh
subprocess per model (its VmHWM), since a process's peak cannot be split between models.
Weights are random (--backbone_weights none): times do not depend on them.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import rpe_ops
import rpe_ops.benchmark
from rpe_ops import block_cache
from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.cli.flags import get_model_parser
from detr_irpe.detr import batch_images, build_model
from detr_irpe.export import DetectorOutputs, OnnxDetector, load_pt2
from detr_irpe.irpe import build_rpe, rpe_config_from_string
from detr_irpe.precision import choose_precision

IRPE_K = 'rpe-2.0-product-ctx-1-k'
IRPE_QKV = 'rpe-2.0-product-ctx-1-qkv'
# name: (--enc_rpe2d, encoder attention on torch.nn.MultiheadAttention)
MODELS = {'plain': ('', False), 'irpe_k': (IRPE_K, False), 'irpe_qkv': (IRPE_QKV, False), 'plain_nn_mha': ('', True)}
# the model ratios reported: (model, baseline)
RATIOS = [('irpe_k', 'plain'), ('irpe_qkv', 'plain'), ('plain', 'plain_nn_mha')]
FULL = {'images': [(640, 853), (600, 800)], 'attention_map': (25, 38), 'dc5_image': (640, 853),
        'repeats': 7, 'attention_repeats': 7, 'op_repeats': 10, 'dc5_steps': 2, 'dc5_rounds': 2}
# the rpe_index timings: bucket ids (as the ratios name them), suffix of 'rpe_index_vs_gather' in the result,
# and how the table's summary line names them
OP_CASES = [('irpe ids', '', 'iRPE bucket ids'), ('random ids', '_random_ids', 'random ids')]
# The demo's model (configs/demo.yaml; its backbone trained here): a step in float32 and under bfloat16 autocast tells
# whether --amp's choice on this CPU (detr_irpe.precision) is the faster one.
DEMO_MODEL = ['--backbone', 'resnet18', '--hidden_dim', '128', '--nheads', '8', '--enc_layers', '2', '--dec_layers', '2',
              '--dim_feedforward', '512', '--num_queries', '10', '--enc_rpe2d', IRPE_K]
PARTS = ('models', 'attention', 'op', 'dc5', 'precision')
QUICK = {'images': [(320, 427), (300, 400)], 'attention_map': (12, 16), 'dc5_image': (320, 427),
         'repeats': 3, 'attention_repeats': 5, 'op_repeats': 5, 'dc5_steps': 2, 'dc5_rounds': 1}


def irpe_k_bucket_ids(height, width):
    """The bucket ids ((L, L) int32, L = height * width) and their count K that IRPE_K's encoder layers index
    with on a height x width map: the iRPE-on-keys module's own."""
    _, rpe_k, _ = build_rpe(rpe_config_from_string(IRPE_K), head_dim=32, num_heads=8)
    return rpe_k.bucket_ids(height * width, height, width), rpe_k.num_buckets


class NNMultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention taking the encoder's height/width keywords (and ignoring them)."""

    def forward(self, query, key, value, key_padding_mask=None, height=None, width=None, need_weights=False):
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights)


def build(enc_rpe2d='', nn_mha=False, dilation=False, seed=0):
    """(model, criterion) of DETR-R50 on CPU with random weights; nn_mha: encoder on nn.MultiheadAttention."""
    torch.manual_seed(seed)
    argv = ['--backbone_weights', 'none', '--device', 'cpu', '--enc_rpe2d', enc_rpe2d] + (['--dilation'] if dilation else [])
    model, criterion, _ = build_model(get_model_parser().parse_args(argv))
    if nn_mha:
        for layer in model.transformer.encoder.layers:
            old = layer.self_attn
            layer.self_attn = NNMultiheadAttention(old.embed_dim, old.num_heads, dropout=old.dropout)
            layer.self_attn.load_state_dict(old.state_dict())
    return model, criterion


def sample_batch(sizes, seed=0):
    """Images (3, h, w) and two targets each, reproducibly random."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    targets = [{'labels': torch.randint(1, 91, (2,), generator=g),
                'boxes': torch.cat([0.3 + 0.4 * torch.rand(2, 2, generator=g), 0.1 + 0.2 * torch.rand(2, 2, generator=g)], 1)}
               for _ in sizes]
    return images, targets


def train_step(model, criterion, images, targets):
    """Forward, loss and backward (the optimizer update is the same for every model and left out)."""
    model.train()
    model.zero_grad(set_to_none=True)
    losses = criterion(model(images), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()


def inference(model, images):
    model.eval()
    with torch.no_grad():
        model(images)


def interleaved(cases, repeats, warmup=1, samples=None):
    """Median seconds of each zero-argument callable; in every repeat each case runs once, in turn
    (the order rotating from repeat to repeat, so that no case always follows the same one).
    samples: a dict that receives each case's timed seconds in repeat order (for paired_ratio)."""
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = cases[name]
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    if samples is not None:
        samples.update(times)
    return {name: statistics.median(t) for name, t in times.items()}


def paired_ratio(samples, name, base):
    """Median over repeats of samples[name][r] / samples[base][r]: each ratio of two runs made next to each
    other, so that a spell in which the whole machine ran slower (other jobs, a memory-hungry neighbour)
    cancels out instead of landing on whichever model's median it happened to hit."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


def model_steps(sizes, repeats):
    """Training step and inference of DETR-R50 for every model in MODELS, interleaved."""
    images, targets = sample_batch(sizes)
    models = {name: build(rpe, nn_mha) for name, (rpe, nn_mha) in MODELS.items()}
    samples = {'train_step': {}, 'inference': {}}
    train = interleaved({n: (lambda m=m, c=c: train_step(m, c, images, targets)) for n, (m, c) in models.items()}, repeats,
                        samples=samples['train_step'])
    infer = interleaved({n: (lambda m=m: inference(m, images)) for n, (m, _) in models.items()}, repeats,
                        samples=samples['inference'])
    return {'train_step': train, 'inference': infer}, samples


def precision_steps(repeats):
    """Medians and samples of a training step of the demo's model (batch 8 of 128 px) in float32 and under
    bfloat16 autocast, interleaved."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(get_model_parser().parse_args(['--backbone_weights', 'none', '--device', 'cpu',
                                                                     *DEMO_MODEL]))
    images, targets = sample_batch([(128, 128)] * 8)

    def step(dtype):
        with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
            train_step(model, criterion, images, targets)
    samples = {}
    medians = interleaved({'float32': lambda: step(torch.float32), 'bfloat16': lambda: step(torch.bfloat16)},
                          repeats, samples=samples)
    return medians, samples


def attention_layer(height, width, batch=2, embed_dim=256, heads=8, repeats=7):
    """Encoder self-attention alone, training mode (dropout 0.1), forward + backward, one image padded."""
    torch.manual_seed(0)
    L = height * width
    layers = {name: (NNMultiheadAttention(embed_dim, heads, dropout=0.1) if nn_mha else
                     RPEMultiheadAttention(embed_dim, heads, dropout=0.1, rpe_config=rpe_config_from_string(rpe)))
              for name, (rpe, nn_mha) in MODELS.items()}
    x = torch.randn(L, batch, embed_dim, requires_grad=True)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[1:, -(L // 10):] = True

    def step(layer):
        layer(x, x, x, key_padding_mask=mask, height=height, width=width)[0].sum().backward()
    samples = {}
    return interleaved({n: (lambda m=m: step(m)) for n, m in layers.items()}, repeats, samples=samples), samples


DC5_SCRIPT = '''
import json, resource, sys, time, torch
from rpe_ops import block_cache
from detr_irpe.lab.benchmark import build, sample_batch, train_step
block_cache.install()
name, rpe, h, w, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]))
model, criterion = build(rpe, dilation=True)
images, targets = sample_batch([(h, w)])
times = []
for _ in range(1 + steps):
    start = time.perf_counter()
    train_step(model, criterion, images, targets)
    times.append(time.perf_counter() - start)
peak = max(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) * 1024
print(json.dumps({'name': name, 'step_seconds': times[1:], 'peak_rss_bytes': peak}))
'''


def dc5(image, steps, rounds):
    """DETR-DC5 at batch 1, plain vs iRPE-QKV: one fresh process per model and round, taking turns.

    Returns median step seconds over all timed steps and the largest peak RSS of each model's processes.
    """
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([os.getcwd()] + sys.path)}
    runs = {'plain': [], 'irpe_qkv': []}
    for _ in range(rounds):
        for name in runs:
            proc = subprocess.run([sys.executable, '-c', DC5_SCRIPT, name, MODELS[name][0], str(image[0]), str(image[1]),
                                   str(steps), str(torch.get_num_threads())], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                runs[name].append({'error': f'exit code {proc.returncode}: {proc.stderr.strip()[-500:]}'})
            else:
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for name, results in runs.items():
        ok = [r for r in results if 'error' not in r]
        out[name] = {'step_seconds': statistics.median(t for r in ok for t in r['step_seconds']) if ok else None,
                     'peak_rss_bytes': max(r['peak_rss_bytes'] for r in ok) if ok else None,
                     'errors': [r['error'] for r in results if 'error' in r]}
    return out


def machine():
    return {'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'torch': torch.__version__,
            'cuda': torch.cuda.is_available(), 'rpe_ops_compiled': rpe_ops.build_info()['cpu'],
            'malloc': block_cache.describe(),
            'load_average_1min_start': os.getloadavg()[0]}


def ratio(a, b):
    return None if a is None or b is None else a / b


def run(quick=False, parts=PARTS, threads=None):
    """Every measurement of the issue's table: medians (seconds, bytes) and ratios (ours / baseline).

    threads: torch threads (default: torch's). On a machine shared with other jobs, 1 thread keeps
    the comparison steadier: no thread of a parallel region waits for a descheduled sibling.
    """
    if threads:
        torch.set_num_threads(threads)
    block_cache.install()  # as the tools run: the figures are what training and evaluation see
    cfg = QUICK if quick else FULL
    result = {'machine': machine(), 'quick': quick,
              'sizes': {'images': cfg['images'], 'attention_map': cfg['attention_map'], 'attention_batch': 2,
                        'heads': 8, 'hidden_dim': 256, 'dc5_image': cfg['dc5_image'], 'irpe_k': IRPE_K,
                        'irpe_qkv': IRPE_QKV, 'repeats': cfg['repeats'], 'attention_repeats': cfg['attention_repeats'],
                        'op_repeats': cfg['op_repeats'], 'dc5_steps': cfg['dc5_steps'], 'dc5_rounds': cfg['dc5_rounds']}}
    ratios = {}
    if 'models' in parts:
        steps, samples = model_steps(cfg['images'], cfg['repeats'])
        result['model_seconds'], result['model_samples'] = steps, samples
        for kind in steps:
            ratios[kind] = {f'{a} / {b}': paired_ratio(samples[kind], a, b) for a, b in RATIOS}
    if 'attention' in parts:
        t, samples = attention_layer(*cfg['attention_map'], repeats=cfg['attention_repeats'])
        result['attention_seconds'], result['attention_samples'] = t, samples
        ratios['attention_layer'] = {f'{a} / {b}': paired_ratio(samples, a, b) for a, b in RATIOS}
    if 'op' in parts:
        h, w = FULL['attention_map']
        ids, num_buckets = irpe_k_bucket_ids(h, w)  # K = 81
        ratios['rpe_index'] = {}
        for kind, suffix, _ in OP_CASES:
            op = rpe_ops.benchmark.benchmark(batch=2, heads=8, length=h * w, buckets=num_buckets,
                                             repeats=cfg['op_repeats'], index=ids if kind == 'irpe ids' else None)
            result['rpe_index_vs_gather' + suffix] = {'sizes': op['sizes'], 'median_seconds': op['median_seconds']}
            ratios['rpe_index'][f'gather / rpe_index (fwd+bwd, {kind})'] = op['speedup']['forward_backward']['gather']
            ratios['rpe_index'][f'gather / rpe_index (fwd, {kind})'] = op['speedup']['forward']['gather']
            # the loops chosen on this host against the portable ones (float32)
            loops = rpe_ops.benchmark.benchmark_loops(batch=2, heads=8, length=h * w, buckets=num_buckets,
                                                      repeats=cfg['op_repeats'], ops=('rpe_index',),
                                                      index=ids if kind == 'irpe ids' else None)
            result['cpu_loops' + suffix] = loops
            for k, short in (('forward', 'fwd'), ('forward_backward', 'fwd+bwd')):
                ratios['rpe_index'][f'chosen loops / portable ({short}, {kind})'] = \
                    loops['vs_portable']['rpe_index'][k][loops['loops']]
    if 'dc5' in parts:
        d = dc5(cfg['dc5_image'], cfg['dc5_steps'], cfg['dc5_rounds'])
        result['dc5'] = d
        ratios['dc5'] = {'step irpe_qkv / plain': ratio(d['irpe_qkv']['step_seconds'], d['plain']['step_seconds']),
                         'peak memory irpe_qkv / plain': ratio(d['irpe_qkv']['peak_rss_bytes'], d['plain']['peak_rss_bytes'])}
    if 'precision' in parts:
        t, samples = precision_steps(cfg['repeats'])
        chosen = choose_precision('cpu', amp=True)
        result['precision'] = {'seconds': t, 'samples': samples, 'amp': chosen.describe()}
        ratios['precision'] = {'bfloat16 / float32': paired_ratio(samples, 'bfloat16', 'float32')}
        faster = ratios['precision']['bfloat16 / float32'] < 1
        result['precision']['amp_chose_the_faster'] = faster == (chosen.dtype == torch.bfloat16)
    result['ratios'] = ratios
    result['machine']['load_average_1min_end'] = os.getloadavg()[0]
    result['machine']['host'] = rpe_ops.benchmark.host()  # after the runs: the loops each op chose
    return result


# (section, ratio, target, True when the ratio must stay at or below the target)
TARGETS = [('train_step', 'irpe_k / plain', 1.02, True), ('train_step', 'irpe_qkv / plain', 1.05, True),
           ('train_step', 'plain / plain_nn_mha', 1.00, True), ('inference', 'irpe_k / plain', 1.02, True),
           ('inference', 'irpe_qkv / plain', 1.10, True), ('inference', 'plain / plain_nn_mha', 1.00, True),
           ('attention_layer', 'irpe_k / plain', None, True), ('attention_layer', 'irpe_qkv / plain', None, True),
           ('attention_layer', 'plain / plain_nn_mha', 1.00, True),
           ('rpe_index', 'gather / rpe_index (fwd+bwd, irpe ids)', 3.0, False),
           ('rpe_index', 'gather / rpe_index (fwd, irpe ids)', None, False),
           ('rpe_index', 'gather / rpe_index (fwd+bwd, random ids)', None, False),  # the 3x: on iRPE ids
           ('rpe_index', 'gather / rpe_index (fwd, random ids)', None, False),
           *[('rpe_index', f'chosen loops / portable ({k}, {ids})', 1.15, True)
             for ids in ('irpe ids', 'random ids') for k in ('fwd', 'fwd+bwd')],
           ('dc5', 'step irpe_qkv / plain', 1.15, True), ('dc5', 'peak memory irpe_qkv / plain', 1.10, True),
           ('precision', 'bfloat16 / float32', None, True)]


def describe_sizes(result):
    """One line: the sizes and repeats of the parts that ran (each part has its own repeats)."""
    s = result['sizes']
    # results saved before the per-part repeats were recorded give only 'repeats'
    repeats = {k: s.get(k, s['repeats']) for k in ('attention_repeats', 'op_repeats')}
    parts = []
    if 'model_seconds' in result:
        parts.append(f"DETR-R50 batch of {len(s['images'])} images {' and '.join(f'{h}x{w}' for h, w in s['images'])}, "
                     f"medians of {s['repeats']} interleaved repeats (training step = forward + loss + backward)")
    if 'attention_seconds' in result:
        parts.append(f"attention layer L = {s['attention_map'][0]}x{s['attention_map'][1]}, batch 2, 8 heads, "
                     f"d_model 256, medians of {repeats['attention_repeats']} interleaved repeats")
    if any('rpe_index_vs_gather' + suffix in result for _, suffix, _ in OP_CASES):
        parts.append(f"rpe_index B=2 H=8 L=950 K=81 (the bucket ids of iRPE-K on 25x38, and random ids), medians "
                     f"of {repeats['op_repeats']} repeats")
    if 'dc5' in result:
        steps = f", medians of {s['dc5_steps']} steps in each of {s['dc5_rounds']} fresh processes per model" \
            if 'dc5_steps' in s else ''
        parts.append(f"DC5 batch 1 of {s['dc5_image'][0]}x{s['dc5_image'][1]}{steps}")
    if 'precision' in result:
        parts.append(f"the demo's model (ResNet-18, 2+2 layers of 128, iRPE-K) batch 8 of 128x128, training step, "
                     f"medians of {s['repeats']} interleaved repeats")
    line = 'Sizes: ' + ('; '.join(parts) or 'no part ran') + '.'
    if 'model_seconds' in result or 'attention_seconds' in result:
        line += (f" iRPE-K = {s['irpe_k']}, iRPE-QKV = {s['irpe_qkv']}. Model and attention ratios: medians of the "
                 "ratios within each repeat.")
    elif 'dc5' in result:
        line += f" iRPE-QKV = {s['irpe_qkv']}."
    return line


def markdown_table(result):
    """The ratios with their targets, then the medians they come from, as Markdown."""
    m = result['machine']
    lines = [rpe_ops.benchmark.describe_host(m['host']) + '.',
             f"Machine: {'CUDA' if m['cuda'] else 'no GPU'}, torch {m['torch']}; load average "
             f"{m['load_average_1min_start']:.1f} at start, {m['load_average_1min_end']:.1f} at end; malloc: {m['malloc']}.",
             describe_sizes(result), '',
             '| measurement | ratio | target | met |', '|---|---|---|---|']
    for section, name, target, at_most in TARGETS:
        value = result['ratios'].get(section, {}).get(name)
        if section not in result['ratios']:
            continue
        shown = 'n/a' if value is None else f'{value:.3f}'
        goal = '' if target is None else f"{'≤' if at_most else '≥'} {target:.2f}"
        met = '' if target is None or value is None else ('yes' if (value <= target if at_most else value >= target) else 'no')
        lines.append(f'| {section}: {name} | {shown} | {goal} | {met} |')
    if 'model_seconds' in result or 'attention_seconds' in result:
        lines += ['', '| medians | ' + ' | '.join(MODELS) + ' |', '|---|' + '---|' * len(MODELS)]
    for key, label in [('train_step', 'training step (s)'), ('inference', 'inference (s)')]:
        if key in result.get('model_seconds', {}):
            lines.append(f'| {label} | ' + ' | '.join(f"{result['model_seconds'][key][n]:.2f}" for n in MODELS) + ' |')
    if 'attention_seconds' in result:
        lines.append('| attention layer fwd+bwd (ms) | ' + ' | '.join(f"{result['attention_seconds'][n] * 1e3:.0f}" for n in MODELS) + ' |')
    for _, suffix, kind in OP_CASES:
        if 'rpe_index_vs_gather' + suffix in result:
            t = result['rpe_index_vs_gather' + suffix]['median_seconds']['forward_backward']
            lines += ['', f"rpe_index fwd+bwd ({kind}) {t['rpe_index'] * 1e3:.1f} ms, torch.gather "
                          f"{t['gather'] * 1e3:.1f} ms; a fresh (B, H, L, L) tensor written and grad read: "
                          f"{t['memory_floor'] * 1e3:.1f} ms."]
    if 'precision' in result:
        p = result['precision']
        lines += ['', f"{p['amp']}: {'the faster' if p['amp_chose_the_faster'] else 'NOT the faster'} on this host "
                      f"(the demo's model's step: float32 {p['seconds']['float32'] * 1e3:.0f} ms, bfloat16 autocast "
                      f"{p['seconds']['bfloat16'] * 1e3:.0f} ms)."]
    if 'dc5' in result:
        d = result['dc5']
        for name in ('plain', 'irpe_qkv'):
            r = d[name]
            step = 'failed' if r['step_seconds'] is None else f"{r['step_seconds']:.2f} s/step"
            peak = '' if r['peak_rss_bytes'] is None else f", peak RSS {r['peak_rss_bytes'] / 2 ** 30:.2f} GiB"
            lines.append(f"DC5 {name}: {step}{peak}" + (f" ({'; '.join(r['errors'])})" if r['errors'] else '') + '.')
    return '\n'.join(lines)


# DETR's evaluation sizes, as in docs/performance.md.
BENCHMARK_SIZES = ((640, 853), (600, 800))


@torch.no_grad()
def time_against_pytorch(model, path, fmt, sizes=BENCHMARK_SIZES, repeats=5, threads=0):
    """Median seconds of one inference on a padded batch of random images of `sizes`: {'exported': ...,
    'pytorch': ...} (the exported file through onnxruntime or the loaded .pt2 program, and `model` eagerly),
    taking turns in every repeat (interleaved), with `threads` CPU threads (0: default)."""
    generator = torch.Generator().manual_seed(0)
    images, mask = batch_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])
    if threads > 0:
        torch.set_num_threads(threads)
    model = DetectorOutputs(model).eval()
    if fmt == 'onnx':
        exported = OnnxDetector(path, threads)
    else:
        exported = load_pt2(path).module()
    return interleaved({'exported': lambda: exported(images, mask), 'pytorch': lambda: model(images, mask)}, repeats)
