"""How every tool runs: the CPU block cache installed first, and bad input told in one line.

A UsageError (a flag, a file, the data the user gave) ends the tool with `error: <message>` and exit status 2, as
argparse's own usage errors do; an OSError that names its file (no permission, a file where a folder should be,
a full disk) with `error: <message>` and status 1. Anything else is a bug and keeps its traceback.
DETR_IRPE_DEBUG=1 shows the traceback of the one-line errors too. This project's warnings (bad data entries,
flags that do not fit the data) print as `warning: <message>`; other libraries' as Python prints them.
"""
import os
import sys
import warnings

from detr_irpe import UsageError
from detr_irpe.preemption import loader_worker_ignores_sigterm
from rpe_ops import block_cache

__all__ = ['UsageError', 'run_tool']

USAGE_EXIT_STATUS = 2


_PYTHON_FORMAT = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None):
    """This project's warnings as `warning: <message>`, one line as its errors; other libraries' as Python's."""
    if is_ours(filename):
        return f'warning: {message}\n'
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


def loader_worker_init(worker_id):
    """The tools' DataLoader worker_init_fn: warnings as in the main process (a worker started by spawn, or by
    Python 3.14's default forkserver, has Python's format), SIGTERM left to the main process."""
    warnings.formatwarning = format_warning
    loader_worker_ignores_sigterm(worker_id)


def run_tool(main, *args):
    """main(*args) with freed CPU memory kept for reuse (rpe_ops.block_cache), its result returned."""
    python_format = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        block_cache.install()
        return main(*args)
    except UsageError as e:
        if os.environ.get('DETR_IRPE_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(USAGE_EXIT_STATUS)
    except OSError as e:
        if e.filename is None or os.environ.get('DETR_IRPE_DEBUG'):
            raise
        sys.exit(f'error: {e}')
    finally:
        warnings.formatwarning = python_format


def is_ours(filename):
    """Whether a source file belongs to this project's packages (imported so far)."""
    modules = [sys.modules.get(name) for name in ('detr_irpe', 'detr_irpe_datasets', 'rpe_ops')]
    folders = tuple(os.path.join(folder, '') for m in modules for folder in getattr(m, '__path__', ()))
    return filename.startswith(folders)
