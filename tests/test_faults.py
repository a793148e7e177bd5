"""Faults a run meets on a cluster, each injected: stops at every point of an epoch then a resume, two runs on one
folder, killed and damaged checkpoint writes, a full disk, files that are not checkpoints, a peer that never comes.
A resumed run must end at the uninterrupted run's weights and log; every message names what is wrong and what to
do."""
import errno
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe import UsageError, build_model
from detr_irpe.checkpoint import (PREVIOUS_CHECKPOINT, load_checkpoint, load_model_state, load_resume_checkpoint,
                                  save_checkpoint, save_json)
from detr_irpe.cli import train as train_tool
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.lab.gpu_check import gradient_cosine
from detr_irpe.preemption import PREEMPTED_EXIT_STATUS
from detr_irpe.run_lock import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')
# 2 epochs, evaluation after each, dropout on: every random number the run draws matters. 32 validation images
# (8 batches), so a SIGTERM can land inside an evaluation.
RUN = ['--config', SMOKE, '--epochs', '2', '--eval_every', '1', '--dropout', '0.1', '--synthetic_val', '32',
       '--num_workers', '0', '--resume', 'auto']


def _env():
    # The checkout first; an existing PYTHONPATH (where detr_irpe_datasets is found without an install) kept.
    path = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    return {**os.environ, 'PYTHONPATH': path, 'OMP_NUM_THREADS': '1'}


def _train(*argv, **kwargs):
    return subprocess.run([PY, os.path.join(ROOT, 'tools', 'train.py'), *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def _start(*argv):
    return subprocess.Popen([PY, os.path.join(ROOT, 'tools', 'train.py'), *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log(folder):
    """log.txt's entries without their wall-clock time."""
    with open(os.path.join(folder, 'log.txt')) as f:
        return [{k: v for k, v in json.loads(line).items() if k != 'time'} for line in f]


def _assert_same_run(a, b):
    """Model, optimizer and log of the checkpoints in folders a and b equal exactly: the resumed run repeats the
    uninterrupted one's arithmetic operation for operation on one host, so no rounding can differ."""
    x, y = (load_checkpoint(os.path.join(f, 'checkpoint.pth')) for f in (a, b))
    assert x['model'].keys() == y['model'].keys()
    for k in x['model']:
        torch.testing.assert_close(x['model'][k], y['model'][k], rtol=0, atol=0, msg=k)
    assert x['optimizer']['state'].keys() == y['optimizer']['state'].keys()
    for i, state in x['optimizer']['state'].items():
        for k, v in state.items():
            torch.testing.assert_close(v, y['optimizer']['state'][i][k], rtol=0, atol=0, msg=f'{i}.{k}')
    assert _log(a) == _log(b)


def _checkpoint_position(path):
    """(epoch, step) of the checkpoint at `path` (step None at an epoch's end), None while absent or being written."""
    try:
        state = load_checkpoint(path)
    except UsageError:
        return None
    return state['epoch'], state['step']


def _sigterm_when(proc, path, reached, timeout=240):
    """SIGTERM `proc` once its checkpoint at `path` satisfies reached(epoch, step); the position seen."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        position = _checkpoint_position(path)
        if position is not None and reached(*position):
            proc.send_signal(signal.SIGTERM)
            return position
        time.sleep(0.01)
    raise AssertionError(f'the run ended or timed out before its checkpoint reached the point: {proc.poll()}')


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """The uninterrupted 2-epoch run's folder (data in the folder beside it, which the other runs share)."""
    root = tmp_path_factory.mktemp('straight')
    run = _train(*RUN, '--synthetic_dir', str(root / 'synthetic'), '--output_dir', str(root / 'out'))
    assert run.returncode == 0, run.stderr[-3000:]
    assert [e['epoch'] for e in _log(str(root / 'out'))] == [0, 1]
    return root


# --- 1. exact resumption from any stop point ------------------------------------------------------

@pytest.mark.slow
def test_one_epoch_then_resume_auto_to_two_equals_two_epochs_straight(straight, tmp_path):
    data = ['--synthetic_dir', str(straight / 'synthetic'), '--output_dir', str(tmp_path / 'out')]
    first = _train(*RUN, *data, '--epochs', '1')
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(*RUN, *data)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'resumed from' in second.stdout
    _assert_same_run(str(straight / 'out'), str(tmp_path / 'out'))


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_gives_the_same_weights_and_the_same_logged_epoch_loss(straight, tmp_path):
    data = ['--synthetic_dir', str(straight / 'synthetic'), '--output_dir', str(tmp_path / 'out'),
            '--checkpoint_every', '1']
    proc = _start(*RUN, *data)
    _sigterm_when(proc, str(tmp_path / 'out' / 'checkpoint.pth'), lambda epoch, step: epoch == 0 and step == 1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    stopped = _checkpoint_position(str(tmp_path / 'out' / 'checkpoint.pth'))
    assert stopped[0] == 0 and stopped[1] is not None  # within epoch 0: its log line averages steps of two starts
    resumed = _train(*RUN, *data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(str(straight / 'out'), str(tmp_path / 'out'))


def _sigterm_once_printed(proc, text, timeout=240):
    """SIGTERM `proc` once its stderr shows `text` (a progress bar's label); (stdout, stderr) when it has exited."""
    chunks, fd = [], proc.stderr.fileno()
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(fd, 65536), b'')))
    reader.start()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and text.encode() not in b''.join(chunks):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.stdout.read()
    proc.wait(timeout=120)
    reader.join()
    return stdout, b''.join(chunks).decode(errors='replace')


@pytest.mark.slow
def test_sigterm_during_an_evaluation_stops_within_it_and_the_resume_evaluates_and_logs_the_epoch(straight, tmp_path):
    """The checkpoint of the epoch's end is written before its evaluation: a SIGTERM within the evaluation ends the
    run before the next batch (not after the whole evaluation and another step), and the resumed run evaluates that
    epoch again and writes its log line."""
    data = ['--synthetic_dir', str(straight / 'synthetic'), '--output_dir', str(tmp_path / 'out')]
    out = tmp_path / 'out'
    proc = _start(*RUN, *data)
    stdout, stderr = _sigterm_once_printed(proc, 'eval:')  # the bar appears as the evaluation starts
    assert proc.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    assert 'at the end of epoch 0 (its evaluation runs again on resume)' in stdout
    assert not os.path.exists(out / 'log.txt') and not os.path.exists(out / 'eval.json')
    assert _checkpoint_position(str(out / 'checkpoint.pth')) == (0, None)
    resumed = _train(*RUN, *data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(str(straight / 'out'), str(out))


@pytest.mark.slow
def test_sigterm_as_the_last_epochs_checkpoint_appears_then_resume_gives_the_uninterrupted_run(straight, tmp_path):
    """The SIGTERM lands after the last epoch's checkpoint, before or within its evaluation (whichever the timing
    gives): no log line yet, and the resumed run, with nothing left to train, evaluates and writes it (it was
    refused as a finished run, so a requeued job failed every time)."""
    data = ['--synthetic_dir', str(straight / 'synthetic'), '--output_dir', str(tmp_path / 'out')]
    out = tmp_path / 'out'
    proc = _start(*RUN, *data)
    _sigterm_when(proc, str(out / 'checkpoint.pth'), lambda epoch, step: epoch == 1 and step is None)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    assert 'SIGTERM: checkpoint' in stdout and 'the end of epoch 1' in stdout
    assert [e['epoch'] for e in _log(str(out))] == [0]  # stopped before the last epoch's log line
    resumed = _train(*RUN, *data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(str(straight / 'out'), str(out))
    with open(straight / 'out' / 'eval.json') as a, open(out / 'eval.json') as b:
        assert json.load(a)['bbox'] == json.load(b)['bbox']
    again = _train(*RUN, *data)  # now finished: nothing to do, and said so
    assert again.returncode == 2 and 'that run has trained 2 epochs and --epochs 2 asks for no more' in again.stderr


def test_the_validation_transform_draws_nothing_from_the_global_generators():
    from detr_irpe_datasets.transforms import make_transforms
    from torchvision import tv_tensors
    image = Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8))
    target = {'boxes': tv_tensors.BoundingBoxes([[1, 2, 30, 20]], format='XYXY', canvas_size=(40, 60)),
              'labels': torch.tensor([1]), 'iscrowd': torch.tensor([0])}
    before = torch.get_rng_state()
    resized, _ = make_transforms('val', val_size=64, val_max_size=128)(image, target)
    assert torch.equal(torch.get_rng_state(), before)
    assert resized.shape[1:] == (64, 96)  # the shorter side to val_size, the aspect ratio kept


# --- 2. one run per output folder -------------------------------------------------------------------

_HOLDER = '''
import sys, time
from detr_irpe.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print('holding', flush=True)
time.sleep(300)
'''


def _hold(folder):
    holder = subprocess.Popen([PY, '-c', _HOLDER, folder], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'holding'
    return holder


def test_a_second_run_on_a_held_output_dir_says_who_holds_it_before_building_anything(tmp_path):
    out = str(tmp_path / 'out')
    holder = _hold(out)
    try:
        second = _train('--config', SMOKE, '--output_dir', out, '--synthetic_dir', str(tmp_path / 'synthetic'),
                        '--resume', 'auto')
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f'is in use by another run (pid {holder.pid} on {socket.gethostname()}' in second.stderr
    assert 'Traceback' not in second.stderr
    assert not os.path.exists(tmp_path / 'synthetic')  # stopped before the data was built


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = str(tmp_path / 'out')
    holder = _hold(out)
    with pytest.raises(UsageError, match=f'pid {holder.pid}'):
        RunLock(out).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(out).acquire()  # the kernel dropped the dead process's lock
    with open(os.path.join(out, '.lock')) as f:
        assert f.read().startswith(f'pid {os.getpid()} on {socket.gethostname()}, started ')
    lock.release()


def test_a_run_called_from_python_gives_its_folder_back_when_it_raises(tmp_path):
    # A notebook's next call (here: the --resume auto the error asks for) must not find its own process holding it.
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.txt').write_text('')
    args = parse_args_with_config(get_args_parser(), ['--config', SMOKE, '--output_dir', str(out)])
    with pytest.raises(UsageError, match='holds a run'):
        train_tool.run(args)
    RunLock(str(out)).acquire().release()
    gone = tmp_path / 'gone'  # a folder the run made, left empty by its bad input, is removed
    args = parse_args_with_config(get_args_parser(), ['--config', SMOKE, '--output_dir', str(gone), '--eval'])
    with pytest.raises(UsageError, match='--eval evaluates a checkpoint'):
        train_tool.run(args)
    assert not gone.exists()


def test_a_run_called_from_python_gives_back_the_lock_and_the_sigterm_handler_when_it_returns(tmp_path):
    out = tmp_path / 'out'
    args = parse_args_with_config(get_args_parser(), ['--config', SMOKE, '--output_dir', str(out), '--synthetic_dir',
                                                      str(tmp_path / 'syn'), '--synthetic_train', '4',
                                                      '--synthetic_val', '2'])
    before = signal.getsignal(signal.SIGTERM)
    train_tool.run(args)
    assert (out / 'checkpoint.pth').is_file()
    assert signal.getsignal(signal.SIGTERM) is before  # the session still ends on SIGTERM
    RunLock(str(out)).acquire().release()


def test_an_output_dir_that_is_a_file_is_a_usage_error_before_anything_is_built(tmp_path):
    (tmp_path / 'out').write_text('not a folder')
    run = _train('--config', SMOKE, '--output_dir', str(tmp_path / 'out'), '--synthetic_dir', str(tmp_path / 'syn'))
    assert run.returncode == 2 and 'is a file; pass a folder' in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(tmp_path / 'syn')


def test_an_output_dir_below_a_file_is_a_usage_error(tmp_path):
    (tmp_path / 'afile').write_text('not a folder')
    run = _train('--config', SMOKE, '--output_dir', str(tmp_path / 'afile' / 'sub'), '--synthetic_dir',
                 str(tmp_path / 'syn'))
    assert run.returncode == 2 and f'lies below {tmp_path / "afile"}, which is a file' in run.stderr, run.stderr[-3000:]


def test_a_new_run_in_a_finished_runs_folder_is_refused_and_the_run_kept(tmp_path):
    out, data = str(tmp_path / 'out'), ['--synthetic_dir', str(tmp_path / 'syn')]
    first = _train('--config', SMOKE, '--output_dir', out, *data)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {f: (tmp_path / 'out' / f).read_bytes() for f in ('checkpoint.pth', 'checkpoint_best.pth', 'log.txt')}
    again = _train('--config', SMOKE, '--output_dir', out, *data)
    assert again.returncode == 2, again.stderr[-3000:]
    assert 'holds a run (checkpoint.pth, checkpoint_best.pth, log.txt): pass --resume auto' in again.stderr
    assert {f: (tmp_path / 'out' / f).read_bytes() for f in kept} == kept
    # checkpoint.pth deleted to save space: --resume auto started afresh over the best checkpoint and log.txt
    os.remove(tmp_path / 'out' / 'checkpoint.pth')
    del kept['checkpoint.pth']
    again = _train('--config', SMOKE, '--output_dir', out, *data, '--resume', 'auto')
    assert again.returncode == 2, again.stderr[-3000:]
    assert ('holds a run (checkpoint_best.pth, log.txt) without the checkpoint that --resume auto continues '
            '(checkpoint.pth)') in again.stderr
    assert {f: (tmp_path / 'out' / f).read_bytes() for f in kept} == kept
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()


@pytest.mark.slow
def test_under_torchrun_every_process_stops_when_the_folder_is_held(tmp_path):
    out = str(tmp_path / 'out')
    holder = _hold(out)
    try:
        torchrun = os.path.join(os.path.dirname(PY), 'torchrun')
        run = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2', os.path.join(ROOT, 'tools', 'train.py'),
                              '--config', SMOKE, '--output_dir', out, '--synthetic_dir', str(tmp_path / 'syn')],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode != 0
    # both processes stop with the message; neither builds the data
    assert run.stderr.count('is in use by another run') == 1 and run.stderr.count('error: ') == 2, run.stderr[-3000:]
    assert not os.path.exists(tmp_path / 'syn')


# --- 3. checkpoints ---------------------------------------------------------------------------------------

def test_temporaries_of_killed_writes_are_removed_at_start(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    stale = [out / '.checkpoint.pth.k1ll3d_1.pth', out / '.checkpoint_best.pth.k1ll3d_2.pth',
             out / '.eval.json.x2y3z4w5.json']
    for path in stale:
        path.write_bytes(b'part of a write that was killed')
    (out / '.keep').write_text('not ours')
    run = _train('--config', SMOKE, '--output_dir', str(out), '--synthetic_dir', str(tmp_path / 'syn'),
                 '--epochs', '0')
    assert run.returncode == 0, run.stderr[-3000:]
    assert '--epochs 0: data read and checked, model built; nothing trained' in run.stdout
    assert not any(p.exists() for p in stale) and (out / '.keep').exists()


def test_the_checkpoint_before_is_kept_and_resume_auto_falls_back_to_it_naming_the_damaged_file(tmp_path, capsys):
    path, previous = str(tmp_path / 'checkpoint.pth'), str(tmp_path / PREVIOUS_CHECKPOINT)
    for epoch in range(3):
        save_checkpoint({'model': {'w': torch.full((2,), float(epoch))}, 'epoch': epoch}, path, previous=previous)
    assert load_checkpoint(path)['epoch'] == 2 and load_checkpoint(previous)['epoch'] == 1
    with open(path, 'r+b') as f:  # damaged from outside
        f.truncate(100)
    found, checkpoint = load_resume_checkpoint('auto', str(tmp_path))
    assert found == previous and checkpoint['epoch'] == 1
    assert f'warning: checkpoint {path!r} cannot be read' in capsys.readouterr().out
    os.remove(previous)
    with pytest.raises(UsageError, match='No readable checkpoint is left'):
        load_resume_checkpoint('auto', str(tmp_path))


def test_the_folder_is_flushed_after_the_rename(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: flushed.append(os.fstat(fd).st_mode) or real_fsync(fd))
    save_checkpoint({'w': torch.ones(2)}, str(tmp_path / 'checkpoint.pth'))
    assert stat.S_ISREG(flushed[0]) and stat.S_ISDIR(flushed[-1])


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_files_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint({'w': torch.ones(2)}, str(tmp_path / 'checkpoint.pth'))
        save_json({'bbox': [0.0]}, str(tmp_path / 'eval.json'))
        with open(tmp_path / 'log.txt', 'w'):  # what open() gives: the reference
            pass
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ('checkpoint.pth', 'eval.json', 'log.txt')}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


# --- 4. messages -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('head', [b'\xff\xd8\xff\xe0\x00\x10JFIF', bytes(range(7, 107))], ids=['jpeg', 'random'])
def test_a_file_that_is_not_a_checkpoint_says_so_and_never_advises_weights_only_false(tmp_path, head):
    path = tmp_path / 'photo.pth'
    path.write_bytes(head + os.urandom(500))
    with pytest.raises(UsageError) as e:
        load_checkpoint(str(path))
    assert 'not a checkpoint (not a zip or pickle file' in str(e.value) and 'weights_only' not in str(e.value)


def test_a_checkpoint_that_would_run_code_is_refused_without_torchs_advice(code_running_checkpoint):
    path, marker = code_running_checkpoint
    with pytest.raises(UsageError, match='refusing to load') as e:
        load_checkpoint(path)
    assert 'weights_only' not in str(e.value) and not os.path.exists(marker)


def test_a_checkpoint_path_that_is_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(UsageError, match='is a folder'):
        load_checkpoint(str(tmp_path))


def test_a_full_disk_names_the_file_and_the_space_needed(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint({'epoch': 0}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b'the first bytes')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, 'save', disk_full)
    state = {'model': {'w': torch.zeros(3 * 2 ** 20 // 4)}}  # 3 MB of float32
    with pytest.raises(UsageError, match=f'^no space left on device writing {path} \\(needs ~3 MB\\)'):
        save_checkpoint(state, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {'epoch': 0} and os.listdir(tmp_path) == ['checkpoint.pth']


TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu']


def test_a_model_mismatch_names_the_flag_and_both_values_from_the_checkpoints_args():
    ours = get_args_parser().parse_args(TINY)
    theirs = get_args_parser().parse_args(TINY[:5] + ['64'] + TINY[6:])
    wide = build_model(theirs)[0]
    with pytest.raises(UsageError) as e:
        load_model_state(build_model(ours)[0], wide.state_dict(), '--resume x.pth', vars(theirs), ours)
    last = str(e.value).splitlines()[-1]
    assert last == 'The run that wrote it had --hidden_dim 64 (this run: 32); pass the same to continue it.'


@pytest.mark.parametrize('checkpoint, wrong', [({'model': 5}, "'model' entry is int 5"), ([1, 2], 'is list'),
                                               ({'model': {}, 'epoch': 'last'}, "'epoch' entry is str"),
                                               ({'model': {'w': 'text'}}, "'model' entry is a dict of str")])
def test_a_malformed_checkpoint_is_one_line(tmp_path, checkpoint, wrong):
    path = str(tmp_path / 'x.pth')
    torch.save(checkpoint, path)
    model = build_model(get_args_parser().parse_args(TINY))[0]
    with pytest.raises(UsageError) as e:  # what train.py does with --resume x.pth
        _, loaded = load_resume_checkpoint(path, '')
        load_model_state(model, loaded['model'], '--resume x.pth')
    assert wrong in str(e.value) and '\n' not in str(e.value)


# --- 5. a process group missing a process -------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_process_whose_peer_never_arrives_exits_after_dist_timeout(tmp_path):
    """Process 0 of 2, the other never started: it fails after --dist_timeout (a hang is stopped by the
    subprocess timeout, which fails the test)."""
    env = {'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(_free_port())}
    run = subprocess.run([PY, os.path.join(ROOT, 'tools', 'train.py'), '--config', SMOKE, '--dist_timeout', '2',
                          '--output_dir', str(tmp_path / 'out'), '--synthetic_dir', str(tmp_path / 'syn')],
                         cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert 'process 0 of 2: not every process arrived within --dist_timeout 2 s' in run.stderr, run.stderr[-3000:]


# --- gpu_check's gradient cosine -------------------------------------------------------------------------

def test_the_gradient_cosine_is_the_float64_formula_and_never_exceeds_one():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    a = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)  # gradients span orders of magnitude
    b = a + 1e-2 * torch.randn(n, generator=g)
    x, y = a.double().tolist(), b.double().tolist()
    # the definition, with exactly rounded sums
    exact = math.fsum(p * q for p, q in zip(x, y)) / math.sqrt(math.fsum(p * p for p in x) * math.fsum(q * q for q in y))
    assert gradient_cosine(a, b) == pytest.approx(exact, rel=1e-12)  # float64 sums of 2e5 terms: ~1e-13 relative
    assert gradient_cosine(a, a) <= 1.0 and gradient_cosine(a, -a) >= -1.0
