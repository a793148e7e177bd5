"""DETR with image relative position encoding (iRPE) in the encoder self-attention.

    from detr_irpe import build_model
    from detr_irpe.cli.flags import get_args_parser
    args = get_args_parser().parse_args(['--enc_rpe2d', 'rpe-2.0-product-ctx-1-k'])
    model, criterion, postprocessors = build_model(args)

    from detr_irpe import load_detector
    model, postprocessors = load_detector('detr-resnet-50/')   # any detector file or folder, in eval mode
"""

__version__ = '0.1.0'

from detr_irpe.inductor_cache import use_cache_per_cpu

# Before any torch.compile: inductor's cache must not serve code generated for another CPU ISA.
use_cache_per_cpu()


class UsageError(ValueError):
    """Bad input from the user (a flag, a file, the data): the tools print its message in one line, exit status 2.

    Defined here, below the library, the data and the command line, so that each can raise it without importing
    upward; a ValueError, so that callers that catch ValueError keep working."""


def __getattr__(name):
    # Lazy, so that `import detr_irpe.irpe` stays light for users who only want the iRPE module.
    if name == 'build_model':
        from detr_irpe.detr import build_model
        return build_model
    if name == 'load_detector':  # in detr_irpe.cli: it takes the command line's defaults for what a file leaves out
        from detr_irpe.cli.load import load_detector
        return load_detector
    raise AttributeError(f"module 'detr_irpe' has no attribute {name!r}")
