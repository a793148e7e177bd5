import os
import pickle

import pytest

# inductor's cache per CPU instruction set (detr_irpe/inductor_cache.py) also for test modules that compile
# without importing detr_irpe (tests/test_rpe_ops.py): importing the package sets it
import detr_irpe  # noqa: F401


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
