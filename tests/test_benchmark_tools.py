"""The benchmark scripts run and write what they print (their timings are not checked: benchmarks are
scripts, not timed tests)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rpe_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', script), *flags], cwd=ROOT,
                          capture_output=True, text=True)


def test_benchmark_op_prints_and_saves_the_ratios(tmp_path):
    out = tmp_path / 'op.json'
    proc = run('benchmark_op.py', '--ids', 'random', '--length', '48', '--buckets', '9', '--repeats', '1',
               '--threads', '1', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result['sizes'] == {'B': 2, 'H': 8, 'Lq': 48, 'Lk': 48, 'K': 9, 'dtype': 'float32', 'device': 'cpu',
                               'index': 'random'}
    assert result['machine']['torch_threads'] == 1
    host = result['machine']['host']  # the CPU named, its deciding features, the loops each op chose
    assert host['cpu_model'] and host['torch_cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert set(host) >= {'avx512f', 'avx512_bf16', 'amx'}
    assert host['rpe_ops_cpu_loops'] == rpe_ops.build_info()['cpu_loops']
    assert f"host: {host['cpu_model']}" in proc.stdout and f"torch CPU capability {host['torch_cpu_capability']}" in proc.stdout
    loops = result['cpu_loops']
    assert loops['loops'] == host['rpe_ops_cpu_loops']['loops'] and f"these ops run {loops['loops']}" in proc.stdout
    for op in ('rpe_index', 'rpe_index_qk'):
        for kind, t in loops['median_seconds'][op].items():
            assert set(t) == {'gather', *rpe_ops.build_info()['cpu_loops']['available']}
            for name, seconds in t.items():
                assert loops['vs_portable'][op][kind][name] == pytest.approx(seconds / t['portable'])
    for kind in ('forward', 'forward_backward'):
        speedup = result['speedup'][kind]['gather']
        median = result['median_seconds'][kind]
        assert speedup == pytest.approx(median['gather'] / median['rpe_index'])
        assert f"{speedup:.2f}" in proc.stdout
    assert 'rpe_index_qk' in proc.stdout and result['qk']['speedup'] > 0


def test_benchmark_op_says_which_sizes_the_irpe_ids_need():
    proc = run('benchmark_op.py', '--length', '48')
    assert proc.returncode == 2
    assert '--ids product is the 25x38 map of rpe-2.0-product: use --length 950 --buckets 81' in proc.stderr


@pytest.mark.slow
def test_benchmark_table_of_the_op_part(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run('benchmark.py', '--quick', '--parts', 'op', '--threads', '1', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    ratios = json.loads(out.read_text())['ratios']['rpe_index']
    assert set(ratios) == {f'{what} ({kind}, {ids})' for what in ('gather / rpe_index', 'chosen loops / portable')
                           for kind in ('fwd', 'fwd+bwd') for ids in ('irpe ids', 'random ids')}
    assert 'host: ' in proc.stdout and f"rpe_ops CPU loops: {rpe_ops.build_info()['cpu_loops']['loops']}" in proc.stdout
    for name, value in ratios.items():
        assert f'| rpe_index: {name} | {value:.3f} |' in proc.stdout


@pytest.mark.slow
def test_benchmark_precision_part_says_whether_amps_choice_was_the_faster_here(tmp_path):
    from detr_irpe.lab.benchmark import paired_ratio
    from detr_irpe.precision import choose_precision
    out = tmp_path / 'bench.json'
    proc = run('benchmark.py', '--quick', '--parts', 'precision', '--threads', '1', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    p, ratio = result['precision'], result['ratios']['precision']['bfloat16 / float32']
    assert ratio == paired_ratio(p['samples'], 'bfloat16', 'float32')
    chosen = choose_precision('cpu', amp=True)  # as the tool's process chose it (the same environment)
    assert p['amp'] == chosen.describe() and p['amp_chose_the_faster'] == ((ratio < 1) == chosen.autocast_enabled)
    verdict = 'the faster' if p['amp_chose_the_faster'] else 'NOT the faster'
    assert f"{chosen.describe()}: {verdict} on this host" in proc.stdout
    assert f'| precision: bfloat16 / float32 | {ratio:.3f} |' in proc.stdout


def test_model_ratios_are_medians_of_ratios_within_each_repeat():
    from detr_irpe.lab.benchmark import interleaved, paired_ratio
    calls = []
    samples = {}
    medians = interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, repeats=3, warmup=1,
                          samples=samples)
    assert calls == ['a', 'b', 'b', 'a', 'a', 'b', 'b', 'a']  # every repeat runs both, the order rotating
    assert set(samples) == {'a', 'b'} and all(len(t) == 3 for t in samples.values())
    assert medians == {n: sorted(t)[1] for n, t in samples.items()}
    # a slow spell in repeat 2 hits both models: the paired ratio ignores it, a ratio of medians does not
    samples = {'a': [2.0, 9.0, 3.0], 'b': [1.0, 3.0, 2.0]}
    assert paired_ratio(samples, 'a', 'b') == 2.0
    assert sorted(samples['a'])[1] / sorted(samples['b'])[1] == 1.5
