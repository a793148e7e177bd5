"""A model for inference from a checkpoint: its model-shaping flags adopted, its weights loaded."""
import argparse

from detr_irpe import UsageError
from detr_irpe.checkpoint import load_checkpoint, load_model_state
from detr_irpe.convert import MODEL_FLAGS
from detr_irpe.detr import build_detector

# What only training reads, for a model built to run: its backbone frozen; dropout and auxiliary outputs as DETR's
# defaults (the model is in eval mode; postprocessing reads the last layer only).
INFERENCE_DEFAULTS = {'lr_backbone': 0.0, 'dropout': 0.1, 'aux_loss': True}


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
    checkpoint = load_checkpoint(args.resume)
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise UsageError(f"checkpoint {args.resume!r} has no 'model' entry; expected a file written by "
                         'tools/train.py or a DETR model-zoo file.')
    taken = adopt_model_flags(args, checkpoint, explicit)
    if taken:
        print('flags from the checkpoint: ' + ', '.join(f'--{k} {getattr(args, k)}' for k in taken))
    if getattr(args, 'num_classes', None) is None and 'class_embed.bias' in checkpoint['model']:
        # Published files keep no num_classes in their args; the classifier's size says it.
        args.num_classes = checkpoint['model']['class_embed.bias'].shape[0] - 1
    for name, value in INFERENCE_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    args.backbone_weights = 'none'
    model, postprocessors = build_detector(args)
    load_model_state(model, checkpoint['model'], f'checkpoint {args.resume}')
    return model.eval(), postprocessors, checkpoint
