"""Restarts that resume by themselves: --resume auto, torchrun --max-restarts after a SIGKILLed worker, and
SIGTERM (SLURM preemption) writing a checkpoint at the current step before exiting with status 143."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from detr_irpe import UsageError, distributed, engine
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.checkpoint import (load_checkpoint, load_optimizer_state, load_resume_checkpoint, resolve_resume,
                                  save_checkpoint)
from detr_irpe.preemption import (PREEMPTED_EXIT_STATUS, iterate_loader, loader_worker_ignores_sigterm,
                                  process_rng_state)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# the checkout first; an existing PYTHONPATH (where detr_irpe_datasets is found without an install) kept
PYTHONPATH = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')


def test_resume_auto_finds_the_run_folders_checkpoint_or_starts_fresh(tmp_path):
    assert resolve_resume('auto', str(tmp_path)) == ''
    assert resolve_resume('some/file.pth', str(tmp_path)) == 'some/file.pth'
    assert resolve_resume('', str(tmp_path)) == ''
    save_checkpoint({'epoch': 0}, str(tmp_path / 'checkpoint.pth'))
    assert resolve_resume('auto', str(tmp_path)) == str(tmp_path / 'checkpoint.pth')
    with pytest.raises(ValueError, match='--resume auto.*--output_dir'):
        resolve_resume('auto', '')


def test_an_unreadable_checkpoint_is_an_error_for_resume_auto_not_a_fresh_start(tmp_path):
    (tmp_path / 'checkpoint.pth').write_bytes(b'half a checkpoint')
    with pytest.raises(UsageError, match='not a checkpoint .*No readable checkpoint is left'):
        load_resume_checkpoint('auto', str(tmp_path))
    assert (tmp_path / 'checkpoint.pth').read_bytes() == b'half a checkpoint'


def test_each_process_gets_its_own_random_state_back(monkeypatch):
    states = [{'torch': torch.tensor([r])} for r in range(3)]
    checkpoint = {'rng': states[0], 'rng_per_process': states}
    monkeypatch.setattr(distributed, 'get_world_size', lambda: 3)
    for rank in range(3):
        monkeypatch.setattr(distributed, 'get_rank', lambda rank=rank: rank)
        assert process_rng_state(checkpoint) is states[rank]
    assert process_rng_state({'rng': states[0]}) is None  # a checkpoint of an older run: the main's alone
    monkeypatch.setattr(distributed, 'get_world_size', lambda: 2)  # another number of processes: the main process
    monkeypatch.setattr(distributed, 'get_rank', lambda: 0)         # takes the main's, the others keep their seeds
    assert process_rng_state(checkpoint) is states[0]
    monkeypatch.setattr(distributed, 'get_rank', lambda: 1)
    assert process_rng_state(checkpoint) is None  # given the main's, every process drew the same dropout


def test_an_optimizer_of_another_recipe_names_the_flag(tmp_path):
    tiny = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
            '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu',
            '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k']
    from detr_irpe import build_model
    args = get_args_parser().parse_args(tiny + ['--rpe_weight_decay', '0'])
    model = build_model(args)[0]
    three_groups = engine.build_optimizer(model, args).state_dict()
    two_groups = engine.build_optimizer(model, get_args_parser().parse_args(tiny))
    with pytest.raises(ValueError, match='3 parameter groups, this run 2.*--rpe_weight_decay 0'):
        load_optimizer_state(two_groups, three_groups, '--resume x.pth')


# --- torchrun end to end -------------------------------------------------------------------------------

COMMON = ['--epochs', '3', '--batch_size', '2', '--checkpoint_every', '2', '--eval_every', '100', '--dropout', '0.1',
          '--num_workers', '0', '--config', SMOKE]


def _torchrun(*argv):
    return [os.path.join(os.path.dirname(PY), 'torchrun'), '--standalone', '--nproc_per_node', '2', *argv]


def _env():
    # A restarted group must not read the previous group's addresses from torchrun's shared store
    # (pytorch/pytorch#135712): the README's torchrun --max-restarts command lines set this too.
    return {**os.environ, 'PYTHONPATH': PYTHONPATH, 'OMP_NUM_THREADS': '1', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}


def _workers(parent):
    """{rank: pid} of the training processes torchrun `parent` started (read from /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
            if b'RANK' in env:
                found[int(env[b'RANK'])] = int(pid)
        except (OSError, IndexError, ValueError):
            continue
    return found


def _position(path):
    """(epoch, step) of the checkpoint at `path`, the end of an epoch counting as step 10**9; None if absent."""
    try:  # mapped, not read: the poll looks at two numbers of a file of ~130 MB every 20 ms
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except FileNotFoundError:  # not written yet (it appears whole: written under another name, then renamed)
        return None
    return state['epoch'], 10 ** 9 if state['step'] is None else state['step']


@pytest.mark.slow
def test_killed_worker_restarts_and_sigterm_checkpoints_then_resume_auto_ends_at_the_same_weights(tmp_path):
    data = ['--synthetic_dir', str(tmp_path / 'synthetic')]
    straight = subprocess.run(_torchrun(os.path.join(ROOT, 'tools', 'train.py'), *COMMON, *data,
                                        '--output_dir', str(tmp_path / 'straight')),
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert straight.stdout.count('parameters:') == 1  # the first process's start-up lines, not each one's

    run = ['--output_dir', str(tmp_path / 'run'), '--resume', 'auto']
    checkpoint = str(tmp_path / 'run' / 'checkpoint.pth')
    agent = subprocess.Popen(_torchrun('--max-restarts', '1', '--monitor-interval', '0.1',
                                       os.path.join(ROOT, 'tools', 'train.py'), *COMMON, *data, *run),
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # 1. SIGKILL the second worker mid-epoch: torchrun brings the group back, which resumes by itself.
        deadline, killed, first = time.time() + 240, None, {}
        while time.time() < deadline and agent.poll() is None and killed is None:
            position = _position(checkpoint)
            if position is not None and position[0] == 0 and 2 <= position[1] < 10 ** 9:
                first = _workers(agent.pid)
                os.kill(first[1], signal.SIGKILL)
                killed = position
            time.sleep(0.02)
        assert killed is not None, 'the run ended before a worker could be killed mid-epoch'
        # 2. SIGTERM both workers of the new group once it has trained past the kill: each checkpoints at its
        # current step and exits with 143 (no restart left: torchrun stops).
        terminated = None
        while time.time() < deadline and agent.poll() is None and terminated is None:
            position = _position(checkpoint)
            workers = _workers(agent.pid)
            new_group = len(workers) == 2 and set(workers.values()).isdisjoint(first.values())
            if position is not None and position > killed and new_group:
                for pid in workers.values():
                    os.kill(pid, signal.SIGTERM)
                terminated = position
            time.sleep(0.02)
        assert terminated is not None, 'the restarted group did not train past the kill in time'
        _, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0 and f'exitcode  : {PREEMPTED_EXIT_STATUS}' in stderr, stderr[-3000:]
    at_sigterm = _position(checkpoint)
    assert at_sigterm is not None and at_sigterm >= terminated  # complete, and not behind what was there
    assert at_sigterm < (2, 10 ** 9)  # the run was stopped before its end

    # 3. The same command line again (as a requeued SLURM job would run it) finishes the run.
    resumed = subprocess.run(_torchrun(os.path.join(ROOT, 'tools', 'train.py'), *COMMON, *data, *run),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from' in resumed.stdout
    a = load_checkpoint(str(tmp_path / 'straight' / 'checkpoint.pth'))['model']
    b = load_checkpoint(checkpoint)['model']
    for k in a:  # the same operations in the same order (a sum of two processes' gradients commutes exactly)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_the_current_step_and_exits_143(tmp_path):
    """As SLURM and torchrun send it: to every process, DataLoader workers included (they must survive it)."""
    out = tmp_path / 'out'
    run = subprocess.Popen([PY, os.path.join(ROOT, 'tools', 'train.py'), '--config', SMOKE, '--epochs', '3',
                            '--num_workers', '2', '--eval_every', '100', '--output_dir', str(out),
                            '--synthetic_dir', str(tmp_path / 'synthetic'), '--resume', 'auto'],
                           cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and run.poll() is None and _position(str(out / 'checkpoint.pth')) is None:
            time.sleep(0.02)
        first = _position(str(out / 'checkpoint.pth'))  # the end of epoch 0 (no --checkpoint_every)
        os.killpg(run.pid, signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert first == (0, 10 ** 9)
    assert run.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    assert 'SIGTERM: checkpoint' in stdout
    assert (0, 10 ** 9) < _position(str(out / 'checkpoint.pth')) < (2, 10 ** 9)


_MASK_AT_INIT = None


def _record_mask_then_ignore_sigterm(worker_id):
    global _MASK_AT_INIT
    _MASK_AT_INIT = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader_worker_ignores_sigterm(worker_id)


class _WorkerSignals(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (_MASK_AT_INIT, signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []),
                signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)


def test_loader_workers_start_with_sigterm_held_back_until_they_ignore_it():
    # torch's worker start-up installs a SIGTERM handler that kills the worker; a SIGTERM to the process group in
    # that window used to end the run with a dead worker instead of a checkpoint
    loader = torch.utils.data.DataLoader(_WorkerSignals(), num_workers=2, batch_size=None,
                                         worker_init_fn=_record_mask_then_ignore_sigterm)
    for blocked_at_init, blocked_after, ignored in iterate_loader(loader):
        assert blocked_at_init and not blocked_after and ignored
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])   # the main process's mask restored
