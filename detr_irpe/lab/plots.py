"""What the inspection tools share: bucket maps (paper Fig. 6-9), the iRPE term b_ij of an encoder layer
(Fig. 5), drawn detections and training logs. Sweeps (Table 6) are in detr_irpe/sweep.py.

Pictures are drawn with matplotlib's Agg backend and returned as figures; the tools save them.
"""
import json
import math
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patches
from matplotlib.colors import ListedColormap

from detr_irpe import UsageError
from detr_irpe.irpe import get_bucket_ids_2d, iRPE_Cross

# --------------------------------------------------------------------------------------------- buckets

# (label, bucket method of get_bucket_ids_2d): the cross method has one map for rows and one for columns.
BUCKET_PANELS = (('Euclidean', 'euc'), ('Quantization', 'quant'), ('Cross (rows)', 'cross_rows'),
                 ('Cross (columns)', 'cross_cols'), ('Product', 'product'))
# 60 distinct colours; bucket id b gets colour b mod 60, so ids 1 apart (and 2*beta_int+1 apart, the next
# row of the product method) always differ in colour.
BUCKET_COLOURS = ListedColormap(np.concatenate([plt.get_cmap(n).colors for n in ('tab20', 'tab20b', 'tab20c')]))


def bucket_map(method, reference, height=14, width=14, ratio=1.9, index_func='piecewise'):
    """(height, width) int array: the bucket id of every key position seen from the query at `reference`
    = (row, col). Relative positions are the query's minus the key's, as in the attention."""
    row, col = reference
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f'reference position {reference} is outside the {height}x{width} map.')
    ids, _ = get_bucket_ids_2d(method, height, width, 0, float(ratio), index_func)
    return ids[row * width + col].reshape(height, width).numpy()


def plot_bucket_maps(references=((0, 0), (7, 7)), height=14, width=14, ratio=1.9,
                     index_funcs=('piecewise', 'clip'), numbers=True):
    """Figure of bucket maps: one row per method, one column per (index function, reference position);
    one colour (and the id written in the cell) per bucket, the reference position outlined."""
    cols = [(f, r) for f in index_funcs for r in references]
    cell = 0.2 if numbers else 0.12
    fig, axes = plt.subplots(len(BUCKET_PANELS), len(cols), squeeze=False,
                             figsize=(len(cols) * (width * cell + 0.3), len(BUCKET_PANELS) * (height * cell + 0.5)))
    for (label, method), row_axes in zip(BUCKET_PANELS, axes):
        for (index_func, ref), ax in zip(cols, row_axes):
            ids = bucket_map(method, ref, height, width, ratio, index_func)
            ax.imshow(ids % BUCKET_COLOURS.N, cmap=BUCKET_COLOURS, vmin=0, vmax=BUCKET_COLOURS.N - 1,
                      interpolation='nearest')
            if numbers:
                for (r, c), b in np.ndenumerate(ids):
                    ax.text(c, r, str(b), ha='center', va='center', fontsize=4.5, color='black')
            ax.add_patch(patches.Rectangle((ref[1] - 0.5, ref[0] - 0.5), 1, 1, fill=False, edgecolor='black',
                                           linewidth=2.2))
            ax.add_patch(patches.Rectangle((ref[1] - 0.5, ref[0] - 0.5), 1, 1, fill=False, edgecolor='white',
                                           linewidth=0.8))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f'{label}, {index_func}\nfrom ({ref[0]},{ref[1]}): {len(np.unique(ids))} buckets',
                         fontsize=7)
    fig.suptitle(f'iRPE buckets on a {height}x{width} map, ratio {ratio} '
                 f'(alpha={ratio:g}, beta={2 * ratio:g}, gamma={8 * ratio:g}); outlined: the reference position',
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def save_figure(fig, path, dpi=100, palette=True, tight=True):
    """Save a figure as PNG (or JPEG, by path's extension: .jpg, .jpeg) and close it. palette: store a PNG with
    at most 256 colours, which keeps flat drawings (maps, plots) a few times smaller; leave it off for
    photographs. tight: crop the empty margin (off: the file has exactly the figure's size in pixels).
    Written atomically: a kill leaves the previous file or the new one."""
    import io
    from PIL import Image
    from detr_irpe.checkpoint import atomic_write
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format='png', bbox_inches='tight' if tight else None, pad_inches=0.1)
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert('RGB')
    if os.path.splitext(path)[1].lower() in ('.jpg', '.jpeg'):
        # JPEG holds no palette image
        return atomic_write(path, lambda tmp: image.save(tmp, quality=95, optimize=True))
    if palette:
        image = image.quantize(256, method=Image.Quantize.MEDIANCUT)
    return atomic_write(path, lambda tmp: image.save(tmp, optimize=True))  # the format of the extension


# ----------------------------------------------------------------------------------- iRPE term b_ij

def encoder_self_attention(model, layer):
    """The RPEMultiheadAttention of encoder layer `layer` (negative counts from the last)."""
    layers = model.transformer.encoder.layers
    if not -len(layers) <= layer < len(layers):
        raise UsageError(f'--layer {layer} does not exist: the encoder has {len(layers)} layers '
                         f'(0 to {len(layers) - 1}, or -1 for the last).')
    attn = layers[layer].self_attn
    if attn.rpe_q is None and attn.rpe_k is None:
        raise UsageError('the model has no iRPE on queries or keys in its encoder (--enc_rpe2d is '
                         f'{"empty" if attn.rpe_v is None else "on values only"}), so there is no b_ij to show; '
                         "use a checkpoint trained with e.g. --enc_rpe2d rpe-2.0-product-ctx-1-k.")
    return attn


@torch.no_grad()
def irpe_logit_terms(model, images, layer=0):
    """The extra attention logits b_ij that iRPE adds in encoder layer `layer` (paper Fig. 5), for a list of
    (3, H, W) images run through the model.

    b = rpe_k(q * d^-0.5) + rpe_q(k * d^-0.5)^T, computed by the layer itself (irpe_logits) from the inputs
    it gets in the forward pass. Returns (b (B, num_heads, L, L), height, width) with L = height * width,
    the tokens of the feature map in row-major order.
    """
    attn = encoder_self_attention(model, layer)
    captured = {}

    def keep(module, args, kwargs):
        names = ('query', 'key', 'value', 'key_padding_mask', 'height', 'width')
        captured.update(zip(names, args))
        captured.update({k: v for k, v in kwargs.items() if k in names})

    handle = attn.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(list(images))
    finally:
        handle.remove()
    b = attn.irpe_logits(captured['query'], captured['key'], captured.get('height'), captured.get('width'))
    height, width = captured.get('height'), captured.get('width')
    if height is None:  # the module was called without the map's size: a square map
        height = width = math.isqrt(b.shape[-1])
    return b.expand(len(images), attn.num_heads, *b.shape[2:]).float().cpu(), height, width


def uniform_reference_positions(height, width, n=5):
    """n x n (row, col) positions spread uniformly over a height x width map: the centres of an n x n grid."""
    rows = [min(height - 1, int((i + 0.5) * height / n)) for i in range(n)]
    cols = [min(width - 1, int((j + 0.5) * width / n)) for j in range(n)]
    return [(r, c) for r in rows for c in cols]


def plot_irpe_terms(image, terms, height, width, references, title=''):
    """Figure: the image with the reference positions numbered, and one map per reference of b_ij over all
    keys j (terms: (L, L), already reduced over heads), on one colour scale. image: PIL image."""
    n = math.isqrt(len(references))
    if n * n != len(references):
        raise ValueError(f'{len(references)} reference positions do not form a square grid.')
    maps = [terms[r * width + c].reshape(height, width).numpy() for r, c in references]
    vmin, vmax = min(m.min() for m in maps), max(m.max() for m in maps)
    if vmin == vmax:
        vmin, vmax = vmin - 1e-6, vmax + 1e-6
    fig = plt.figure(figsize=(4 + 1.6 * n, 1.6 * n + 0.6))
    grid = fig.add_gridspec(n, n + 3, width_ratios=[1] * 2 + [0.15] + [1] * n)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(image)
    img_w, img_h = image.size
    for k, (r, c) in enumerate(references):
        x, y = (c + 0.5) * img_w / width, (r + 0.5) * img_h / height
        ax.plot(x, y, 'o', markersize=9, markerfacecolor='white', markeredgecolor='red')
        ax.text(x, y, str(k + 1), ha='center', va='center', fontsize=5.5, color='black')
    ax.set_title(f'reference positions\n(feature map {height}x{width})', fontsize=8)
    ax.axis('off')
    im = None
    for k, ((r, c), m) in enumerate(zip(references, maps)):
        a = fig.add_subplot(grid[k // n, 3 + k % n])
        im = a.imshow(m, cmap='viridis', vmin=vmin, vmax=vmax, interpolation='nearest')
        a.plot(c, r, 'x', color='red', markersize=5, markeredgewidth=1.5)
        a.set_title(f'{k + 1}: ({r},{c})', fontsize=6.5, pad=2)
        a.set_xticks([])
        a.set_yticks([])
    fig.colorbar(im, ax=fig.axes[1:], fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return fig


def describe_rpe(model, layer=0):
    """A short description of the iRPE of an encoder layer, for titles: e.g. 'product, contextual, 9x9 buckets'."""
    attn = encoder_self_attention(model, layer)
    module = attn.rpe_k if attn.rpe_k is not None else attn.rpe_q
    module = module.rp_rows if isinstance(module, iRPE_Cross) else module
    c = module.config
    side = 2 * c.beta_int + 1
    buckets = f'{side}x{side}' if c.method == 'product' else str(module.num_buckets)
    on = '+'.join(n for n in ('q', 'k') if getattr(attn, f'rpe_{n}') is not None)
    return f'{c.method}, {c.mode}{", clip" if c.index_func == "clip" else ""}, {buckets} buckets, on {on}'


# ------------------------------------------------------------------------------------- predictions

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def list_images(inputs):
    """Image files of `inputs` (files, or folders whose image files are taken in name order, subfolders not
    searched; what a folder's listing left out is said), a file given twice taken once. Each is decoded here
    (load_image), so a file that is no image stops a run before any work."""
    expected = f'expected image files ({", ".join(IMAGE_EXTENSIONS)}) or folders of them'
    paths = []
    for p in inputs:
        if os.path.isdir(p):
            names = sorted(f for f in os.listdir(p) if not f.startswith('.'))  # hidden files: .DS_Store and the like
            found = [os.path.join(p, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise UsageError(f'folder {p!r} holds no image files; {expected}: give the folder that holds them.')
            left = [f + (os.sep if os.path.isdir(os.path.join(p, f)) else '') for f in names
                    if not f.lower().endswith(IMAGE_EXTENSIONS)]
            if left:
                print(f'{p}: {len(found)} images; left out {len(left)} entries, not image files by their names or '
                      f'subfolders (not searched): {", ".join(left[:3])}{", ..." if len(left) > 3 else ""}')
            paths += found
        elif os.path.isfile(p):
            paths.append(p)
        else:
            what = 'is neither a file nor a folder' if os.path.exists(p) else 'does not exist'
            raise UsageError(f'{p!r} {what}; {expected}: check the path.')
    unique = {}
    for p in paths:
        unique.setdefault(os.path.realpath(p), p)
    for p in unique.values():
        load_image(p)
    return list(unique.values())


def load_image(path, transform=None):
    """(PIL 8-bit RGB image, transformed (3, H, W) tensor, or None without a transform); decoded as the datasets
    decode (detr_irpe_datasets.coco.to_rgb8)."""
    from PIL import Image, UnidentifiedImageError

    from detr_irpe_datasets.coco import to_rgb8
    try:
        with Image.open(path) as f:
            image = to_rgb8(f, path)
    except OSError as e:  # PIL's UnidentifiedImageError among them, whose message repeats the path
        why = 'in no format PIL reads' if isinstance(e, UnidentifiedImageError) else str(e)
        raise UsageError(f'cannot read {path!r} as an image ({why}); expected an image file '
                         f'({", ".join(IMAGE_EXTENSIONS)}): convert it or leave it out.') from None
    return image, transform(image) if transform is not None else None


@torch.no_grad()
def predict(model, postprocessors, images, device):
    """Detections for a list of (PIL image, tensor) pairs, in pixels of the PIL images: a list of dicts with
    'scores' (Q,), 'labels' (Q,), 'boxes' (Q, 4) xyxy."""
    outputs = model([t.to(device) for _, t in images])
    sizes = torch.tensor([[img.height, img.width] for img, _ in images], device=device)
    return [{k: v.cpu() for k, v in r.items()} for r in postprocessors['bbox'](outputs, sizes)]


def drawing_scale(width, height, min_size=512):
    """Integer factor by which an image is enlarged for drawing so its longer side is at least min_size."""
    return max(1, math.ceil(min_size / max(width, height)))


def draw_detections(image, detections, threshold=0.5, names=None, min_size=512):
    """Figure of `image` (PIL) with the boxes scoring at least `threshold`, labelled 'name score'. Saved with
    dpi=100 it has exactly the image's size times drawing_scale(...)."""
    names = names or {}
    s = drawing_scale(image.width, image.height, min_size)
    fig = plt.figure(figsize=(image.width * s / 100, image.height * s / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image)
    ax.set_xlim(-0.5, image.width - 0.5)
    ax.set_ylim(image.height - 0.5, -0.5)
    ax.axis('off')
    colours = plt.get_cmap('tab10').colors
    for score, label, (x0, y0, x1, y1) in zip(detections['scores'].tolist(), detections['labels'].tolist(),
                                              detections['boxes'].tolist()):
        if score < threshold:
            continue
        colour = colours[label % len(colours)]
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x0, y0, f'{names.get(label, label)} {score:.2f}', fontsize=9, color='white', va='bottom',
                bbox=dict(facecolor=colour, edgecolor='none', pad=1.5, alpha=0.85))
    return fig


# ------------------------------------------------------------------------------------------- logs

COCO_STATS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
LOG_PANELS = (('train_loss', 'loss'), ('train_loss_ce', 'classification loss'),
              ('train_loss_bbox_unscaled', 'L1 box distance'), ('train_loss_giou_unscaled', '1 - GIoU'),
              ('AP', 'AP (val)'), ('AP50', 'AP50 (val)'))


def read_log(path):
    """The records of a tools/train.py log.txt (JSON lines), one per epoch: a resumed run that logged an
    epoch twice keeps its last record. The COCO stats are also given by name (AP, AP50, ... from
    test_coco_eval_bbox). A last line cut off (no newline: a run killed while writing it) is skipped with a
    warning; a broken line elsewhere is an error."""
    by_epoch = {}
    try:
        with open(path) as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise UsageError(f'{path} is not a text file; expected a log.txt of tools/train.py or the run folder '
                         'holding it.') from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith('\n'):
                print(f'warning: {path}:{n} is cut off (a run stopped while writing it?); skipped it.', flush=True)
                continue
            raise UsageError(f'{path}:{n} is not a JSON line ({e}); expected a log.txt written by '
                             'tools/train.py.') from None
        if not isinstance(record, dict) or 'epoch' not in record:
            raise UsageError(f"{path}:{n} has no 'epoch'; expected a log.txt written by tools/train.py.")
        stats = record.get('test_coco_eval_bbox') or []
        record.update({name: v for name, v in zip(COCO_STATS, stats)})
        by_epoch[record['epoch']] = record
    if not by_epoch:
        raise UsageError(f'{path} holds no epoch record yet.')
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_label(log_path):
    """The name of the run folder a log.txt lives in."""
    return os.path.basename(os.path.dirname(os.path.abspath(log_path))) or log_path


def seed_band(seeds, field, band='minmax'):
    """The curve of `field` over the seeds of one sweep entry: (epochs, mean, low, high) at the epochs where
    every seed logged a value (>= 0). low, high: the min and max over seeds (band 'minmax'), or the mean
    minus and plus their sample standard deviation (band 'std'; zero width for one seed).
    seeds: one list of read_log() records per seed."""
    if band not in ('minmax', 'std'):
        raise ValueError(f"band {band!r} is not one of 'minmax', 'std'.")
    by_seed = [{r['epoch']: r[field] for r in records if r.get(field) is not None and r[field] >= 0}
               for records in seeds]
    epochs = sorted(set.intersection(*(set(values) for values in by_seed)))
    values = np.array([[v[e] for v in by_seed] for e in epochs], dtype=float).reshape(len(epochs), len(seeds))
    mean = values.mean(axis=1)
    if band == 'minmax':
        return epochs, mean, values.min(axis=1), values.max(axis=1)
    sd = values.std(axis=1, ddof=1) if len(seeds) > 1 else np.zeros_like(mean)
    return epochs, mean, mean - sd, mean + sd


def plot_logs(runs, panels=LOG_PANELS, band='minmax'):
    """Figure of training curves: one panel per (field, title), one line per run. runs: {label: records},
    or {label: [records, records, ...]} for the seeds of one sweep entry, drawn as their mean with a band
    (seed_band)."""
    from matplotlib.ticker import MaxNLocator
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for (field, title), ax in zip(panels, axes.flat):
        for label, records in runs.items():
            seeds = records if records and isinstance(records[0], list) else [records]
            epochs, mean, low, high = seed_band(seeds, field, band)
            if epochs:
                line, = ax.plot(epochs, mean, marker='.' if len(epochs) < 30 else None,
                                label=label if len(seeds) == 1 else f'{label} (mean of {len(seeds)} seeds, {band})')
                if len(seeds) > 1 and len(epochs) > 1:
                    ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
                elif len(seeds) > 1:  # one evaluated epoch: a band has no width, so an error bar
                    ax.errorbar(epochs, mean, yerr=[mean - low, high - mean], color=line.get_color(), capsize=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for one epoch
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('epoch', fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    legend = {}  # from every panel: a run may lack the first panel's field (a log without train_loss)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc='lower center', ncol=min(len(legend), 4), fontsize=9,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
