"""The checks of tools/gpu_check.py (detr_irpe/cli/gpu_check.py), each a function(device, quick) returning
{'passed': ..., ...}, registered in CHECKS; the helpers the benchmarks share (gpu_benchmarks.py); running one part
and the report."""
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

# the checkout: setup.py builds rpe_ops in place there
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

IRPE_K = 'rpe-2.0-product-ctx-1-k'
IRPE_QKV = 'rpe-2.0-product-ctx-1-qkv'
METHODS = ('euc', 'quant', 'cross', 'product')
# check name -> function(device, quick) returning {'passed': bool, ...}, in running order (filled by @check)
CHECKS = {}
# op results against their reference, rtol per dtype (atol 4x): summation order in float32, one half-type ulp
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# detr_step_cuda_vs_cpu: CUDA float32's gradient error (to float64) may be this many times CPU float32's: two
# summation orders' rounding errors differ by a small factor, a wrong term by orders of magnitude
GRAD_ERROR_FACTOR = 16


def check(name):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


class Skip(Exception):
    """A check that does not apply here (the reason is its message)."""


# --- building ------------------------------------------------------------------------------------

def build_extension(device):
    """`python setup.py build_ext --inplace` with the installed torch: the CPU op (the CUDA kernels are Triton's,
    compiled at first use). Returns {'passed', 'seconds', 'log_tail'}, or None in an installed package (no
    setup.py beside it: its op was built at install)."""
    if not os.path.isfile(os.path.join(ROOT, 'setup.py')):
        return None
    print('building rpe_ops in place (python setup.py build_ext --inplace) ...', flush=True)
    env = dict(os.environ)
    env.setdefault('MAX_JOBS', str(os.cpu_count() or 4))
    start = time.time()
    proc = subprocess.run([sys.executable, 'setup.py', 'build_ext', '--inplace'], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    log = (proc.stdout + proc.stderr)[-4000:]
    return {'passed': proc.returncode == 0, 'seconds': round(time.time() - start, 1),
            'log_tail': log if proc.returncode else log[-600:]}


# --- helpers ---------------------------------------------------------------------------------------

def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def tiny_args(enc_rpe2d, *extra):
    from detr_irpe.cli.flags import get_model_parser
    return get_model_parser().parse_args(
        ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '64', '--nheads', '4',
         '--enc_layers', '2', '--dec_layers', '2', '--dim_feedforward', '64', '--num_queries', '10',
         '--dropout', '0', '--device', 'cpu', '--enc_rpe2d', enc_rpe2d, *extra])


def tiny_detr(enc_rpe2d, *extra):
    """(model, criterion) of a small DETR with iRPE, on CPU, random weights (seed 0)."""
    from detr_irpe import build_model
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(enc_rpe2d, *extra))
    return model.train(), criterion.train()


def batch(sizes, device, seed=0):
    from detr_irpe.lab.benchmark import sample_batch
    images, targets = sample_batch(sizes, seed)
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def loss_and_grads(model, criterion, images, targets, precision=None, forward=None):
    """The weighted loss (float), its weighted terms and each parameter's gradient (float32, on CPU), the
    forward (forward(images), default model(images)) under precision's autocast (default: none)."""
    model.zero_grad(set_to_none=True)
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        outputs = (forward or model)(images)
    losses = criterion(upcast(outputs), targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    terms = {k: v.item() for k, v in losses.items() if k in criterion.weight_dict}  # not class_error: it is discrete
    return loss.item(), terms, grads


def upcast(outputs):
    """DETR's outputs with float16 / bfloat16 tensors in float32 (the loss is computed in float32, as the training
    loop does); float32 and float64 as they are."""
    def one(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return {k: one(v) if torch.is_tensor(v) else [{n: one(x) for n, x in d.items()} for d in v]
            for k, v in outputs.items()}


def gradient_cosine(a, b):
    """cos(a, b) of two flat gradients, summed in float64 and clamped to [-1, 1]: float32 sums of millions of
    products err by up to ~1e-3 relative, the dot product and the two norms each its own way, so their ratio can
    exceed 1 (docs/robustness.md)."""
    a, b = a.double(), b.double()
    return max(-1.0, min(1.0, (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()))


def relative_errors(grads, reference):
    """Per parameter ||g - g_ref|| / ||g_ref||, with ||g_ref|| floored at 1e-6 of the largest gradient norm
    (a gradient that is zero up to rounding has no meaningful relative error)."""
    floor = 1e-6 * max(g.norm().item() for g in reference.values())
    return {n: (grads[n] - g).norm().item() / max(g.norm().item(), floor) for n, g in reference.items()}


def against_float64(terms, grads, terms64, grads64, cpu_grads):
    """How far a float32 step (its loss terms and gradients) lies from the same step in float64, measured against
    CPU float32's own distance: (worst loss term's relative error, worst parameter, its gradient's distance to
    float64 over GRAD_ERROR_FACTOR x CPU float32's plus float32's epsilon of the whole gradient's norm). Float32
    in another summation order errs like CPU float32; a real difference (a dropped term, a wrong bucket, a stale
    buffer) by a term's size. A gradient small next to its summed terms has a large relative error on any device,
    so no fixed relative bound fits all."""
    loss_error = max(abs(terms[k] - v) / max(abs(v), 1e-6) for k, v in terms64.items())
    slack = torch.finfo(torch.float32).eps * torch.cat([g.flatten() for g in grads64.values()]).norm().item()
    ratios = {n: (grads[n].double() - g64).norm().item() / (
        GRAD_ERROR_FACTOR * (cpu_grads[n].double() - g64).norm().item() + slack) for n, g64 in grads64.items()}
    name = max(ratios, key=ratios.get)
    return loss_error, name, ratios[name]


def timed(fn, device):
    """Seconds of fn(): CUDA events on CUDA (the GPU's own clock), perf_counter on CPU."""
    if device == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def interleaved(cases, device, repeats, warmup):
    """Median seconds of each callable; each repeat runs every case once, the order rotating."""
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(warmup + repeats if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds = timed(cases[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def float32_exact(cudnn=True):
    """No TF32 in matmuls and convolutions and no cuDNN autotuning: CUDA float32 then rounds as CPU float32 does
    (the fp32_precision settings of torch 2.9+, or allow_tf32 before them). cudnn=False: no cuDNN at all."""
    backends = torch.backends
    if hasattr(getattr(backends.cudnn, 'conv', None), 'fp32_precision'):
        settings = [(backends.cuda.matmul, 'fp32_precision', 'ieee'), (backends.cudnn.conv, 'fp32_precision', 'ieee'),
                    (backends.cudnn.rnn, 'fp32_precision', 'ieee')]  # conv and rnn alike, or torch refuses to read them
    else:
        settings = [(backends.cuda.matmul, 'allow_tf32', False), (backends.cudnn, 'allow_tf32', False)]
    settings += [(backends.cudnn, 'benchmark', False), (backends.cudnn, 'enabled', cudnn)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
    try:
        for owner, name, value in settings:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def op_cases(quick):
    """(name, (B, H), index (Lq, Lk) int32, K, index_t, Kt) on CPU: iRPE's own bucket ids with a skip token on a padded
    map, random ids with Lq != Lk, and K beyond one CUDA shared-memory tile (48 KiB: 12,288 float32 or 6,144
    float64 accumulators)."""
    from detr_irpe.irpe import build_rpe, get_rpe_config
    g = torch.Generator().manual_seed(0)
    config = get_rpe_config(ratio=2.0, method='product', mode='ctx', shared_head=True, skip=1, rpe_on='k')
    _, rpe_k, _ = build_rpe(config, head_dim=8, num_heads=2)
    h, w = (5, 7) if quick else (13, 21)
    ids = rpe_k.bucket_ids(1 + h * w, h, w)  # one skip token: its own bucket
    K = rpe_k.num_buckets
    lq, lk = (6, 40) if quick else (24, 700)
    big_k, big_lk = 13000, (64 if quick else 1000)
    return [('irpe_ids_skip_1', (2, 2), ids, K, ids.t().contiguous(), K),
            ('random_lq_ne_lk', (2, 3), torch.randint(0, 11, (lq, lk), generator=g, dtype=torch.int32), 11,
             torch.randint(0, 5, (lq, lk), generator=g, dtype=torch.int32), 5),
            ('k_over_one_tile', (1, 1), torch.randint(0, big_k, (3, big_lk), generator=g, dtype=torch.int32), big_k,
             torch.randint(0, big_k + 7, (3, big_lk), generator=g, dtype=torch.int32), big_k + 7)]


# --- checks ----------------------------------------------------------------------------------------

@check('extension')
def check_extension(device, quick):
    """The compiled op loads, and on CUDA the Triton kernels can run."""
    import rpe_ops
    info = rpe_ops.build_info()
    shown = {k: v for k, v in info.items() if k in ('cpu', 'cuda', 'torch', 'import_error')}
    if not info['cpu']:
        return {'passed': False, 'build_info': shown, 'error': 'rpe_ops._C did not load: see the build log'}
    if device == 'cuda' and not info['cuda']:
        from rpe_ops.cuda import triton_problem
        return {'passed': False, 'build_info': shown, 'error': triton_problem()}
    return {'passed': True, 'build_info': shown}


@check('op_matches_reference')
def check_op(device, quick):
    """Every op and dtype, forward and the gradients autograd gives: on CUDA against the CPU op, on CPU against
    the torch.gather/scatter_add definitions."""
    import rpe_ops
    ops = {'rpe_index': lambda x, xt, i, K, it, Kt: rpe_ops.rpe_index(x, i),
           'rpe_index_qk': lambda x, xt, i, K, it, Kt: rpe_ops.rpe_index_qk(x, i, xt, it)}
    references = {'rpe_index': lambda x, xt, i, K, it, Kt: rpe_ops.reference_rpe_index(x, i),
                  'rpe_index_qk': lambda x, xt, i, K, it, Kt: rpe_ops.reference_rpe_index_qk(x, i, xt, it)}
    reduces = {'rpe_reduce': lambda v, i, K, it, Kt: (rpe_ops.rpe_reduce(v, i, K),),
               'rpe_reduce_qk': lambda v, i, K, it, Kt: rpe_ops.rpe_reduce_qk(v, i, K, it, Kt)}
    reduce_refs = {'rpe_reduce': lambda v, i, K, it, Kt: (rpe_ops.reference_rpe_reduce(v, i, K),),
                   'rpe_reduce_qk': lambda v, i, K, it, Kt: rpe_ops.reference_rpe_reduce_qk(v, i, K, it, Kt)}
    g = torch.Generator().manual_seed(1)
    failures, compared = [], 0
    for case, (B, H), index, K, index_t, Kt in op_cases(quick):
        Lq, Lk = index.shape
        for dtype, tol in TOLERANCES.items():
            x = torch.randn(B, H, Lq, K, generator=g).to(dtype)
            xt = torch.randn(B, H, Lk, Kt, generator=g).to(dtype)
            values = torch.randn(B, H, Lk, Lq, generator=g).to(dtype).transpose(2, 3)  # strided, as a transpose
            grad = torch.randn(B, H, Lq, Lk, generator=g).to(dtype)

            def on(t):
                return t.to(device)

            def leaf(t, where):
                return t.detach().clone().to(where).requires_grad_()
            for name in ops:
                ref_fn = ops[name] if device == 'cuda' else references[name]  # the CPU op is the CUDA op's reference
                got_in = [leaf(x, device), leaf(xt, device)]
                ref_in = [leaf(x, 'cpu'), leaf(xt, 'cpu')]
                got = ops[name](*got_in, on(index), K, on(index_t), Kt)
                ref = ref_fn(*ref_in, index, K, index_t, Kt)
                got.backward(on(grad))
                ref.backward(grad)
                pairs = [('forward', got, ref), ('grad input', got_in[0].grad, ref_in[0].grad)]
                if name == 'rpe_index_qk':
                    pairs.append(('grad input_t', got_in[1].grad, ref_in[1].grad))
                for what, a, b in pairs:
                    compared += 1
                    if not torch.allclose(a.detach().cpu().double(), b.detach().double(), rtol=tol, atol=4 * tol):
                        failures.append(f'{name} {what} {case} {dtype}: max error '
                                        f'{(a.detach().cpu().double() - b.detach().double()).abs().max().item():.3g}')
            for name in reduces:
                ref_fn = reduces[name] if device == 'cuda' else reduce_refs[name]
                got = reduces[name](on(values), on(index), K, on(index_t), Kt)
                ref = ref_fn(values, index, K, index_t, Kt)
                for a, b in zip(got, ref):
                    compared += 1
                    if not torch.allclose(a.cpu().double(), b.double(), rtol=tol, atol=4 * tol):
                        failures.append(f'{name} {case} {dtype}: max error '
                                        f'{(a.cpu().double() - b.double()).abs().max().item():.3g}')
    return {'passed': not failures, 'compared': compared, 'failures': failures[:20],
            'reference': 'the CPU op' if device == 'cuda' else 'torch.gather / scatter_add'}


@check('gradcheck_float64')
def check_gradcheck(device, quick):
    import rpe_ops
    g = torch.Generator().manual_seed(2)
    index = torch.randint(0, 7, (5, 6), generator=g, dtype=torch.int32).to(device)
    index_t = torch.randint(0, 4, (5, 6), generator=g, dtype=torch.int32).to(device)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    cases = {'rpe_index': (lambda x: rpe_ops.rpe_index(x, index), (leaf(1, 2, 5, 7),)),
             'rpe_reduce': (lambda v: rpe_ops.rpe_reduce(v, index, 7), (leaf(1, 2, 5, 6),)),
             'rpe_index_qk': (lambda x, xt: rpe_ops.rpe_index_qk(x, index, xt, index_t),
                              (leaf(1, 2, 5, 7), leaf(1, 2, 6, 4))),
             'rpe_reduce_qk': (lambda v: rpe_ops.rpe_reduce_qk(v, index, 7, index_t, 4), (leaf(1, 2, 5, 6),))}
    # nondet_tol: the CUDA reductions sum with atomics, so two backward passes may differ in the last bits
    results = {name: bool(torch.autograd.gradcheck(fn, inputs, raise_exception=False, nondet_tol=1e-10))
               for name, (fn, inputs) in cases.items()}
    return {'passed': all(results.values()), 'ops': results}


@check('compile_sees_op')
def check_compile(device, quick):
    """torch.compile(fullgraph=True) of a function of all four ops: one graph holding them, equal to eager,
    gradients included. Inductor, except --quick on CPU (aot_eager: the same capture, no C++ build)."""
    import rpe_ops
    from torch._dynamo.backends.registry import lookup_backend
    backend_name = 'aot_eager' if (quick and device == 'cpu') else 'inductor'
    seen = set()

    def recording(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        return lookup_backend(backend_name)(gm, example_inputs)

    g = torch.Generator().manual_seed(3)
    L, K = 30, 9
    index = torch.randint(0, K, (L, L), generator=g, dtype=torch.int32).to(device)
    index_t = index.t().contiguous()

    def fn(x, xt):
        logits = rpe_ops.rpe_index(x, index) + rpe_ops.rpe_index_qk(x, index, xt, index_t)
        weights = logits.softmax(-1)
        a, b = rpe_ops.rpe_reduce_qk(weights, index, K, index_t, K)
        return (rpe_ops.rpe_reduce(weights, index, K) * a).sum() + b.square().sum()

    def run(f):
        x = torch.randn(2, 2, L, K, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
        xt = torch.randn(2, 2, L, K, generator=torch.Generator().manual_seed(5)).to(device).requires_grad_()
        out = f(x, xt)
        out.backward()
        return out.detach(), x.grad, xt.grad

    torch._dynamo.reset()
    expected = run(fn)
    got = run(torch.compile(fn, backend=recording, fullgraph=True))
    ops = sorted(s for s in seen if s.startswith('rpe_ops.'))
    close = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, expected))
    return {'passed': close and len(ops) == 4, 'backend': backend_name, 'ops_in_graph': ops, 'equal_to_eager': close}


@check('detr_step_cuda_vs_cpu')
def check_detr_step(device, quick):
    """A small DETR's float32 training step on CUDA and on CPU, each against the same step in float64 on CPU, for
    every method and mode (bias on q and k, contextual on q, k and v, shared and per-head tables alternating).
    Passes when CUDA's loss terms lie within 1e-4 of float64's and its gradients within against_float64's bound.
    cuDNN is off: with it, on an H200, the weight gradients of ResNet's stride-2 3x3 convolutions differed from
    float64 by 1.3% with TF32 off, padded or not, where CUDA's own convolutions agree to 3e-6 (docs/gpu_check.md)."""
    if device != 'cuda':
        raise Skip('compares CUDA with CPU: run with --device cuda')
    images, targets = batch([(96, 128), (80, 112)], 'cpu')  # two sizes: padding
    images64 = [i.double() for i in images]
    targets64 = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    results, passed = {}, True
    configs = [(m, mode) for m in METHODS for mode in ('bias', 'ctx')]
    with float32_exact(cudnn=False):
        for i, (method, mode) in enumerate(configs[:2] if quick else configs):
            rpe = f"rpe-2.0-{method}-{mode}-{i % 2}-{'qk' if mode == 'bias' else 'qkv'}"
            model, criterion = tiny_detr(rpe, '--attention_impl', 'sdpa')  # flex: its own check
            _, terms64, grads64 = loss_and_grads(copy.deepcopy(model).double(), copy.deepcopy(criterion).double(),
                                                 images64, targets64)
            _, _, cpu_grads = loss_and_grads(model, criterion, images, targets)
            gpu_images, gpu_targets = batch([(96, 128), (80, 112)], 'cuda')
            _, terms, grads = loss_and_grads(copy.deepcopy(model).cuda(), copy.deepcopy(criterion).cuda(),
                                             gpu_images, gpu_targets)
            loss_error, name, ratio = against_float64(terms, grads, terms64, grads64, cpu_grads)
            ok = loss_error <= 1e-4 and ratio <= 1
            scale = max(grads64[name].norm().item(), 1e-300)
            worst = {where: (g[name].double() - grads64[name]).norm().item() / scale
                     for where, g in (('cuda', grads), ('cpu', cpu_grads))}
            results[rpe] = {'loss_rel_error': loss_error, 'worst_error_over_bound': ratio, 'worst_parameter': name,
                            'worst_rel_error_cuda': worst['cuda'], 'worst_rel_error_cpu': worst['cpu'], 'passed': ok}
            passed = passed and ok
    return {'passed': passed, 'reference': 'the same step in float64 on CPU',
            'worst_loss_rel_error': max(r['loss_rel_error'] for r in results.values()),
            'worst_grad_error_over_bound': max(r['worst_error_over_bound'] for r in results.values()),
            'configs': results}


@check('cuda_graph_step_matches_float64')
def check_cuda_graphs(device, quick):
    """--compile reduce-overhead: a small DETR with iRPE-K, its forward and backward replayed as CUDA graphs
    (torch.compile's cudagraph trees), stepped as compiled_steps_against_float64 steps it."""
    if device != 'cuda':
        raise Skip('CUDA graphs need CUDA: run with --device cuda')
    from detr_irpe.engine import cudagraph_skips
    before = cudagraph_skips()
    # dynamic from the first call: one compile for both shapes (train.py's second shape recompiles as dynamic)
    steps = compiled_steps_against_float64(
        'cuda', lambda model: torch.compile(model, mode='reduce-overhead', dynamic=True))
    skips = cudagraph_skips() - before
    torch._dynamo.reset()  # frees the graphs' memory pool
    return {'passed': all(s['passed'] for s in steps) and skips == 0, 'reference': 'the same steps in float64 on CPU',
            'cudagraph_skips': skips, 'steps': steps}


def compiled_steps_against_float64(device, compile_model):
    """A training step of a small DETR with iRPE-K, compile_model(model) on device, on each of four batches padded
    as --size_divisibility 32 pads them: two of one shape (a recorded graph replayed on new data), one of another
    (new recordings), the first shape again; each against the same step in float64 on CPU as
    detr_step_cuda_vs_cpu judges it (against_float64, cuDNN off). A stale input, an output overwritten by a later
    replay or a graph replayed for another shape errs by a term's size. Returns one result per step."""
    from detr_irpe.detr import batch_images

    def padded(forward):
        return lambda images: forward(*batch_images(images, 32))
    model, criterion = tiny_detr(IRPE_K, '--attention_impl', 'sdpa')
    model64, criterion64 = copy.deepcopy(model).double(), copy.deepcopy(criterion).double()
    on_device, device_criterion = copy.deepcopy(model).to(device), copy.deepcopy(criterion).to(device)
    compiled = padded(compile_model(on_device))
    steps = []
    with float32_exact(cudnn=False):
        for sizes, seed in [([(90, 120), (70, 100)], 0), ([(90, 120), (70, 100)], 1), ([(120, 90), (100, 60)], 2),
                            ([(90, 120), (70, 100)], 3)]:  # canvases 96x128, 96x128, 128x96, 96x128
            images, targets = batch(sizes, 'cpu', seed)
            _, terms64, grads64 = loss_and_grads(
                model64, criterion64, [i.double() for i in images],
                [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets],
                forward=padded(model64))
            _, _, cpu_grads = loss_and_grads(model, criterion, images, targets, forward=padded(model))
            _, terms, grads = loss_and_grads(on_device, device_criterion, *batch(sizes, device, seed),
                                             forward=compiled)
            loss_error, name, ratio = against_float64(terms, grads, terms64, grads64, cpu_grads)
            steps.append({'sizes': sizes, 'loss_rel_error': loss_error, 'worst_error_over_bound': ratio,
                          'worst_parameter': name, 'passed': loss_error <= 1e-4 and ratio <= 1})
    return steps


@check('flex_matches_explicit')
def check_flex(device, quick):
    """The encoder attention through flex_attention (--attention_impl flex) against the SDPA/explicit path with the
    same weights, padded keys: forward, and on CUDA the gradients (torch's FlexAttention has no CPU backward)."""
    from detr_irpe.attention import RPEMultiheadAttention
    from detr_irpe.flex import cpu_refusal
    if device == 'cpu' and cpu_refusal() is not None:
        raise Skip(cpu_refusal())
    from detr_irpe.irpe import rpe_config_from_string
    torch._dynamo.reset()  # each score_mod compiles anew; earlier checks' compiles must not use up the recompile limit
    # iRPE-K (the default), bias on both sides per head, and cross's two tables; the CPU suite has every method
    configs = ['rpe-2.0-product-ctx-1-k', 'rpe-2.0-product-bias-0-qk', 'rpe-2.0-cross-ctx-1-qk']
    h, w = (5, 6) if quick else (19, 25)
    L, B, E = h * w, 2, 64
    backward = device == 'cuda'
    results, passed = {}, True
    for rpe in configs[:1] if quick else configs:
        torch.manual_seed(0)
        explicit = RPEMultiheadAttention(E, 4, rpe_config=rpe_config_from_string(rpe), attention_impl='sdpa').to(device)
        flex = RPEMultiheadAttention(E, 4, rpe_config=rpe_config_from_string(rpe), attention_impl='flex').to(device)
        flex.load_state_dict(explicit.state_dict())
        x = torch.randn(L, B, E, generator=torch.Generator().manual_seed(1)).to(device)
        mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        mask[1, -(L // 5):] = True
        outputs = {}
        for name, layer in (('explicit', explicit), ('flex', flex)):
            xi = x.clone().requires_grad_(backward)
            with (contextlib.nullcontext() if backward else torch.no_grad()), float32_exact():
                out = layer(xi, xi, xi, key_padding_mask=mask, height=h, width=w)[0]
                if backward:
                    out.square().sum().backward()
            outputs[name] = (out.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()})
        (out_e, gx_e, gp_e), (out_f, gx_f, gp_f) = outputs['explicit'], outputs['flex']
        forward_error = ((out_f - out_e).abs().max() / out_e.abs().max()).item()
        entry = {'forward_rel_error': forward_error}
        ok = forward_error <= 1e-4
        if backward:
            grads = {'input': gx_f}, {'input': gx_e}
            grads[0].update(gp_f)
            grads[1].update(gp_e)
            errors = relative_errors({k: v.float().cpu() for k, v in grads[0].items() if v is not None},
                                     {k: v.float().cpu() for k, v in grads[1].items() if v is not None})
            entry['grad_rel_error'] = max(errors.values())
            ok = ok and entry['grad_rel_error'] <= 1e-3
        results[rpe] = entry
        passed = passed and ok
    return {'passed': passed, 'backward_checked': backward, 'map': [h, w], 'configs': results}


@check('triton_kernels_match_cpu_op')
def check_triton(device, quick):
    """The Triton kernels (the ops' CUDA implementation) against the CPU op and the float64 reference, forward and
    backward, every dtype (rpe_ops.triton_kernels.check_against_cpu): on CUDA as compiled, on CPU under the Triton
    interpreter."""
    from rpe_ops import triton_kernels
    cases = triton_kernels.check_against_cpu(device)
    worst = max(r['bound_ratio'] for r in cases.values())
    return {'passed': worst <= 1, 'worst_error_over_bound': worst,
            'failing': {case: r for case, r in cases.items() if not r['bound_ratio'] <= 1}, 'cases': cases}


# (--enc_rpe2d, map, embed dim, heads) of the triton_attention check: no iRPE; every term with head dim 24 (not a
# power of two), two tiles a row; shared-head keys on a map smaller than a tile; bias mode on queries and keys, values
# alone, keys and values (any method's ids); every term per head with 81 buckets (the product method's factored
# buckets); rows wider than a tile
TRITON_ATTENTION_CONFIGS = [('', (5, 7), 64, 4), ('rpe-1.9-product-ctx-1-qkv', (2, 9), 48, 2),
                            ('rpe-1.9-product-ctx-1-k', (3, 4), 64, 4), ('rpe-2.0-euc-bias-0-qk', (5, 7), 64, 4),
                            ('rpe-2.0-euc-ctx-1-v', (5, 7), 64, 4), ('rpe-1.9-quant-ctx-1-kv', (6, 6), 64, 4),
                            ('rpe-2.0-product-ctx-0-qkv', (5, 7), 64, 4),
                            ('rpe-2.0-product-ctx-1-qkv', (2, 20), 64, 4)]  # image rows wider than a tile
# with the first iRPE-on-values config, the cheapest under the interpreter: the kernels' dropout against F.dropout
# with their mask
TRITON_DROPOUT = 0.3


@check('triton_attention_matches_explicit')
def check_triton_attention(device, quick):
    """The encoder attention through --attention_impl triton (detr_irpe.triton_attention) against the SDPA/explicit
    path with the same random weights and tables, padded keys: the output and the gradients of the input and of
    every parameter, in float32 and bfloat16, and in float32 with attention dropout (the explicit path dropping
    what the kernels' dropout_mask says they drop; the kept share within 5 sigma of 1 - p) and under
    torch.compile. Each error to the explicit path in float64 must be within GRAD_ERROR_FACTOR times the explicit
    path's own error in that dtype, plus one rounding of the largest entry.
    On CPU the kernels run under the Triton interpreter, in a subprocess (TRITON_INTERPRET=1 from the start)."""
    from detr_irpe import triton_attention
    if triton_attention.triton is None:
        raise Skip('triton is not installed')
    if device == 'cpu' and not triton_attention.INTERPRETING:
        from rpe_ops.triton_kernels import interpreted
        return interpreted('from detr_irpe.lab import gpu_check as g', f'g.check_triton_attention("cpu", {quick})')
    from unittest import mock

    from detr_irpe.attention import RPEMultiheadAttention
    from detr_irpe.irpe import rpe_config_from_string
    configs = TRITON_ATTENTION_CONFIGS[:3] if quick else TRITON_ATTENTION_CONFIGS
    if device == 'cuda' and not quick:  # many tiles each way, DETR's head dim 32
        configs = configs + [(rpe, (19, 25), 128, 4) for rpe in ('rpe-2.0-product-ctx-1-qkv', 'rpe-2.0-euc-ctx-1-qkv')]
    results, worst, share_ok, share, sigma = {}, 0.0, None, None, None
    for rpe, (h, w), E, H in configs:
        L, B = h * w, 2
        g = torch.Generator().manual_seed(0)
        layer = RPEMultiheadAttention(E, H, rpe_config=rpe_config_from_string(rpe), attention_impl='sdpa')
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = torch.randn(L, B, E, generator=g)
        grad = torch.randn(L, B, E, generator=g)
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[1, -(L // 4):] = True

        def run(impl, dtype, dev, dropout=0.0, kept=None, compiled=False):
            one = copy.deepcopy(layer).to(device=dev, dtype=dtype)
            one.attention_impl, one.dropout = impl, dropout
            parameters = list(one.parameters())
            if compiled:  # the kernels run outside the graph (a graph break), the projections inside
                one = torch.compile(one, backend='inductor' if dev == 'cuda' else 'aot_eager')
            xi = x.to(device=dev, dtype=dtype).requires_grad_()
            # the explicit path's F.dropout multiplies by the kernels' mask; the kernels draw their seed from
            # torch's CPU generator, reset to draw the mask's
            drop = (mock.patch.object(torch.nn.functional, 'dropout', lambda t, p, training: t * kept.to(t))
                    if kept is not None and impl == 'sdpa' else contextlib.nullcontext())
            torch.manual_seed(7)
            with float32_exact(), drop:
                out = one(xi, xi, xi, key_padding_mask=mask.to(dev), height=h, width=w)[0]
                grads = torch.autograd.grad(out, [xi] + parameters, grad.to(device=dev, dtype=dtype))
            names = ['output', 'input'] + [n for n, _ in layer.named_parameters()]
            return {n: t.detach().cpu().double() for n, t in zip(names, [out] + list(grads))}

        runs = [(dtype, 0.0, None, False) for dtype in (torch.float32, torch.bfloat16)]
        if 'v' in rpe.split('-')[-1] and share_ok is None:
            torch.manual_seed(7)
            kept = triton_attention.dropout_mask(int(torch.randint(0, 2 ** 31 - 1, ())), B, H, L, TRITON_DROPOUT,
                                                 device).cpu()
            share = (kept > 0).double().mean().item()
            sigma = (TRITON_DROPOUT * (1 - TRITON_DROPOUT) / kept.numel()) ** 0.5
            share_ok = abs(share - (1 - TRITON_DROPOUT)) <= 5 * sigma
            runs += [(torch.float32, TRITON_DROPOUT, kept, False), (torch.float32, 0.0, None, True)]
        for dtype, dropout, kept, compiled in runs:
            exact = run('sdpa', torch.float64, 'cpu', dropout, None if kept is None else kept.double())
            explicit = run('sdpa', dtype, device, dropout, None if kept is None else kept.to(device))
            fused = run('triton', dtype, device, dropout, compiled=compiled)
            ratios = {}
            for name, want in exact.items():
                bound = (GRAD_ERROR_FACTOR * (explicit[name] - want).abs().max()
                         + torch.finfo(dtype).eps * want.abs().max()).item()
                ratios[name] = (fused[name] - want).abs().max().item() / max(bound, torch.finfo(torch.float64).tiny)
            case = (f'{rpe or "plain"} {h}x{w} {str(dtype).split(".")[1]}' + (f' dropout {dropout}' if dropout else '')
                    + (' compiled' if compiled else ''))
            results[case] = {'worst_error_over_bound': max(ratios.values()), 'worst': max(ratios, key=ratios.get)}
            worst = max(worst, max(ratios.values()))
    return {'passed': worst <= 1 and share_ok is True, 'worst_error_over_bound': worst, 'configs': results,
            'dropout_kept_share': share, 'dropout_kept_share_expected': [1 - TRITON_DROPOUT, sigma]}


@check('flex_recompiles')
def check_flex_recompiles(device, quick):
    """flex compiled as detr_irpe.flex compiles it on CUDA (dynamic shapes from the first call): three map sizes,
    each under float32 (evaluation) and bfloat16 autocast (training). Passes when no size after the first
    compiles again. Backend: inductor on CUDA; on CPU aot_eager, dynamo's guards without code generation."""
    from torch._dynamo.backends.registry import lookup_backend

    from detr_irpe.flex import compiled_flex_attention, irpe_score_mod
    from detr_irpe.irpe import build_rpe, rpe_config_from_string
    torch._dynamo.reset()
    graphs = []
    inner = lookup_backend('inductor' if device == 'cuda' else 'aot_eager')

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)
    compiled_flex_attention.cache_clear()
    run = compiled_flex_attention(True, backend=counting)
    rpe_q, rpe_k, _ = build_rpe(rpe_config_from_string('rpe-2.0-product-ctx-1-qk'), 16, 4)
    rpe_q, rpe_k = rpe_q.to(device), rpe_k.to(device)
    sizes = [(5, 6), (7, 4), (6, 9)] if quick else [(25, 34), (23, 38), (50, 67)]
    compiles = []
    for height, width in sizes:
        for training in (True, False):
            L = height * width
            q, k, v = (torch.randn(2, 4, L, 16, device=device) for _ in range(3))
            mask = torch.zeros(2, L, dtype=torch.bool, device=device)
            mask[1, -(L // 5):] = True
            with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=training):
                score_mod = irpe_score_mod(rpe_q, rpe_k, q, k, height, width, mask)
                dtype = torch.bfloat16 if training else torch.float32
                run(q.to(dtype), k.to(dtype), v.to(dtype), score_mod=score_mod, scale=1.0)
            sync(device)
            compiles.append(len(graphs))
    compiled_flex_attention.cache_clear()
    return {'passed': compiles[1] == compiles[-1], 'compiles_after_each_call': compiles,
            'maps': [list(s) for s in sizes]}


@check('amp_step')
def check_amp(device, quick):
    """--amp's precision on this device (and float16 with a GradScaler, the path of GPUs without bfloat16): a
    training step is finite and close to float32 (loss within 5%, gradient direction cosine >= 0.98), and three
    steps of the training loop with its scaler run, at least one not skipped (the scale starts at 2^6)."""
    from detr_irpe import engine
    from detr_irpe.precision import Precision, choose_precision
    chosen = choose_precision(device, amp=True)
    precisions = {'amp (' + str(chosen.dtype).replace('torch.', '') + ')': chosen}
    if chosen.dtype != torch.float16:
        precisions['float16 + GradScaler'] = Precision(device, torch.float16, 'checked as on GPUs without bfloat16')
    sizes = [(64, 80), (48, 80)] if quick else [(256, 320), (224, 320)]
    images, targets = batch(sizes, device)
    model, criterion = tiny_detr(IRPE_K)
    model, criterion = model.to(device), criterion.to(device)
    with float32_exact():
        ref_loss, _, ref_grads = loss_and_grads(model, criterion, images, targets)
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    results, passed = {}, True
    for name, precision in precisions.items():
        loss, _, grads = loss_and_grads(model, criterion, images, targets, precision)
        flat = torch.cat([grads[n].flatten() for n in ref_grads])
        finite = bool(torch.isfinite(flat).all()) and abs(loss) < float('inf')
        cosine = gradient_cosine(flat, flat_ref) if finite else None
        loss_error = abs(loss - ref_loss) / abs(ref_loss)
        # the training loop itself, with this precision and its scaler
        args = tiny_args(IRPE_K, '--amp')
        loop_model = copy.deepcopy(model)
        optimizer = engine.build_optimizer(loop_model, args)
        scaler = precision.grad_scaler(init_scale=2.0 ** 6)
        stats = engine.train_one_epoch(loop_model, criterion, [(images, targets)] * 3, optimizer,
                                       engine.build_lr_scheduler(optimizer, args), device, 0, args,
                                       precision=precision, scaler=scaler)
        loop_finite = all(torch.isfinite(p).all().item() for p in loop_model.parameters())
        trained = stats.get('skipped_steps', 0) < 3
        ok = finite and loss_error <= 0.05 and cosine >= 0.98 and loop_finite and trained
        results[name] = {'dtype': str(precision.dtype), 'loss': loss, 'loss_float32': ref_loss,
                         'loss_rel_error': loss_error, 'grad_cosine': cosine, 'loop_losses': stats.get('loss'),
                         'loop_skipped_steps': stats.get('skipped_steps'), 'passed': ok}
        passed = passed and ok
    return {'passed': passed, 'chosen': chosen.describe(), 'precisions': results}


def free_memory(device):
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()


# --- running and reporting ---------------------------------------------------------------------------

def run_one(fn, device, quick):
    """fn's result dict with 'seconds'; an exception or Skip becomes the result, so the next check still runs."""
    start = time.time()
    try:
        result = fn(device, quick)
    except Skip as e:
        result = {'passed': None, 'skipped': str(e)}
    except Exception as e:  # noqa: BLE001 -- any failure of one check is that check's result
        result = {'passed': False, 'error': f'{type(e).__name__}: {e}'[:1000],
                  'traceback': traceback.format_exc()[-3000:]}
    finally:
        free_memory(device)
    result['seconds'] = round(time.time() - start, 2)
    return result


def summary(result):
    """One table cell saying what a check or benchmark found."""
    if result.get('skipped'):
        return 'skipped: ' + result['skipped']
    if result.get('error'):
        return result['error'].splitlines()[0][:160]
    keys = ('compared', 'failures', 'ops_in_graph', 'worst_loss_rel_error', 'worst_grad_rel_error',
            'worst_grad_error_over_bound', 'worst_error_over_bound', 'ratios',
            'gather / rpe_index', 'flex / sdpa', 'peak_memory irpe_qkv / plain', 'chosen', 'configs', 'precisions',
            'ops', 'build_info')
    shown = {k: result[k] for k in keys if result.get(k) not in (None, [], {})}
    return json.dumps(shown, default=str)[:300]


def markdown(report):
    lines = [f"Device: {report['device']}; torch {report['torch']} (CUDA {report['cuda']}); "
             f"{'quick sizes' if report['quick'] else 'full sizes'}; {report['seconds']:.0f} s in all.", '',
             '| check | result | seconds | details |', '|---|---|---|---|']
    build = report['build']
    if build is not None:
        lines.append(f"| build | {'passed' if build['passed'] else '**FAILED**'} | {build['seconds']:.1f} | "
                     f"{'the CPU op; CUDA runs Triton' if build['passed'] else 'see build.log_tail in the JSON'} |")
    for name, r in report['checks'].items():
        verdict = {True: 'passed', False: '**FAILED**', None: 'skipped'}[r['passed']]
        lines.append(f"| {name} | {verdict} | {r['seconds']:.1f} | {summary(r)} |")
    lines += ['', '| benchmark | result | seconds |', '|---|---|---|']
    for name, r in report['benchmark'].items():
        shown = summary(r) if r.get('error') or r.get('skipped') else json.dumps(
            rounded({k: v for k, v in r.items()
                      if k not in ('seconds', 'images', 'map', 'backward', 'rows', 'cases')}))
        lines.append(f"| {name} | {shown} | {r['seconds']:.1f} |")
    rows = {**report['benchmark'].get('train_steps', {}).get('rows', {}),
            **{f'{k} (host_bound)': v for k, v in report['benchmark'].get('host_bound', {}).get('rows', {}).items()}}
    if rows:
        lines += ['', '| training step | ms | peak GiB | GPU busy | host syncs | GPU events |', '|---|---|---|---|---|---|']
        for row, r in rows.items():
            cells = [f'{r[k]:.3g}' if k in r else '-'
                     for k in ('step_ms', 'peak_gib', 'gpu_busy_share', 'host_syncs_per_step')]
            events = r.get('gpu_events_per_step', r.get('out_of_memory', '-'))
            lines.append(f"| {row} | {' | '.join(cells)} | {events} |")
    return '\n'.join(lines)


def rounded(v):
    """Floats to 4 significant digits, bytes to GiB, all the way down (for the printed table)."""
    if isinstance(v, dict):
        return {k: (round(x / 2 ** 30, 2) if 'bytes' in k and isinstance(x, int) else rounded(x))
                for k, x in v.items()}
    return float(f'{v:.4g}') if isinstance(v, float) else v


def device_name(device):
    if device == 'cuda':
        return torch.cuda.get_device_name() if torch.cuda.is_available() else 'cuda (not available)'
    return f'cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores'
