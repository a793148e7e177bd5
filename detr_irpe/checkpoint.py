"""Files of a run: every file written atomically, checkpoints read without running code and checked against the
model's flags.

A checkpoint is a dict: model, optimizer, lr_scheduler, epoch, args — as DETR's and the published
model-zoo files — plus, in ours, `step` (the next step within `epoch`), `rng` (python, numpy and torch
generator states of the main process), `rng_per_process` (every process's, for dropout under DDP; see
detr_irpe.preemption), `epoch_stats_per_process` (each process's running loss sums of the epoch so far) and,
at an epoch's end, `epoch_log` (the epoch's log line before evaluation), so that a resumed run ends at the same
weights and writes the same log as an uninterrupted one.
"""
import argparse
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings

import torch

from detr_irpe import UsageError

CHECKPOINT = 'checkpoint.pth'
PREVIOUS_CHECKPOINT = 'checkpoint.prev.pth'
BEST_CHECKPOINT = 'checkpoint_best.pth'


def check_output_folder(flag, folder):
    """Raise UsageError naming `flag` when `folder` (made when missing, as atomic_write makes it) cannot hold the
    tool's files: checked before any work, so that a long run does not end in an OS error."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f'{flag} {folder!r} is a file, not a folder; give a folder (it is made when missing).')
    _check_writable_below(flag, folder, os.path.abspath(folder))


def check_output_file(flag, path, example):
    """Raise UsageError naming `flag` when the file `path` cannot be written (its folders are made when
    missing); example: a file name to suggest in place of a folder."""
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path!r} is a folder; give a file name, e.g. {os.path.join(path, example)!r}.')
    _check_writable_below(flag, path, os.path.dirname(os.path.abspath(path)))


def _check_writable_below(flag, given, folder):
    existing = folder
    while not os.path.exists(existing):  # the folders still to make: the first existing one decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f'{flag} {given!r}: {existing!r} is a file, not a folder, so nothing can be written below '
                         'it; choose another path.')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'{flag} {given!r}: the folder {existing!r} is not writable; choose a path in a folder you '
                         'can write to.')


def atomic_write(path, write_fn, size_hint=0):
    """write_fn(temporary path) in path's folder (made when missing), flushed to disk, then renamed to `path` and
    the folder flushed too: a kill, a power cut or an error at any moment leaves the previous file or the new one,
    never a partial one. The file gets the permissions open() would give (mkstemp's are the owner's only).
    size_hint: the bytes the file needs, for the message of a full disk. Returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # The temporary name keeps the extension (torch.export.save wants .pt2) and starts with '.' + the file's name,
    # which remove_stale_temporaries looks for.
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
        _fsync_folder(folder)  # the rename itself reaches the disk
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        needed = max(size_hint, os.path.getsize(tmp) if os.path.exists(tmp) else 0,
                     os.path.getsize(path) if os.path.isfile(path) else 0)
        raise UsageError(f'no space left on device writing {path} (needs ~{max(1, round(needed / 2**20))} MB); free '
                         'space there or pass another --output_dir. The previous file, if any, is unchanged.') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder, names=(CHECKPOINT, PREVIOUS_CHECKPOINT, BEST_CHECKPOINT, 'eval.json')):
    """Delete the temporary files that writes of `names` killed midway left in `folder` (atomic_write's
    '.NAME.*'). Only for the run that owns the folder (detr_irpe.run_lock): another run's write would go too.
    Returns the paths removed."""
    removed = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if any(entry.startswith(f'.{name}.') for name in names):
            path = os.path.join(folder, entry)
            os.remove(path)
            removed.append(path)
    return removed


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state, path, previous=None):
    """torch.save(state) to `path` atomically: a kill leaves the previous checkpoint or the new one. previous: a
    path where the checkpoint being replaced is kept (one earlier), so a file damaged later does not lose the run;
    `path` exists at every moment."""
    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object: a full disk is an OSError, not torch's "unexpected pos"
            torch.save(state, f)
        if previous and os.path.isfile(path):
            # A hard link then a rename: the previous file appears whole, and `path` never goes missing.
            link = tmp + '.prev'
            try:
                os.link(path, link)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, link)
            os.replace(link, previous)
    return atomic_write(path, write, size_hint=_tensor_bytes(state))


def save_json(obj, path, indent=1, **dump_options):
    """JSON to `path` atomically: a result is never left half written. dump_options go to json.dump."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=indent, **dump_options)
    return atomic_write(path, write)


# The first bytes of what torch.load reads: a zip archive (torch.save since 1.6) or a pickle of protocol 2 or
# later (the legacy format and plain pickles).
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def load_checkpoint(path):
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain containers only, plus the
    argparse.Namespace that DETR's checkpoints (and the published model-zoo files) keep under 'args'.
    A file whose unpickling would run anything else is refused, and nothing of it runs."""
    if os.path.isdir(path):
        raise UsageError(f'checkpoint {path!r} is a folder; pass --resume the path of a .pth file in it (a run of '
                         f'tools/train.py writes {CHECKPOINT} and {BEST_CHECKPOINT}), or --resume auto with '
                         f'--output_dir {path}; to train from the weights of a Hugging Face folder, pass it to '
                         '--finetune.')
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist: pass --resume the path of a .pth file '
                         'written by tools/train.py or downloaded from the model zoo.')
    with open(path, 'rb') as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_MAGIC):
        raise UsageError(f'{path!r} is not a checkpoint (not a zip or pickle file: it starts with {head!r}); pass a '
                         '.pth file written by tools/train.py or downloaded from the model zoo.')
    try:
        with warnings.catch_warnings():  # torch's warning about pickle protocols says nothing the error does not
            warnings.simplefilter('ignore', UserWarning)
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, which would run the file's code: only its finding is kept.
        found = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)', str(e), re.S)
        detail = found.group(1).splitlines()[0] if found else type(e).__name__
        raise UsageError(f'refusing to load checkpoint {path!r}: it holds objects other than tensors, plain '
                         f'containers and argparse.Namespace, and unpickling them could run code. Nothing of it '
                         f'was run ({detail}). Pass a checkpoint written by tools/train.py or from the model zoo.') from None
    except Exception as e:  # garbage bytes fail anywhere in the unpickler (EOFError, KeyError, ...)
        raise UsageError(f'checkpoint {path!r} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                         'it may be truncated or damaged.') from None


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


def load_model_state(model, state_dict, source='checkpoint', saved_args=None, args=None):
    """Load `state_dict` into `model` exactly; on mismatch, name the keys and the flag that differs: the model flags
    where the checkpoint's saved_args and this run's args disagree, else the flag such keys probably come from."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UsageError(f"{source}: its 'model' entry is {_kind(state_dict)}, expected a dict of tensors; pass a "
                         'checkpoint written by tools/train.py or a DETR model-zoo file.')
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
        differing = differing_model_flags(saved_args, args)
        if differing:
            lines.append('The run that wrote it had ' + ', '.join(f'--{k} {a!r} (this run: {b!r})' for k, a, b in differing)
                         + '; pass the same to continue it.')
        else:
            flags = sorted({_flag_for(k) for k in missing + unexpected + wrong})
            lines.append(f'Probably {" / ".join(flags)} differs from the run that wrote it; pass the flags it was '
                         "trained with (a checkpoint of tools/train.py keeps them under 'args').")
        raise UsageError('\n'.join(lines))
    model.load_state_dict(state_dict)


def check_same_model_flags(checkpoint, args, source):
    """A UsageError naming the model flags this run sets otherwise than the run of tools/train.py that wrote
    `checkpoint`: continuing it would train or evaluate another model on its weights, silently where no shape
    differs (--position_embedding, --enc_rpe2d's index function, --dilation, --pre_norm)."""
    from detr_irpe.convert import WEIGHT_FLAGS  # here: convert imports this module
    if not isinstance(checkpoint.get('args'), dict):
        return  # the published code's Namespace: it spells some values otherwise (DETR's 'v2' for sine)
    # None: a flag the data decides later (num_classes)
    differing = [d for d in differing_model_flags(checkpoint['args'], args, WEIGHT_FLAGS) if d[2] is not None]
    if differing:
        raise UsageError(f'{source}: the run that wrote it had ' + ', '.join(f'--{k} {a!r} (this run: {b!r})'
                                                                            for k, a, b in differing)
                         + '; pass the same flags (its preset) to continue it, or --finetune to start a new run from '
                         'its weights.')


def differing_model_flags(saved_args, args, names=None):
    """[(flag, value in saved_args, value in args)] for the model-shaping flags (names, default convert.MODEL_FLAGS)
    both name and set differently; each side a Namespace or a dict."""
    if saved_args is None or args is None:
        return []
    from detr_irpe.convert import MODEL_FLAGS  # here: convert imports this module
    saved = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args
    ours = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(saved, dict):
        return []
    return [(k, saved[k], ours[k]) for k in names or MODEL_FLAGS if k in saved and k in ours and saved[k] != ours[k]]


def _kind(value):
    if isinstance(value, dict):
        return 'a dict of ' + ', '.join(sorted({type(v).__name__ for v in value.values()}) or ['nothing'])
    return f'{type(value).__name__} {value!r}'[:80]


# What a training checkpoint's entries must be, for resuming.
_RESUME_ENTRIES = {'model': dict, 'optimizer': dict, 'lr_scheduler': dict, 'epoch': int}


def check_training_checkpoint(checkpoint, source):
    """A UsageError in one line unless `checkpoint` has the entries resuming reads, of the right kinds."""
    if not isinstance(checkpoint, dict):
        raise UsageError(f'{source} is {_kind(checkpoint)}, not a checkpoint dict; pass a checkpoint written by '
                         'tools/train.py or a DETR model-zoo file.')
    for key, kind in _RESUME_ENTRIES.items():
        if key in checkpoint and not isinstance(checkpoint[key], kind) or key == 'model' and key not in checkpoint:
            raise UsageError(f"{source}: its {key!r} entry is {_kind(checkpoint.get(key))}, expected a "
                             f'{kind.__name__}; pass a checkpoint written by tools/train.py or a DETR model-zoo file.')
    if not isinstance(checkpoint.get('step'), (int, type(None))):
        raise UsageError(f"{source}: its 'step' entry is {_kind(checkpoint['step'])}, expected an int or None.")


def resolve_resume(resume, output_dir):
    """The checkpoint to resume from: --resume as given, or for `--resume auto` output_dir/checkpoint.pth
    when it exists and '' (start fresh) when it does not, so one command line serves the first launch and
    every restart. Under several processes output_dir must be one folder that all of them see."""
    if resume != 'auto':
        return resume
    if not output_dir:
        raise UsageError('--resume auto looks for checkpoint.pth in --output_dir, and no --output_dir was given; '
                         'pass --output_dir RUN_FOLDER.')
    path = os.path.join(output_dir, CHECKPOINT)
    # An existing but unreadable file is load_checkpoint's error, not a fresh start that would overwrite it.
    return path if os.path.exists(path) else ''


def resume_point(checkpoint):
    """(epoch, step) where a training checkpoint resumes: a mid-epoch one at its own step, an epoch's last one at
    the start of the next epoch."""
    if checkpoint.get('step') is not None:
        return checkpoint['epoch'], checkpoint['step']
    return checkpoint['epoch'] + 1, 0


def logged(output_dir):
    """log.txt's lines as dicts (none without --output_dir or log.txt)."""
    path = os.path.join(output_dir, 'log.txt') if output_dir else ''
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stopped_before_its_log_line(checkpoint, folder):
    """Whether an epoch's-end checkpoint was written by a run that stopped before that epoch's log line (in the
    evaluation that comes between), by the log.txt in `folder`. Resuming it evaluates and writes the line."""
    log = checkpoint.get('epoch_log') if checkpoint.get('step') is None else None
    return log is not None and log['epoch'] not in {line['epoch'] for line in logged(folder)}


def load_resume_checkpoint(resume, output_dir):
    """(path, checkpoint) to resume from, ('', None) to start fresh. For `--resume auto`: output_dir's checkpoint, or
    when it is damaged or missing the one before it (checkpoint.prev.pth), with a warning that names the damaged
    file; an error when every one there is damaged (a fresh start would overwrite them)."""
    if resume != 'auto':
        return (resume, _load_training_checkpoint(resume)) if resume else ('', None)
    resolve_resume(resume, output_dir)  # the error of a missing --output_dir
    candidates = [p for p in (os.path.join(output_dir, name) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))
                  if os.path.exists(p)]
    errors = []
    for path in candidates:
        try:
            checkpoint = _load_training_checkpoint(path)
        except UsageError as e:
            errors.append(str(e))
            continue
        for damaged in errors:
            print(f'warning: {damaged.splitlines()[0]} Resuming from {path}, the checkpoint before it.', flush=True)
        return path, checkpoint
    if errors:
        raise UsageError(' '.join(errors) + ' No readable checkpoint is left in --output_dir: move the damaged files '
                         'away to start the run again, or pass --resume a checkpoint of your own.')
    return '', None


def _load_training_checkpoint(path):
    checkpoint = load_checkpoint(path)
    check_training_checkpoint(checkpoint, f'checkpoint {path!r}')
    return checkpoint


def load_optimizer_state(optimizer, state, source):
    """optimizer.load_state_dict with a message for the one mismatch a flag explains: the parameter groups."""
    saved, ours = len(state.get('param_groups', [])), len(optimizer.param_groups)
    if saved != ours:
        raise UsageError(f'{source}: its optimizer has {saved} parameter groups, this run {ours}. Runs written '
                         'before the published recipe became the default kept the iRPE tables in a group of their '
                         'own (no weight decay): pass --rpe_weight_decay 0 to continue such a run; otherwise pass '
                         'the --lr_backbone / --rpe_weight_decay of the run that wrote it.')
    optimizer.load_state_dict(state)
