"""DETR with image relative position encoding (iRPE) in the encoder self-attention.

    from detr_irpe import get_args_parser, build_model
    args = get_args_parser().parse_args(['--enc_rpe2d', 'rpe-2.0-product-ctx-1-k'])
    model, criterion, postprocessors = build_model(args)
"""

__version__ = '0.1.0'

from detr_irpe.inductor_cache import use_cache_per_cpu

# Before any torch.compile: inductor's cache must not serve code generated for another CPU ISA.
use_cache_per_cpu()


def __getattr__(name):
    # Lazy, so that `import detr_irpe.irpe` stays light for users who only want the iRPE module.
    if name == 'get_args_parser':
        from detr_irpe.args import get_args_parser
        return get_args_parser
    if name == 'build_model':
        from detr_irpe.detr import build_model
        return build_model
    raise AttributeError(f"module 'detr_irpe' has no attribute {name!r}")
