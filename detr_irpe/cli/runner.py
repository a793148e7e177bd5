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
from rpe_ops import block_cache

__all__ = ['UsageError', 'run_tool']

USAGE_EXIT_STATUS = 2


def run_tool(main, *args):
    """main(*args) with freed CPU memory kept for reuse (rpe_ops.block_cache), its result returned."""
    python_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: (
        f'warning: {message}\n' if is_ours(filename) else python_format(message, category, filename, lineno, line))
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
