"""detr_irpe.load_detector: a detector for inference from any weights file or folder, with the command line's
defaults for every flag the source does not state (here, beside the parser, as the library may not import it)."""
import argparse
import os

from detr_irpe.cli.flags import add_data_args, device_flag, get_model_parser, new_parser
from detr_irpe.export import SIZE_FLAGS
from detr_irpe.from_checkpoint import build_model_from_checkpoint
from detr_irpe.postprocess import PostProcess


def load_detector(path, device='cpu', **flag_overrides):
    """(model, postprocessors) in eval mode on `device` from `path`: a checkpoint of tools/train.py, a DETR or
    DETR-with-iRPE model-zoo file, or a Hugging Face DetrForObjectDetection folder or weights file
    (detr_irpe.convert). Model flags come from the file; flag_overrides (e.g. attention_impl='sdpa', nheads=8 for a
    weights file alone) win over it, the parser's defaults fill the rest. model.category_names: {id: name} of the
    classes the source was trained on (None where it names none); postprocessors['bbox'] labels only those ids.
    model.size_flags: {'val_size': shorter side, 'val_max_size': longer side at most} of the images the source was
    evaluated on (a checkpoint of tools/train.py), else the parser's defaults (DETR's 800 and 1333), as
    detr_irpe.export.OnnxDetector has them: at another size the model gives other detections.

        model, postprocessors = load_detector('detr-resnet-50/')
        image = make_transforms('val', **model.size_flags)(pil_image)   # detr_irpe_datasets.build.make_transforms:
        outputs = model([image])                                         # resized and normalised as tools/eval.py
        detections = postprocessors['bbox'](outputs, [(pil_image.height, pil_image.width)])
    """
    try:  # the parser's check, as a Python error: parse_args would print usage and exit the caller
        device = device_flag(str(device))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f'load_detector(device={device!r}): {e}') from None
    args = get_model_parser().parse_args(['--device', device, '--backbone_weights', 'none'])
    unknown = sorted(set(flag_overrides) - vars(args).keys())
    if unknown:
        raise TypeError(f'load_detector() got flags it does not know: {", ".join(unknown)}; flags are those of '
                        'tools/train.py without dashes, e.g. attention_impl=\'sdpa\'')
    vars(args).update(flag_overrides, resume=os.fspath(path))
    model, postprocessors, source = build_model_from_checkpoint(args, explicit=set(flag_overrides))
    model.category_names = source.category_names
    defaults = add_data_args(new_parser(), train=False)
    model.size_flags = {flag: source.data_flags.get(flag, defaults.get_default(flag)) for flag in SIZE_FLAGS}
    if source.category_names:  # as tools/predict.py: no label of an id that no class of the model's data has
        postprocessors = {**postprocessors, 'bbox': PostProcess(source.category_names)}
    return model, postprocessors
