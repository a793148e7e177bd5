"""detr_irpe keeps torch.compile's generated code apart per CPU instruction set (detr_irpe.inductor_cache)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_compiled_flex_is_right_under_two_isas_in_turn_with_one_temporary_folder(tmp_path):
    # Both runs start from inductor's default folder under TMPDIR; the second (the host's own ISA) would reuse
    # the first's AVX2 code without a folder per ISA. Bound: softmax weights times |v| < 5, float32 logits of
    # 16-term dot products: errors ~1e-6; a reused wrong-ISA kernel is off by ~1 (or fails).
    env = {k: v for k, v in os.environ.items() if k not in ('TORCHINDUCTOR_CACHE_DIR', 'ATEN_CPU_CAPABILITY')}
    env['TMPDIR'] = str(tmp_path)
    for capability in ('avx2', None):
        run_env = dict(env, **({'ATEN_CPU_CAPABILITY': capability} if capability else {}))
        run = subprocess.run([sys.executable, os.path.join(HERE, 'inductor_isa_cache_repro.py'), '--per-cpu'],
                             env=run_env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout.splitlines()[-1])['max_error'] < 1e-5, capability


def test_cache_folder_names_the_capability_in_force(monkeypatch):
    from detr_irpe import inductor_cache
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    folder = inductor_cache.use_cache_per_cpu()
    import torch
    assert os.path.basename(folder).startswith(torch.backends.cpu.get_cpu_capability().lower() + '-')
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', default_cache_dir())   # as inductor sets it on first use
    assert inductor_cache.use_cache_per_cpu() == folder
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', '/somewhere/chosen')
    assert inductor_cache.use_cache_per_cpu() == '/somewhere/chosen'   # a folder the user set is kept
