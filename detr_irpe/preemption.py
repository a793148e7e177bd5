"""Stopping and resuming exactly: SIGTERM turned into a checkpoint at the current step, and the generator states
that make a resumed run draw the same random numbers as an uninterrupted one."""
import random
import signal
import sys

import numpy as np
import torch

from detr_irpe import distributed


def process_rng_state(checkpoint):
    """This process's generator states from a checkpoint: its own where every process's were kept by a run
    of the same size, else the main process's for the main process (older checkpoints, another number of
    processes) and None for the others, which keep the states seeded by their rank (given the main's, every
    process drew the same dropout)."""
    own = process_entry(checkpoint, 'rng')
    if own is not None:
        return own
    return checkpoint['rng'] if distributed.get_rank() == 0 else None


def process_entry(checkpoint, name):
    """This process's item of checkpoint[name + '_per_process'] (a list, one per process) when a run of the same
    size wrote it, else None."""
    per_process = checkpoint.get(name + '_per_process')
    if per_process and len(per_process) == distributed.get_world_size():
        return per_process[distributed.get_rank()]
    return None


# The exit status after the checkpoint of a SIGTERM: 128 + 15, what a process ended by SIGTERM reports, so
# SLURM and torchrun see a terminated run (not a completed one, not a crash of the code), and a requeued job
# continues it with --resume auto.
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM


class Preemption:
    """SIGTERM (SLURM preempting or cancelling a job, torchrun stopping its workers) becomes a request: the
    training loop writes a checkpoint at the current step and exits with PREEMPTED_EXIT_STATUS. The handler
    only sets a flag, so a checkpoint being written when the signal comes is finished, not cut. A context: on leaving
    it the handler before is back (a Python session that ran training still ends on SIGTERM)."""

    def __init__(self):
        self.signalled, self.previous = False, None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)  # None: set in C

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def requested(self):
        """True on every process once any of them got SIGTERM, so all stop at the same step."""
        return distributed.any_process(self.signalled)

    @staticmethod
    def exit(where, path):
        """Leave after the main process wrote the checkpoint `path` (None: no --output_dir) at `where`."""
        distributed.barrier()  # the main process has finished writing before any process exits
        done = f'checkpoint {path} written at {where}' if path else f'no --output_dir, no checkpoint ({where})'
        print(f'SIGTERM: {done}; exiting with status {PREEMPTED_EXIT_STATUS} (continue with --resume auto)',
              flush=True)
        sys.exit(PREEMPTED_EXIT_STATUS)


def loader_worker_ignores_sigterm(worker_id):
    """DataLoader worker_init_fn: a SIGTERM sent to the whole process group (SLURM, torchrun) must not kill
    the data workers, or the main process fails on their death before it can write its checkpoint. They end
    with the main process, as always. A SIGTERM held back while they started (iterate_loader) is dropped here."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def iterate_loader(data_loader):
    """iter(data_loader) with SIGTERM held back while its workers start: torch's worker start-up installs a
    handler that dies of SIGTERM before loader_worker_ignores_sigterm runs, and a worker inherits the mask. The
    main process gets a SIGTERM sent meanwhile when the mask is restored."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(data_loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def rng_state():
    """The python, numpy and torch generator states, in a form weights_only loading accepts."""
    np_state = np.random.get_state()
    state = {'python': _to_lists(random.getstate()),
             'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_initialized():  # a CPU run on a GPU machine leaves CUDA alone
        state['cuda_device'] = torch.cuda.get_rng_state()  # this process's GPU's: a resume may see fewer GPUs
    return state


def set_rng_state(state):
    random.setstate(_to_tuples(state['python']))
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if not torch.cuda.is_available():
        return
    if 'cuda_device' in state:
        torch.cuda.set_rng_state(state['cuda_device'])
    elif len(state.get('cuda', ())) > torch.cuda.current_device():  # older checkpoints: every visible GPU's
        torch.cuda.set_rng_state(state['cuda'][torch.cuda.current_device()])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
