"""One run per output folder: an OS lock (flock) on output_dir/.lock, held while the run lives.

A second run on the same folder (a requeued job while the old one still runs) would resume the first's checkpoint
and both would write it; instead it stops with the holder's pid, host, start time and command. The kernel drops a
flock when its process dies, however it dies, so a dead run's lock is taken over without any cleanup. Under
torchrun the main process takes the lock and every process learns the outcome.
"""
import datetime
import fcntl
import os
import shlex
import socket
import sys

from detr_irpe import UsageError, distributed

LOCK_NAME = '.lock'


class RunLock:
    """Hold `output_dir`'s lock (made when missing) from acquire() until release() or the process's end."""

    def __init__(self, output_dir):
        self.output_dir, self.path, self.fd, self.made_folder = output_dir, os.path.join(output_dir, LOCK_NAME), None, False

    def acquire(self):
        """Take the lock, on the main process only; on every process a UsageError if it failed there."""
        error = None
        if distributed.is_main_process():
            try:
                self._take()
            except UsageError as e:
                error = str(e)
        if distributed.any_process(error is not None):
            raise UsageError(error or f'--output_dir {self.output_dir}: the main process could not take the folder '
                                      '(its message says why).')
        return self

    def _take(self):
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise UsageError(f'--output_dir {self.output_dir} is a file; pass a folder (it is made when missing).')
        above = os.path.dirname(os.path.abspath(self.output_dir))
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise UsageError(f'--output_dir {self.output_dir} lies below {above}, which is a file; pass a folder '
                             'path (missing folders are made).')
        self.made_folder = not os.path.exists(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        # No O_TRUNC: the holder's details must survive a failed attempt.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors='replace').strip() or 'a run that has not written its details yet'
            os.close(fd)
            raise UsageError(f'--output_dir {self.output_dir} is in use by another run ({holder}); wait for it to end '
                             'or stop it, or pass another --output_dir.') from None
        started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
        details = f'pid {os.getpid()} on {socket.gethostname()}, started {started}: {shlex.join(sys.argv)}\n'
        os.ftruncate(fd, 0)
        os.pwrite(fd, details.encode(), 0)
        self.fd = fd

    def release(self, failed=False):
        """Drop the lock; after a failed start, also remove a folder this run made and left empty but for the lock,
        so a bad input leaves no empty run folder."""
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        if not (failed and self.made_folder and os.path.isdir(self.output_dir)):
            return
        if os.listdir(self.output_dir) == [LOCK_NAME]:
            os.remove(self.path)
            os.rmdir(self.output_dir)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, kind, value, traceback):
        self.release(failed=kind is not None)
