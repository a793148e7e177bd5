import os
import pickle
import shutil
import tempfile

import pytest
import torch

# inductor's cache per CPU instruction set (detr_irpe/inductor_cache.py) also for test modules that compile
# without importing detr_irpe (tests/test_rpe_ops.py): importing the package sets it
import detr_irpe  # noqa: F401


# what decides the code paths taken (hosts differ: docs/robustness.md#hosts) and the room for the run's files
HOST_FEATURES = ('avx512_f', 'avx512_bf16', 'avx512_fp16', 'amx_bf16')
HOST_VARIABLES = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    """The host at the top of the run's log (`pytest -q` too), so a failure or a time in CI's log has its host."""
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter is not None:
        for line in describe_host():
            reporter.write_line(line)


def describe_host():
    """Two lines: the CPU and what decides its code paths; the room for the run's files."""
    model = 'unknown CPU'
    if os.path.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    features = getattr(torch.cpu, 'get_capabilities', dict)()
    has = [name for name in HOST_FEATURES if features.get(name)]
    capped = [f'{name}={os.environ[name]}' for name in HOST_VARIABLES if os.environ.get(name)]
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2 ** 30
    return [f'host: {model}, {os.cpu_count()} cores; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; '
            f'{", ".join(has) or "none of " + ", ".join(HOST_FEATURES)}' + (f'; {" ".join(capped)}' if capped else ''),
            f'{tempfile.gettempdir()}: {free:.1f} GiB free (a run writes up to ~1.5 GB there)']


class RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for a checkpoint that would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def code_running_checkpoint(tmp_path):
    """(path of a .pth whose unpickling would create `marker`, marker)."""
    marker = str(tmp_path / 'code_ran')
    path = str(tmp_path / 'evil.pth')
    with open(path, 'wb') as f:
        pickle.dump({'model': {}, 'payload': RunsCode(marker)}, f)
    return path, marker
