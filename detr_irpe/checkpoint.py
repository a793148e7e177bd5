"""Files of a run: every file written atomically, checkpoints read without running code and checked against the
model's flags.

A checkpoint is a dict: model, optimizer, lr_scheduler, epoch, args — as DETR's and the published
model-zoo files — plus, in ours, `step` (the next step within `epoch`), `rng` (python, numpy and torch
generator states of the main process) and `rng_per_process` (every process's, for dropout under DDP; see
detr_irpe.preemption), so that a resumed run ends at the same weights as an uninterrupted one.
"""
import argparse
import json
import os
import pickle
import re
import tempfile

import torch

from detr_irpe import UsageError


def atomic_write(path, write_fn):
    """write_fn(temporary path) in path's folder (made when missing), flushed to disk, then renamed to `path`: a kill
    or an error at any moment leaves the previous file or the new one, never a partial one. The file gets the
    permissions open() would give (mkstemp's are the owner's only). Returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # The temporary name keeps the extension: torch.export.save wants .pt2.
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                               suffix=os.path.splitext(path)[1] or '.tmp', dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(state, path):
    """torch.save(state) to `path` atomically: a kill leaves the previous checkpoint or the new one."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_json(obj, path, indent=1, **dump_options):
    """JSON to `path` atomically: a result is never left half written. dump_options go to json.dump."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=indent, **dump_options)
    return atomic_write(path, write)


def load_checkpoint(path):
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain containers only, plus the
    argparse.Namespace that DETR's checkpoints (and the published model-zoo files) keep under 'args'.
    A file whose unpickling would run anything else is refused, and nothing of it runs."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist: pass --resume the path of a .pth file '
                                'written by tools/train.py or downloaded from the model zoo.')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f'refusing to load checkpoint {path!r}: it holds objects other than tensors, plain '
                           f'containers and argparse.Namespace, and unpickling them could run code. Nothing of it '
                           f'was run. Detail: {str(e).splitlines()[0]}') from None
    except Exception as e:  # garbage bytes fail anywhere in the unpickler (EOFError, KeyError, ...)
        raise UsageError(f'checkpoint {path!r} cannot be read ({type(e).__name__}: {e}); it may be truncated or '
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
        raise UsageError('\n'.join(lines))
    model.load_state_dict(state_dict)


def resolve_resume(resume, output_dir):
    """The checkpoint to resume from: --resume as given, or for `--resume auto` output_dir/checkpoint.pth
    when it exists and '' (start fresh) when it does not, so one command line serves the first launch and
    every restart. Under several processes output_dir must be one folder that all of them see."""
    if resume != 'auto':
        return resume
    if not output_dir:
        raise UsageError('--resume auto looks for checkpoint.pth in --output_dir, and no --output_dir was given; '
                         'pass --output_dir RUN_FOLDER.')
    path = os.path.join(output_dir, 'checkpoint.pth')
    # An existing but unreadable file is load_checkpoint's error, not a fresh start that would overwrite it.
    return path if os.path.exists(path) else ''


def load_optimizer_state(optimizer, state, source):
    """optimizer.load_state_dict with a message for the one mismatch a flag explains: the parameter groups."""
    saved, ours = len(state.get('param_groups', [])), len(optimizer.param_groups)
    if saved != ours:
        raise UsageError(f'{source}: its optimizer has {saved} parameter groups, this run {ours}. Runs written '
                         'before the published recipe became the default kept the iRPE tables in a group of their '
                         'own (no weight decay): pass --rpe_weight_decay 0 to continue such a run; otherwise pass '
                         'the --lr_backbone / --rpe_weight_decay of the run that wrote it.')
    optimizer.load_state_dict(state)
