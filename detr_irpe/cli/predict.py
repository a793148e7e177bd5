"""Run a checkpoint on image files or folders: write each image with its labelled boxes above a score
threshold as PNG, and all detections as a COCO results JSON.

    python tools/predict.py --config configs/smoke.yaml --resume outputs/smoke/checkpoint.pth \\
        .cache/synthetic_smoke/val2017 --output_dir outputs/smoke/predict
    python tools/predict.py --resume detr_irpe_r50_150ep.pth --coco_path /data/coco street.jpg park.jpg \\
        --threshold 0.7 --output_dir runs/predict
    python tools/predict.py --config configs/smoke.yaml --onnx outputs/smoke/detr.onnx \\
        .cache/synthetic_smoke/val2017 --output_dir outputs/smoke/predict_onnx     # onnxruntime, no checkpoint

Writes output_dir/<image name>.png (<image name>_2.png, _3, ... for a later image of a name already taken:
dirA/x.jpg and dirB/x.jpg, x.jpg and x.png; a picture that would replace an input image is refused before any work),
detections.json (COCO results: image_id, category_id, bbox [x, y, w, h] in pixels of the image file, score; every
query's detection, whatever its score, so it can be scored with pycocotools) and images.json (id, file_name, width,
height of each image: the image_id of detections.json).
An image that is a file of the dataset's val split (that very file, not one of the same name) keeps its id
there; the others are numbered on from the largest val id (from 1 without val annotations), so no two images
share an id and none is scored against another image's boxes. A file given twice is predicted once. Val data named
here (--coco_path, --val_json, --dataset_file, a --config's) must be readable; the checkpoint's own, moved since its
run, is left out with a line saying so (ids then from 1, not those of its val file).
Category names are those stored with the model (checkpoint or ONNX file), else the val annotation file's; val
categories the model has no class for, or under other ids than its names, are refused (as tools/eval.py does).
Model flags, and from a checkpoint of tools/train.py the data and size flags, come from the checkpoint unless given;
each image is padded to multiples of its run's --size_divisibility as tools/eval.py pads a batch (the detections of
tools/eval.py --batch_size 1; --onnx pads none: the file keeps no padding);
the checkpoint is any detector file or folder detr_irpe.convert reads; output_dir defaults to <checkpoint
folder>/predict (a --config preset's output_dir is its training run's folder, so only the command line's counts).
With --onnx FILE (written by tools/export.py) onnxruntime runs the detector instead of PyTorch: the same
pictures and JSON; model flags are not needed, --val_size and --val_max_size come from the file unless given (a
file exported without them: the defaults), --config still gives the data flags (names).
"""
import os
import warnings
from collections import defaultdict

import torch

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError
from detr_irpe.checkpoint import save_json
from detr_irpe.cli.flags import (CHECKPOINT_HELP, MAX_IMAGE_SIDE, add_data_args, add_model_args, add_run_args,
                                 float_range, int_range, new_parser)
from detr_irpe.cli.presets import explicit_flags, output_dir_of_command_line, parse_args_with_config, use_threads
from detr_irpe.cli.runner import run_tool
from detr_irpe.convert import folder_beside
from detr_irpe.detr import batch_images
from detr_irpe.export import SIZE_FLAGS, OnnxDetector
from detr_irpe.from_checkpoint import DATA_LOCATION, adopt_flags, build_model_from_checkpoint
from detr_irpe.lab.plots import draw_detections, list_images, load_image, predict, save_figure
from detr_irpe.postprocess import PostProcess, coco_results


def get_parser():
    parser = new_parser(description=__doc__)
    add_model_args(parser)
    add_run_args(parser, loader=False, resume_help=CHECKPOINT_HELP)
    add_data_args(parser, train=False)  # the val transform, and the category names of the val annotations
    parser.add_argument('inputs', nargs='+', help='image files or folders of images')
    parser.add_argument('--onnx', default=None, metavar='FILE',
                        help='run this ONNX file of tools/export.py with onnxruntime, instead of a checkpoint')
    parser.add_argument('--threshold', type=float_range(0, 1), default=0.5, help='draw the boxes scoring at least this')
    parser.add_argument('--min_size', type=int_range(1, MAX_IMAGE_SIDE), default=512,
                        help='smaller images are drawn enlarged by an integer factor up to at least this size')
    return parser


def val_dataset(args, explicit, stored_names):
    """The val split (a CocoDetection: its annotations and image folder), or None without one (no --coco_path).
    Data that the command line or --config names must be read (build_dataset's UsageError otherwise: a typo would
    number and label the images against no val file); only data taken from the checkpoint, moved since its run, is
    left out, in one line that says so."""
    if args.dataset_file == 'coco' and not (args.coco_path or args.val_json):
        return None
    try:
        return datasets.unwrap(datasets.build_dataset('val', args))
    except (UsageError, OSError) as e:
        if explicit & {*DATA_LOCATION, 'synthetic_dir'}:
            raise
        where = {'coco': args.coco_path or f'{args.val_json} (images {args.val_images})',
                 'synthetic': args.synthetic_dir}[args.dataset_file]
        labels = "the checkpoint's category names" if stored_names else 'category ids'
        print(f"the checkpoint's val data {where} cannot be read ({e}); predicting without it: image ids are numbered "
              f'from 1, not those of its val file, and labels are {labels}. Pass --coco_path or --val_json and '
              '--val_images for the ids of a val file.')
        return None


def image_ids(paths, dataset):
    """The image_id of each path: a val image's where the path is that very file, so that its detections are scored
    against its boxes; else ids above every val id, in input order, so that they are scored against none."""
    by_name = defaultdict(list)  # file name -> (id, path) of the val files of that name; a zip's members are no files
    if dataset is not None and os.path.isdir(dataset.root):
        for img in dataset.coco.dataset['images']:
            val_file = os.path.join(dataset.root, img['file_name'])
            by_name[os.path.basename(val_file)].append((img['id'], val_file))
    next_id = max(dataset.coco.imgs, default=0) + 1 if dataset is not None else 1
    ids = []
    for path in paths:
        candidates = by_name[os.path.basename(path)]
        match = next((c for c in candidates if os.path.isfile(c[1]) and os.path.samefile(path, c[1])), None)
        if match:
            candidates.remove(match)  # a second link to the same val file gets an id of its own
            ids.append(match[0])
        else:
            ids.append(next_id)
            next_id += 1
    return ids


def warn_turned(paths):
    """One warning naming the images whose EXIF orientation shows them turned or mirrored on screen (a phone's
    photos): they are predicted as stored, as training and evaluation read images."""
    from PIL import Image

    from detr_irpe_datasets.coco import EXIF_ORIENTATION
    turned = []
    for path in paths:
        with Image.open(path) as f:
            if f.getexif().get(EXIF_ORIENTATION) in range(2, 9):
                turned.append(path)
    if turned:
        warnings.warn(f'{len(turned)} of the images ({", ".join(turned[:3])}{", ..." if len(turned) > 3 else ""}) '
                      'carry an EXIF orientation that shows them turned or mirrored on screen; they are predicted as '
                      'stored, as training and evaluation read images (their boxes and pictures in the stored '
                      'pixels): to predict them as shown, store them turned (PIL: ImageOps.exif_transpose(im).save('
                      'path); or exiftran -ai *.jpg).')


def check_inputs_kept(paths, pictures, output_dir):
    """A UsageError when a picture would be written over an input image (--output_dir the folder of .png inputs),
    compared as files (os.path.samefile: links and names of another case too)."""
    inputs = {}
    for path in paths:
        stat = os.stat(path)
        inputs[stat.st_dev, stat.st_ino] = path
    for picture in pictures:
        stat = os.stat(picture) if os.path.exists(picture) else None
        if stat is not None and (stat.st_dev, stat.st_ino) in inputs:
            raise UsageError(f'--output_dir {output_dir}: the picture {picture} would be written over the input image '
                             f'{inputs[stat.st_dev, stat.st_ino]}; pass another --output_dir (pictures are named '
                             '<image name>.png).')


def picture_names(paths):
    """<stem>.png per path; <stem>_2.png, _3, ... for a later one whose name is taken, compared without case as
    some file systems compare names."""
    taken, names = set(), []
    for path in paths:
        stem = name = os.path.splitext(os.path.basename(path))[0]
        k = 1
        while name.lower() in taken:
            k += 1
            name = f'{stem}_{k}'
        taken.add(name.lower())
        names.append(name + '.png')
    return names


def run(argv=None):
    parser = get_parser()
    args = parse_args_with_config(parser, argv)
    if bool(args.resume) == bool(args.onnx):
        parser.error('give either --resume CHECKPOINT (the .pth file to run) or --onnx FILE (an export of '
                     'tools/export.py), not both or neither')
    use_threads(args)  # torch's; OnnxDetector sets onnxruntime's
    output_dir_of_command_line(parser, argv, args)
    paths = list_images(args.inputs)
    output_dir = args.output_dir or os.path.join(folder_beside(args.resume or args.onnx), 'predict')
    pictures = [os.path.join(output_dir, name) for name in picture_names(paths)]
    check_inputs_kept(paths, pictures, output_dir)
    warn_turned(paths)
    explicit = explicit_flags(get_parser(), argv)
    size_divisibility = 1  # an ONNX file keeps no padding of its run
    if args.onnx:
        model, postprocessors, device = OnnxDetector(args.onnx, args.threads), {'bbox': PostProcess()}, 'cpu'
        # the size the model was trained at, as --resume takes it from a checkpoint: at another, other detections
        taken = adopt_flags(args, model.size_flags, explicit, SIZE_FLAGS)
        if taken:
            print('from the ONNX file: ' + ', '.join(f'--{k} {getattr(args, k)}' for k in taken))
    else:
        model, postprocessors, source = build_model_from_checkpoint(args, explicit)
        device = torch.device(args.device)
        model.to(device)
        # padded as its run padded val batches, as tools/eval.py pads them: other padding, other detections
        size_divisibility = source.data_flags.get('size_divisibility', 1)
    stored = model.category_names if args.onnx else source.category_names  # the names the model was trained with
    dataset = val_dataset(args, explicit, stored)
    if dataset is not None:  # its ids number the detections and its names may label them: the model's, or refused
        try:
            datasets.check_categories(dataset, stored, model.num_classes if args.onnx else args.num_classes,
                                      f'--onnx {args.onnx}' if args.onnx else f'--resume {args.resume}')
        except UsageError as e:
            raise UsageError(f'{e} Or predict without val annotations (they give only image ids and names here): '
                             'leave out --coco_path, --val_json and a --config that sets them.') from None
    names = stored or (datasets.category_names(dataset) if dataset is not None else {})
    if names:  # detections of the model's categories only: not of an id that no class of its data has
        postprocessors = {**postprocessors, 'bbox': PostProcess(names)}
    transform = datasets.make_transforms('val', val_size=args.val_size, val_max_size=args.val_max_size)

    def padded_model(images):  # a list of images padded as engine.evaluate pads a val batch
        return model(*batch_images(images, size_divisibility))

    results, images = [], []
    for path, image_id, picture in zip(paths, image_ids(paths, dataset), pictures):
        image, tensor = load_image(path, transform)
        detections = predict(padded_model, postprocessors, [(image, tensor)], device)[0]
        images.append({'id': image_id, 'file_name': os.path.abspath(path), 'width': image.width,
                       'height': image.height})
        results += coco_results(image_id, detections)
        fig = draw_detections(image, detections, args.threshold, names, args.min_size)
        out = save_figure(fig, picture, palette=False, tight=False)
        shown = int((detections['scores'] >= args.threshold).sum())
        print(f'{path}: {shown} detections of score >= {args.threshold} -> {out}')
    for name, data in (('detections.json', results), ('images.json', images)):
        save_json(data, os.path.join(output_dir, name), indent=None)
        print(f'wrote {os.path.join(output_dir, name)}')
    return output_dir


def main(argv=None):
    run_tool(run, argv)
