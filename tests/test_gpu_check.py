"""tools/gpu_check.py (detr_irpe/cli/gpu_check.py, its checks in detr_irpe/lab/gpu_check.py) run on CPU (--device cpu --quick, no build): its checks, table, JSON and exit status.

The CUDA comparisons themselves need a GPU (`make gpu-check`); here the script proves it runs, that a check
finds a fault, and that one failing check neither stops the others nor passes unnoticed.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'gpu_check.py')
FAST_CHECKS = ['extension', 'op_matches_reference', 'gradcheck_float64', 'compile_sees_op', 'detr_step_cuda_vs_cpu',
               'cuda_graph_step_matches_float64', 'flex_recompiles']
# run by their own tests (tests/test_triton_attention.py at full sizes, which hold the quick run's configs;
# tests/test_triton_kernels.py), each an interpreter subprocess of 15-60 s: not again here
TESTED_DIRECTLY = ['triton_attention_matches_explicit', 'triton_kernels_match_cpu_op']


# As on a bare GPU machine (make gpu-check): `python3 -m detr_irpe.cli.gpu_check` from the checkout with nothing
# installed (the editable install's finder and path hook taken out) and without what those machines lack:
# datasets/ (installed as detr_irpe_datasets), pycocotools, faster_coco_eval.
ABSENT_ON_GPU_MACHINES = ('detr_irpe_datasets', 'pycocotools', 'faster_coco_eval')
BARE = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
        "getattr(f, '__module__', '').startswith('__editable__')]; "
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]; "
        f"sys.modules.update(dict.fromkeys({ABSENT_ON_GPU_MACHINES})); "  # None there: importing them fails
        "runpy.run_module('detr_irpe.cli.gpu_check', run_name='__main__', alter_sys=True)")


def run_script(*argv):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-c', BARE, '--device', 'cpu', '--quick', '--no_build', *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True)


@pytest.fixture(scope='module')
def gpu_check():
    """The checks themselves (detr_irpe/lab/gpu_check.py)."""
    return importlib.import_module('detr_irpe.lab.gpu_check')


@pytest.fixture(scope='module')
def gpu_benchmarks():
    """The benchmarks (detr_irpe/lab/gpu_benchmarks.py)."""
    return importlib.import_module('detr_irpe.lab.gpu_benchmarks')


def test_quick_cpu_run_passes_its_checks_skips_the_cuda_comparison_and_writes_the_report(tmp_path):
    out = tmp_path / 'report.json'
    run = run_script('--checks', *FAST_CHECKS, '--benchmarks', 'op_vs_gather', '--output', str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['torch'] == torch.__version__ and report['device'].startswith('cpu')
    assert list(report['checks']) == FAST_CHECKS and report['failed'] == []
    for name in ('detr_step_cuda_vs_cpu', 'cuda_graph_step_matches_float64'):
        skipped = report['checks'].pop(name)
        assert skipped['passed'] is None and 'CUDA' in skipped['skipped']
    assert all(r['passed'] is True for r in report['checks'].values()), report['checks']
    # the compiled graph holds all four ops; every op was compared in every dtype
    assert len(report['checks']['compile_sees_op']['ops_in_graph']) == 4
    assert report['checks']['op_matches_reference']['compared'] == 3 * 4 * (3 + 2 + 1 + 2)
    compiles = report['checks']['flex_recompiles']['compiles_after_each_call']
    assert len(compiles) == 6 and compiles[1] == compiles[-1] > 0
    assert report['benchmark']['op_vs_gather']['gather / rpe_index']['forward_backward']['gather'] > 0
    for name in FAST_CHECKS + ['op_vs_gather']:
        assert f'| {name} |' in run.stdout  # the printed table has a row per check and benchmark part


def test_a_wrong_op_fails_the_op_check(gpu_check, monkeypatch):
    import rpe_ops
    right = rpe_ops.rpe_index
    monkeypatch.setattr(rpe_ops, 'rpe_index', lambda x, index: right(x, index) + 1e-3)
    result = gpu_check.check_op('cpu', quick=True)
    assert result['passed'] is False
    assert result['failures'] and all(f.startswith('rpe_index forward') for f in result['failures'])


def test_the_cuda_graph_check_passes_compiled_steps_and_fails_a_replay_of_stale_inputs(gpu_check):
    """Its comparison on CPU: aot_eager (dynamo's capture, AOTAutograd's graphs; no CUDA graphs here) passes every
    step; a model that, as a graph without its input copy would, reruns each shape's first batch fails the steps
    that bring new data to a shape it has seen."""
    torch._dynamo.reset()
    compiled = gpu_check.compiled_steps_against_float64(
        'cpu', lambda m: torch.compile(m, backend='aot_eager', dynamic=True))  # dynamic, as the GPU check compiles
    assert [s['passed'] for s in compiled] == [True] * 4, compiled
    assert all(s['worst_error_over_bound'] <= 1 and s['loss_rel_error'] <= 1e-4 for s in compiled)

    def stale(model):
        first = {}

        def forward(images, mask):
            return model(*first.setdefault(images.shape, (images.clone(), mask.clone())))
        return forward
    steps = gpu_check.compiled_steps_against_float64('cpu', stale)
    assert [s['passed'] for s in steps] == [True, False, True, False], steps
    torch._dynamo.reset()


def test_a_failing_check_is_reported_and_the_rest_still_run(gpu_check, gpu_benchmarks, monkeypatch, tmp_path):
    def broken(device, quick):
        raise RuntimeError('the kernel wrote garbage')

    def broken_benchmark(device, quick):
        raise ValueError('no timer')
    monkeypatch.setitem(gpu_check.CHECKS, 'gradcheck_float64', broken)
    monkeypatch.setitem(gpu_benchmarks.BENCHMARKS, 'op_vs_gather', broken_benchmark)
    out = tmp_path / 'report.json'
    tool = importlib.import_module('detr_irpe.cli.gpu_check')
    status = tool.run(['--device', 'cpu', '--quick', '--no_build', '--checks', 'gradcheck_float64', 'extension',
                       '--benchmarks', 'op_vs_gather', '--output', str(out)])
    report = json.loads(out.read_text())
    assert status == 1 and report['failed'] == ['gradcheck_float64', 'benchmark op_vs_gather']
    failed = report['checks']['gradcheck_float64']
    assert failed['passed'] is False and failed['error'] == 'RuntimeError: the kernel wrote garbage'
    assert report['checks']['extension']['passed'] is True  # ran after the failure
    assert report['benchmark']['op_vs_gather']['error'] == 'ValueError: no timer'


def test_an_installed_package_runs_its_op_as_installed(gpu_check, monkeypatch, tmp_path, capsys):
    """detr-irpe-gpu-check from a pip install: no setup.py beside the package, so no build (it failed there)."""
    monkeypatch.setattr(gpu_check, 'ROOT', str(tmp_path))
    out = tmp_path / 'report.json'
    tool = importlib.import_module('detr_irpe.cli.gpu_check')
    status = tool.run(['--device', 'cpu', '--quick', '--checks', 'extension', '--benchmarks', '--output', str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and report['build'] is None and report['checks']['extension']['passed'] is True
    assert 'rpe_ops as installed' in capsys.readouterr().out


def test_cuda_without_a_gpu_is_a_usage_error_that_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run = subprocess.run([sys.executable, SCRIPT, '--device', 'cuda', '--no_build'], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 2 and 'sees no CUDA device' in run.stderr and '--device cpu' in run.stderr


@pytest.mark.slow
def test_the_other_checks_and_benchmark_parts_pass_at_quick_sizes(gpu_check, tmp_path):
    """What the quick test above leaves out (flex and AMP compile or run slowly on CPU; the benchmark builds
    DETR-R50 five times; host_bound needs CUDA and says so): together the code paths `make gpu-check` takes, on CPU."""
    out = tmp_path / 'report.json'
    run = run_script('--checks', 'flex_matches_explicit', 'amp_step', '--benchmarks', 'flex_vs_op', 'train_steps',
                     'host_bound', '--output', str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report['checks']) | set(FAST_CHECKS) | set(TESTED_DIRECTLY) == set(gpu_check.CHECKS)
    if torch.backends.cpu.get_cpu_capability() != 'AVX512':   # flex on CPU is refused there, and said so
        assert 'needs AVX-512' in report['checks'].pop('flex_matches_explicit')['skipped']
        assert 'needs AVX-512' in report['benchmark'].pop('flex_vs_op')['skipped']
    assert all(r['passed'] is True for r in report['checks'].values()), report['checks']
    amp = report['checks']['amp_step']['precisions']['float16 + GradScaler']
    assert amp['loop_skipped_steps'] < 3 and amp['grad_cosine'] >= 0.98
    assert 'run with --device cuda' in report['benchmark']['host_bound']['skipped']
    steps = report['benchmark']['train_steps']
    assert set(steps['rows']) == {'plain C5', 'irpe_k sdpa C5', 'irpe_qkv C5', 'plain DC5', 'irpe_qkv DC5'}
    assert all(r['step_ms'] > 0 for r in steps['rows'].values()) and steps['ratios']['irpe_qkv / plain (DC5)'] > 0
    assert '| irpe_qkv DC5 |' in run.stdout  # the table of training steps



def test_gpu_busy_time_counts_overlapping_kernels_once(gpu_benchmarks):
    """The union of the kernels' intervals, against a loop over every microsecond (GPU-busy share of a step)."""
    import random
    rng = random.Random(0)
    for _ in range(50):
        spans = [(a, a + rng.randint(0, 30)) for a in (rng.randint(0, 200) for _ in range(rng.randint(0, 12)))]
        ticks = {t for start, stop in spans for t in range(start, stop)}
        assert gpu_benchmarks.covered(spans) == len(ticks)
