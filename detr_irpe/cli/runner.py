"""How every tool runs: the CPU block cache installed first, and bad input told in one line.

A UsageError (a flag, a file, the data the user gave) ends the tool with `error: <message>` and exit status 2, as
argparse's own usage errors do; an OSError that names its file (no permission, a file where a folder should be,
a full disk) with `error: <message>` and status 1. Anything else is a bug and keeps its traceback.
DETR_IRPE_DEBUG=1 shows the traceback of the one-line errors too.
"""
import os
import sys

from detr_irpe import UsageError
from rpe_ops import block_cache

__all__ = ['UsageError', 'run_tool']

USAGE_EXIT_STATUS = 2


def run_tool(main, *args):
    """main(*args) with freed CPU memory kept for reuse (rpe_ops.block_cache), its result returned."""
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
