"""A model from detector weights of any source detr_irpe.convert reads: for inference (its model-shaping and data
flags adopted, its weights loaded exactly) or to fine-tune (tensors matched by name and shape, the class head by
category name)."""
import os

import torch

from detr_irpe import UsageError
from detr_irpe.checkpoint import differing_model_flags, load_model_state
from detr_irpe.convert import DATA_FLAGS, FORMATS_HELP, MODEL_FLAGS, WEIGHT_FLAGS, read_source
from detr_irpe.detr import build_detector

# What only training reads, for a model built to run: its backbone frozen; dropout and auxiliary outputs as DETR's
# defaults (the model is in eval mode; postprocessing reads the last layer only).
INFERENCE_DEFAULTS = {'lr_backbone': 0.0, 'dropout': 0.1, 'aux_loss': True}
# Where the data is; taken from the source only as a whole, and only when none of them (nor the dataset) is given.
DATA_LOCATION = ('dataset_file', 'coco_path', 'val_json', 'val_images')


def adopt_flags(args, flags, explicit=(), names=MODEL_FLAGS):
    """Copy the values in `flags` of the flags in `names` that args has, except those in `explicit`, into args.
    Returns the names of the flags whose value changed."""
    taken = []
    for flag in names:
        if flag in flags and flag not in explicit and hasattr(args, flag) and getattr(args, flag) != flags[flag]:
            setattr(args, flag, flags[flag])
            taken.append(flag)
    return taken


def adopt_source_flags(args, source, path, explicit=()):
    """The source's model flags, then its data and size flags (the val transform, the dataset; the location only
    when the command line names no data), into args except those given; one line says which were taken. A model
    flag given otherwise than the source states it is a UsageError: its weights would run as another model."""
    where = f'--resume {path}'
    contradicting = [d for d in differing_model_flags(source.flags, args, WEIGHT_FLAGS) if d[0] in explicit]
    if contradicting:
        raise UsageError(f'{where} was trained with ' + ', '.join(f'--{k} {a!r}' for k, a, _ in contradicting)
                         + '; this command gives ' + ', '.join(f'--{k} {b!r}' for k, _, b in contradicting)
                         + ", which builds a model its weights were not trained for. Leave these flags out (the "
                         "checkpoint's values are taken), or train from its weights with tools/train.py --finetune.")
    names = MODEL_FLAGS + tuple(f for f in DATA_FLAGS if f not in DATA_LOCATION or not set(DATA_LOCATION) & set(explicit))
    taken = adopt_flags(args, {**source.data_flags, **source.flags}, explicit, names)
    if taken:
        print('from the checkpoint: ' + ', '.join(f'--{k} {getattr(args, k)}' for k in taken))
    note_unstated_flags(args, source, path, explicit, where)
    return taken


# Model flags no tensor shows, so a file without its run's args or config.json does not state them.
UNSTATED = ('nheads', 'dilation', 'position_embedding')


def note_unstated_flags(args, source, path, explicit, where):
    """Say which of UNSTATED neither the source states nor the command line gives, and what the run takes. DC5 only
    changes strides: a file named so (DETR's detr-r50-dc5-*.pth) runs dilated, as any other would run as C5."""
    unstated = [k for k in UNSTATED if k not in source.flags and k not in explicit and hasattr(args, k)]
    if 'dilation' in unstated and 'dc5' in os.path.basename(os.path.normpath(path)).lower():
        args.dilation = True
        unstated.remove('dilation')
        print(f'{where}: --dilation True, from the file\'s name (DC5); the file does not state it: pass --no-dilation '
              'if it is not a DC5 model')
    if unstated:
        print(f'note: {where} does not state ' + ', '.join(f'--{k}' for k in unstated) + '; this run uses '
              + ', '.join(f'--{k} {getattr(args, k)}' for k in unstated) + ": pass the source's if they differ")


def build_model_from_checkpoint(args, explicit=()):
    """(model, postprocessors, source) for inference from args.resume (any of convert.FORMATS), in eval mode on
    args.device.

    Model-shaping flags come from the source unless given explicitly (so `tools/eval.py --resume detr-r50-irpe.pth`
    needs no other flag), and so do its data and size flags where args has them; the backbone's weights come from
    the source, so nothing is downloaded.
    """
    source = read_source(args.resume)
    adopt_source_flags(args, source, args.resume, explicit)
    for name, value in INFERENCE_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    args.backbone_weights = 'none'
    model, postprocessors = build_detector(args)
    load_model_state(model, source.state_dict, f'checkpoint {args.resume}')
    if source.unused:  # e.g. a segmentation model's mask head
        n = len(source.unused)
        print(f'note: {n} tensor{"s" * (n != 1)} of {args.resume} {"are" if n != 1 else "is"} no part of a detector, '
              f'not loaded ({summarise(source.unused)})')
    return model.eval(), postprocessors, source


CLASS_HEAD = ('class_embed.weight', 'class_embed.bias')


@torch.no_grad()
def load_for_finetuning(model, source, category_names, path):
    """Copy `source`'s tensors into `model` (built from these flags, freshly initialised) where name and shape match.

    A class head of another number of classes, or naming another class at some id, keeps its fresh initialisation
    except the rows of classes whose name both sides have, and the no-object row (the last); any other tensor of
    another shape (the query embeddings of another --num_queries) keeps its own, as do tensors the source lacks (iRPE
    tables added to a plain DETR start from --rpe_init). category_names: {id: name} of the training data. A source
    matching under half of the model's tensors is refused. Returns the one-line report."""
    target = model.state_dict()
    loaded, reinitialised, new = [], {}, []
    # rows carry over only between heads of one width (another --hidden_dim reinitialises the head whole)
    head = [source.state_dict.get(CLASS_HEAD[0]), target.get(CLASS_HEAD[0])]
    rows_fit = None not in head and head[0].shape[1:] == head[1].shape[1:]
    renamed = renamed_ids(source.category_names, category_names)  # a head of one shape, another class at an id
    for name, tensor in target.items():
        value = source.state_dict.get(name)
        if value is None:
            new.append(name)
        elif value.shape == tensor.shape and not (name in CLASS_HEAD and renamed):
            tensor.copy_(value)
            loaded.append(name)
        elif name in CLASS_HEAD and rows_fit:
            reinitialised[name] = 'classes differ'
        else:
            reason = 'num_queries differs' if name.startswith('query_embed.') else 'shape differs'
            reinitialised[name] = f'{reason}: {tuple(value.shape)} in the source, {tuple(tensor.shape)} here'
    if len(loaded) < len(target) / 2:
        raise UsageError(f'--finetune {path}: only {len(loaded)} of the model\'s {len(target)} tensors match the '
                         f'source\'s by name and shape ({source.format}); the model flags given may not fit it, or it '
                         f'is no detector this project reads. Expected {FORMATS_HELP}.')
    if reinitialised.get(CLASS_HEAD[0]) == 'classes differ':
        carried = carry_class_rows(target, source, category_names)
        counts = [source.state_dict[CLASS_HEAD[1]].shape[0] - 1, target[CLASS_HEAD[1]].shape[0] - 1]
        differ = (f'{counts[0]} classes in the source, {counts[1]} here' if counts[0] != counts[1] else
                  f'other classes at ids {summarise([str(i) for i in renamed])}')
        reinitialised[CLASS_HEAD[0]] = reinitialised[CLASS_HEAD[1]] = (
            f'{differ}; carried over: the no-object row and the rows of {len(carried)} classes named on both sides'
            f'{f" ({summarise(carried)})" if carried else ""}')
    unused = sorted(source.state_dict.keys() - target.keys()) + source.unused
    by_reason = {}
    for name, reason in reinitialised.items():
        by_reason.setdefault(reason, []).append(name)
    why = '; '.join(f'{", ".join(names)} ({reason})' for reason, names in by_reason.items())
    return (f'--finetune {path} ({source.format}): {len(loaded)} tensors loaded, {len(reinitialised)} re-initialised'
            f'{f" [{why}]" if why else ""}, {len(new)} new{f" ({summarise(new)})" if new else ""}, {len(unused)} '
            f'unused in the source{f" ({summarise(unused)})" if unused else ""}')


def class_key(name):
    """A class name as compared between a source and the training data: 'Traffic_Light' is 'traffic light'."""
    return ' '.join(name.lower().replace('_', ' ').replace('-', ' ').split())


def renamed_ids(source_names, names):
    """The ids at which the source names another class than the training data (none when either names none)."""
    if not source_names or not names:
        return []
    return [i for i, name in sorted(names.items()) if i not in source_names or
            class_key(source_names[i]) != class_key(name)]


def carry_class_rows(target, source, category_names):
    """Copy the source's class-head rows into `target`'s for the classes both name alike (class_key), and the
    no-object row. Returns the names carried over."""
    by_name = {class_key(name): i for i, name in (source.category_names or {}).items()}
    weight, bias = (source.state_dict[k] for k in CLASS_HEAD)
    carried = []
    for i, name in (category_names or {}).items():
        j = by_name.get(class_key(name))
        if j is not None and j < weight.shape[0] - 1 and i < target[CLASS_HEAD[0]].shape[0] - 1:
            target[CLASS_HEAD[0]][i] = weight[j]
            target[CLASS_HEAD[1]][i] = bias[j]
            carried.append(name)
    target[CLASS_HEAD[0]][-1] = weight[-1]
    target[CLASS_HEAD[1]][-1] = bias[-1]
    return carried


def summarise(names, shown=3):
    return ', '.join(names[:shown]) + (f', ... ({len(names)} in all)' if len(names) > shown else '')
