"""Checkpoints: written atomically, read without running code, checked against the model's flags.

A checkpoint is a dict: model, optimizer, lr_scheduler, epoch, args — as DETR's and the published
model-zoo files — plus, in ours, `step` (the next step within `epoch`) and `rng` (python, numpy and
torch generator states), so that a resumed run ends at the same weights as an uninterrupted one.
"""
import argparse
import json
import os
import pickle
import random
import re
import tempfile

import numpy as np
import torch


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
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(f'checkpoint {path!r} cannot be read ({e}); it may be truncated or not a torch file.') from None


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
