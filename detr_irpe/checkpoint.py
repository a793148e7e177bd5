"""Checkpoints: written atomically, read without running code, checked against the model's flags.

A checkpoint is a dict: model, optimizer, lr_scheduler, epoch, args — as DETR's and the published
model-zoo files — plus, in ours, `step` (the next step within `epoch`), `rng` (python, numpy and torch
generator states of the main process) and `rng_per_process` (every process's, for dropout under DDP), so
that a resumed run ends at the same weights as an uninterrupted one.
"""
import argparse
import json
import os
import pickle
import random
import re
import signal
import sys
import tempfile

import numpy as np
import torch

from detr_irpe import distributed


def save_checkpoint(state, path):
    """Write `state` to `path` through a temporary file in the same folder and a rename: a kill at any
    moment leaves either the previous checkpoint or the new one, never a truncated file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(obj, path, indent=1):
    """Write JSON to `path` atomically (temporary file, then rename): a result is never left half written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain containers only, plus the
    argparse.Namespace that DETR's checkpoints (and the published model-zoo files) keep under 'args'.
    A file whose unpickling would run anything else is refused, and nothing of it runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist: pass --resume the path of a .pth file '
                                'written by tools/train.py or downloaded from the model zoo.')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f'refusing to load checkpoint {path!r}: it holds objects other than tensors, plain '
                           f'containers and argparse.Namespace, and unpickling them could run code. Nothing of it '
                           f'was run. Detail: {str(e).splitlines()[0]}') from None
    except Exception as e:  # garbage bytes fail anywhere in the unpickler (EOFError, KeyError, ...)
        raise RuntimeError(f'checkpoint {path!r} cannot be read ({type(e).__name__}: {e}); it may be truncated or '
                           'not a torch file.') from None


# Which flag most likely differs when a key of this form mismatches.
_FLAG_HINTS = [
    (r'\.rpe_[qkv]\.', '--enc_rpe2d'),
    (r'^backbone\.1\.', '--position_embedding'),
    (r'^backbone\.0\.body\.layer4\.', '--backbone or --dilation'),
    (r'^backbone\.0\.', '--backbone'),
    (r'^class_embed\.', '--num_classes (or --dataset_file)'),
    (r'^query_embed\.', '--num_queries'),
    (r'^transformer\.encoder\.layers\.\d+\.linear', '--dim_feedforward'),
    (r'^transformer\.encoder\.layers\.', '--enc_layers'),
    (r'^transformer\.decoder\.layers\.\d+\.linear', '--dim_feedforward'),
    (r'^transformer\.decoder\.layers\.', '--dec_layers'),
    (r'^transformer\.encoder\.norm\.', '--pre_norm'),
    (r'^(input_proj|transformer|bbox_embed)\.', '--hidden_dim'),
]


def _flag_for(key):
    for pattern, flag in _FLAG_HINTS:
        if re.search(pattern, key):
            return flag
    return 'the model flags'


def load_model_state(model, state_dict, source='checkpoint'):
    """Load `state_dict` into `model` exactly; on mismatch, name the keys and the flag that probably differs."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        lines = [f'{source} does not fit the model built from these flags:']
        for label, keys in (('missing from the checkpoint', missing), ('not in the model', unexpected)):
            if keys:
                lines.append(f'  {label}: {", ".join(keys[:6])}' + (f' ... ({len(keys)} in all)' if len(keys) > 6 else ''))
        for k in wrong[:6]:
            lines.append(f'  {k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model')
        flags = sorted({_flag_for(k) for k in missing + unexpected + wrong})
        lines.append(f'Probably {" / ".join(flags)} differs from the run that wrote it; pass the flags it was '
                     "trained with (a checkpoint of tools/train.py keeps them under 'args').")
        raise ValueError('\n'.join(lines))
    model.load_state_dict(state_dict)


def resolve_resume(resume, output_dir):
    """The checkpoint to resume from: --resume as given, or for `--resume auto` output_dir/checkpoint.pth
    when it exists and '' (start fresh) when it does not, so one command line serves the first launch and
    every restart. Under several processes output_dir must be one folder that all of them see."""
    if resume != 'auto':
        return resume
    if not output_dir:
        raise ValueError('--resume auto looks for checkpoint.pth in --output_dir, and no --output_dir was given; '
                         'pass --output_dir RUN_FOLDER.')
    path = os.path.join(output_dir, 'checkpoint.pth')
    # An existing but unreadable file is load_checkpoint's error, not a fresh start that would overwrite it.
    return path if os.path.exists(path) else ''


def load_optimizer_state(optimizer, state, source):
    """optimizer.load_state_dict with a message for the one mismatch a flag explains: the parameter groups."""
    saved, ours = len(state.get('param_groups', [])), len(optimizer.param_groups)
    if saved != ours:
        raise ValueError(f'{source}: its optimizer has {saved} parameter groups, this run {ours}. Runs written '
                         'before the published recipe became the default kept the iRPE tables in a group of their '
                         'own (no weight decay): pass --rpe_weight_decay 0 to continue such a run; otherwise pass '
                         'the --lr_backbone / --rpe_weight_decay of the run that wrote it.')
    optimizer.load_state_dict(state)


def process_rng_state(checkpoint):
    """This process's generator states from a checkpoint: its own where every process's were kept by a run
    of the same size, else the main process's (older checkpoints, another number of processes)."""
    per_process = checkpoint.get('rng_per_process')
    if per_process and len(per_process) == distributed.get_world_size():
        return per_process[distributed.get_rank()]
    return checkpoint['rng']


# The exit status after the checkpoint of a SIGTERM: 128 + 15, what a process ended by SIGTERM reports, so
# SLURM and torchrun see a terminated run (not a completed one, not a crash of the code), and a requeued job
# continues it with --resume auto.
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM


class Preemption:
    """SIGTERM (SLURM preempting or cancelling a job, torchrun stopping its workers) becomes a request: the
    training loop writes a checkpoint at the current step and exits with PREEMPTED_EXIT_STATUS. The handler
    only sets a flag, so a checkpoint being written when the signal comes is finished, not cut."""

    def __init__(self):
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

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
    with the main process, as always."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def rng_state():
    """The python, numpy and torch generator states, in a form weights_only loading accepts."""
    np_state = np.random.get_state()
    state = {'python': _to_lists(random.getstate()),
             'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_to_tuples(state['python']))
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# Flags that shape the model: taken from a checkpoint's 'args' unless given explicitly.
MODEL_FLAGS = ('backbone', 'dilation', 'position_embedding', 'enc_layers', 'dec_layers', 'dim_feedforward',
               'hidden_dim', 'nheads', 'num_queries', 'pre_norm', 'enc_rpe2d', 'num_classes', 'aux_loss')


def adopt_model_flags(args, checkpoint, explicit=()):
    """Copy the model-shaping flags of the run that wrote `checkpoint` into args, except those in `explicit`.
    Returns the names of the flags taken over."""
    saved = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if saved is None:
        return []
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)
    taken = []
    for flag in MODEL_FLAGS:
        if flag in saved and flag not in explicit and getattr(args, flag, None) != saved[flag]:
            setattr(args, flag, saved[flag])
            taken.append(flag)
    return taken


def build_model_from_checkpoint(args, explicit=()):
    """(model, postprocessors, checkpoint) for inference from args.resume, in eval mode on args.device.

    Model-shaping flags come from the checkpoint's 'args' unless given explicitly (so
    `tools/eval.py --resume detr-r50-irpe.pth` needs no other flag); the backbone's weights come from the
    checkpoint, so nothing is downloaded.
    """
    from detr_irpe.detr import build_model
    checkpoint = load_checkpoint(args.resume)
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise ValueError(f"checkpoint {args.resume!r} has no 'model' entry; expected a file written by "
                         'tools/train.py or a DETR model-zoo file.')
    taken = adopt_model_flags(args, checkpoint, explicit)
    if taken:
        print('flags from the checkpoint: ' + ', '.join(f'--{k} {getattr(args, k)}' for k in taken))
    if getattr(args, 'num_classes', None) is None and 'class_embed.bias' in checkpoint['model']:
        # Published files keep no num_classes in their args; the classifier's size says it.
        args.num_classes = checkpoint['model']['class_embed.bias'].shape[0] - 1
    args.backbone_weights = 'none'
    model, _, postprocessors = build_model(args)
    load_model_state(model, checkpoint['model'], f'checkpoint {args.resume}')
    return model.eval(), postprocessors, checkpoint
