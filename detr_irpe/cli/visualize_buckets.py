"""Draw iRPE bucket maps as in the paper's Fig. 6-9: for each method (Euclidean, quantization, cross rows and
columns, product), with the piecewise index function and with clip, the bucket of every position of a 14x14
map seen from (0,0) and from the centre (7,7); one colour per bucket, the reference position outlined.

    python tools/visualize_buckets.py --output_dir docs/images
    python tools/visualize_buckets.py --ratio 3.5 --size 20 --reference 0 0 --reference 10 10 --output_dir runs/buckets

Writes output_dir/buckets_<size>x<size>_ratio<ratio>.png (or --name: .png, .jpg or .jpeg).
"""
import argparse
import os

from detr_irpe import UsageError
from detr_irpe.checkpoint import check_output_file, check_output_folder
from detr_irpe.cli.flags import FIGURE_EXTENSIONS, check_figure_name, float_range, int_range, non_empty
from detr_irpe.cli.runner import run_tool
from detr_irpe.lab.plots import plot_bucket_maps, save_figure


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ratio', type=float_range(0.5, 100), default=1.9,
                   help='iRPE ratio: alpha, beta, gamma = 1, 2, 8 times it')
    p.add_argument('--size', type=int_range(1, 200), nargs='+', default=[14], metavar='N',
                   help='map height (and width, if a second number is given; else square)')
    p.add_argument('--reference', type=int_range(0, 199), nargs=2, action='append', metavar=('ROW', 'COL'),
                   help='reference (query) position; repeat for several (default: 0 0 and the centre)')
    p.add_argument('--index_func', nargs='+', default=['piecewise', 'clip'], choices=['piecewise', 'clip'])
    p.add_argument('--no_numbers', action='store_true', help='colours only, no bucket ids in the cells')
    p.add_argument('--dpi', type=int_range(10, 1200), default=90)
    p.add_argument('--name', default=None, type=non_empty,
                   help=f'file name of the picture, ending in {" ".join(FIGURE_EXTENSIONS)} (default: '
                        'buckets_<height>x<width>_ratio<ratio>.png)')
    p.add_argument('--output_dir', default='outputs')
    return p


def run(argv=None):
    args = get_parser().parse_args(argv)
    if len(args.size) > 2:
        raise UsageError(f'--size takes one or two numbers (height [width]), got {args.size}.')
    height, width = args.size[0], args.size[-1]
    references = [tuple(r) for r in args.reference] if args.reference else [(0, 0), (height // 2, width // 2)]
    for row, col in references:
        if row >= height or col >= width:
            raise UsageError(f'--reference {row} {col} is outside the {height}x{width} map (--size '
                             f'{" ".join(map(str, args.size))}); give a row in 0..{height - 1} and a column in '
                             f'0..{width - 1}, or a larger --size.')
    default_name = f'buckets_{height}x{width}_ratio{args.ratio:g}.png'
    name = args.name or default_name
    check_output_folder('--output_dir', args.output_dir)
    check_figure_name('--name', name)
    path = os.path.join(args.output_dir, name)
    check_output_file('--name', path, default_name)
    fig = plot_bucket_maps(references, height, width, args.ratio, tuple(args.index_func), not args.no_numbers)
    save_figure(fig, path, args.dpi)
    print(f'wrote {path}')
    return path


def main(argv=None):
    run_tool(run, argv)
