import os
import pickle
import shutil
import tempfile

import pytest

# inductor's cache per CPU instruction set (detr_irpe/inductor_cache.py) also for test modules that compile
# without importing detr_irpe (tests/test_rpe_ops.py): importing the package sets it
import detr_irpe  # noqa: F401
from rpe_ops.benchmark import describe_host, host


# set where the suite runs another host's code paths on this one (docs/robustness.md#hosts)
HOST_VARIABLES = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    """The host at the top of the run's log (`pytest -q` too), so a failure or a time in CI's log has its host;
    and the room for the run's files."""
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter is None:
        return
    capped = [f'{name}={os.environ[name]}' for name in HOST_VARIABLES if os.environ.get(name)]
    reporter.write_line(describe_host(host()) + (f'; {" ".join(capped)}' if capped else ''))
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2 ** 30
    reporter.write_line(f'{tempfile.gettempdir()}: {free:.1f} GiB free (a run writes up to ~1.5 GB there)')


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
