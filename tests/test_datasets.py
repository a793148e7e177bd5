"""COCO-layout loading: targets, odd images, bad data, zip folders, the public helpers."""
import argparse
import json
import warnings
import zipfile

import pytest
import torch
from PIL import Image

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError
from detr_irpe.cli.flags import add_data_args
from detr_irpe_datasets import coco
from detr_irpe_datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, make_transforms

# image id -> (file name, mode, width, height); ids and category ids deliberately non-contiguous
IMAGES = {7: ('rgb.jpg', 'RGB', 64, 48), 42: ('gray.jpg', 'L', 40, 30), 1000: ('cmyk.jpg', 'CMYK', 50, 40),
          3: ('empty.png', 'RGB', 32, 32), 55: ('broken.jpg', 'RGB', 64, 64)}
CATEGORIES = [{'id': 2, 'name': 'two'}, {'id': 5, 'name': 'five'}, {'id': 17, 'name': 'seventeen'}]
ANNOTATIONS = [
    {'id': 101, 'image_id': 7, 'category_id': 5, 'bbox': [4, 6, 20, 10]},
    {'id': 102, 'image_id': 7, 'category_id': 17, 'bbox': [30, 20, 34, 28]},
    {'id': 103, 'image_id': 42, 'category_id': 2, 'bbox': [0, 0, 10, 10]},
    {'id': 104, 'image_id': 42, 'category_id': 2, 'bbox': [5, 5, 10, 10], 'iscrowd': 1},  # crowd: dropped
    {'id': 105, 'image_id': 1000, 'category_id': 5, 'bbox': [-5, 10, 20, 50]},  # clipped to [0, 10, 15, 40]
    {'id': 106, 'image_id': 1000, 'category_id': 17, 'bbox': [10, 10, 0, 5]},  # zero width: dropped
    {'id': 107, 'image_id': 1000, 'category_id': 99, 'bbox': [1, 1, 5, 5]},  # unknown category: dropped
    {'id': 108, 'image_id': 55, 'category_id': 2, 'bbox': [1, 1, 5, 5]},
]
# expected targets, boxes in original pixels (x1, y1, x2, y2)
EXPECTED = {7: ([[4, 6, 24, 16], [30, 20, 64, 48]], [5, 17]), 42: ([[0, 0, 10, 10]], [2]),
            1000: ([[0, 10, 15, 40]], [5]), 3: ([], [])}


def write_coco(root, split='val', zipped=False, images=IMAGES, annotations=ANNOTATIONS, given=None, turned=()):
    """A COCO-layout folder with the images above (broken.jpg truncated) and their annotations; `given`: image id
    -> (width, height) the annotation file says instead of the truth; `turned`: ids stored with EXIF orientation
    6 (shown turned 90 degrees)."""
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    folder = root / f'{split}2017'
    folder.mkdir()
    for image_id, (name, mode, w, h) in images.items():
        colour = {'RGB': (200, 30, 60), 'L': 90, 'CMYK': (0, 255, 0, 0)}[mode]
        exif = Image.Exif()
        if image_id in turned:
            exif[coco.EXIF_ORIENTATION] = 6
        Image.new(mode, (w, h), colour).save(folder / name, quality=100, exif=exif.tobytes())
    if (folder / 'broken.jpg').exists():
        data = (folder / 'broken.jpg').read_bytes()
        (folder / 'broken.jpg').write_bytes(data[:len(data) // 3])
    anns = [{'area': a['bbox'][2] * a['bbox'][3], 'iscrowd': 0, **a} for a in annotations]
    images = [{'id': i, 'file_name': n, **dict(zip(('width', 'height'), (given or {}).get(i, (w, h))))}
              for i, (n, _, w, h) in images.items()]
    (root / 'annotations' / f'instances_{split}2017.json').write_text(
        json.dumps({'images': images, 'annotations': anns, 'categories': CATEGORIES}))
    if zipped:
        with zipfile.ZipFile(root / f'{split}2017.zip', 'w') as z:
            for path in sorted(folder.iterdir()):
                z.write(path, f'{split}2017/{path.name}')
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return root


def load(root, split='val'):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dataset = coco.build(split, root, make_transforms('val', val_size=60, val_max_size=1000))
    return dataset, caught


def items_by_id(dataset):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        return {int(t['image_id']): (img, t) for img, t in (dataset[i] for i in range(len(dataset)))}


def unnormalise(image):
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


@pytest.mark.parametrize('zipped', [False, True], ids=['folder', 'zip'])
def test_targets_match_the_annotations_computed_by_hand(tmp_path, zipped):
    dataset, _ = load(write_coco(tmp_path, zipped=zipped))
    items = items_by_id(dataset)
    assert set(items) == set(EXPECTED)  # broken.jpg was replaced by the next readable image
    for image_id, (boxes, labels) in EXPECTED.items():
        image, target = items[image_id]
        _, _, w, h = IMAGES[image_id]
        scale = 60 / min(w, h)
        new_h, new_w = (60, int(60 * w / h)) if h <= w else (int(60 * h / w), 60)
        assert image.shape == (3, new_h, new_w) and image.dtype == torch.float32
        assert target['size'].tolist() == [new_h, new_w] and target['size'].dtype == torch.int64
        assert target['orig_size'].tolist() == [h, w] and target['orig_size'].dtype == torch.int64
        assert target['image_id'].dtype == torch.int64 and target['image_id'].shape == ()
        assert target['labels'].tolist() == labels and target['labels'].dtype == torch.int64
        assert target['iscrowd'].tolist() == [0] * len(labels)
        expected = torch.tensor([[(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
                                 for x1, y1, x2, y2 in boxes], dtype=torch.float32).reshape(-1, 4)
        assert target['boxes'].dtype == torch.float32 and type(target['boxes']) is torch.Tensor
        torch.testing.assert_close(target['boxes'], expected, atol=1e-2, rtol=0)  # resize rounds the long side
        expected_area = torch.tensor([(x2 - x1) * (y2 - y1) * scale ** 2 for x1, y1, x2, y2 in boxes])
        torch.testing.assert_close(target['area'], expected_area.float(), rtol=0.05, atol=0)


@pytest.mark.parametrize('zipped', [False, True], ids=['folder', 'zip'])
def test_an_entry_whose_size_is_not_its_images_is_warned_once_with_the_likely_cause(tmp_path, zipped):
    """A phone photo stored 40x24 with EXIF orientation 6 and annotated as shown (24x40); a picture resized after
    annotating (the file says 80x48.0); both are read as stored, as COCO and DETR read images."""
    images = {1: ('phone.jpg', 'RGB', 40, 24), 2: ('resized.jpg', 'RGB', 40, 24), 3: ('turned.jpg', 'RGB', 40, 24),
              4: ('no_size.jpg', 'RGB', 40, 24), 5: ('square.jpg', 'RGB', 30, 30)}
    given = {1: (24, 40), 2: (80, 48.0), 4: (None, None), 5: (30, 30)}  # 3: its true size; 4: none given
    root = write_coco(tmp_path, zipped=zipped, images=images, annotations=[], given=given, turned=(1, 3, 5))
    dataset, _ = load(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        reads = [dataset[i] for _ in range(2) for i in range(5)]
    sizes = {int(t['image_id']): t['orig_size'].tolist() for _, t in reads}
    assert sizes == {i: [24, 40] for i in (1, 2, 3, 4)} | {5: [30, 30]}
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages   # once per image id over two reads; none where the size is right or absent
    assert messages[0].startswith('image id 1: ') and 'phone.jpg is 40x24 but its annotation entry says 24x40; its ' \
        'EXIF orientation turns the stored 40x24 pixels to 24x40 on screen' in messages[0]
    assert 'exif_transpose' in messages[0]
    assert messages[1].startswith('image id 2: ') and 'resized.jpg is 40x24 but its annotation entry says 80x48; ' \
        'its boxes may land in the wrong place' in messages[1]


def test_grayscale_and_cmyk_images_become_rgb(tmp_path):
    items = items_by_id(load(write_coco(tmp_path))[0])
    gray = unnormalise(items[42][0])
    assert gray.shape[0] == 3
    torch.testing.assert_close(gray, torch.full_like(gray, 90 / 255), atol=0.02, rtol=0)
    cmyk = unnormalise(items[1000][0]).mean(dim=(1, 2))  # C=0 M=1 Y=0 K=0 is magenta
    torch.testing.assert_close(cmyk, torch.tensor([1.0, 0.0, 1.0]), atol=0.05, rtol=0)


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path):
    dataset, _ = load(write_coco(tmp_path))
    broken = dataset.ids.index(55)
    with pytest.warns(UserWarning, match='broken.jpg'):
        image, target = dataset[broken]
    assert int(target['image_id']) == dataset.ids[broken + 1]
    assert dataset.skipped == 1


@pytest.mark.parametrize('zipped', [False, True], ids=['folder', 'zip'])
@pytest.mark.parametrize('context', ['fork', pytest.param('spawn', marks=pytest.mark.slow)])
def test_skipped_counter_adds_up_over_dataloader_workers(tmp_path, context, zipped):
    dataset, _ = load(write_coco(tmp_path, zipped=zipped))
    dataset[0]  # the main process reads first (and opens the zip), then the dataset goes to the workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=datasets.collate_fn,
                                         multiprocessing_context=context)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        epochs = [list(loader) for _ in range(2)]
    assert [len(batches) for batches in epochs] == [len(IMAGES)] * 2  # the broken image's place is filled
    assert dataset.skipped == 2  # one failed read per epoch, counted in the workers


def test_bad_boxes_and_unknown_categories_warn_naming_file_and_annotation_id(tmp_path):
    dataset, caught = load(write_coco(tmp_path))
    messages = [str(w.message) for w in caught]
    assert any('instances_val2017.json' in m and '107' in m and 'category' in m for m in messages)
    index = dataset.ids.index(1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dataset[index]
        dataset[index]
    messages = [str(w.message) for w in caught]
    assert sum('annotation id 105' in m and 'clipped' in m for m in messages) == 1  # once per id
    assert sum('annotation id 106' in m and 'dropped' in m for m in messages) == 1
    assert all('instances_val2017.json' in m for m in messages)


def test_read_warnings_are_given_once_over_loader_workers_and_epochs(tmp_path, monkeypatch):
    """Workers are forked anew each epoch: a flag each copied from the main process warned again every epoch (a
    dataset of many clipped boxes repeated them all). A box out by a pixel or less is clipped without a word."""
    annotations = ANNOTATIONS + [{'id': 109, 'image_id': 7, 'category_id': 5, 'bbox': [40.5, 0, 24, 48.75]}]
    root = write_coco(tmp_path, annotations=annotations, given={3: (16, 16)})  # 3: an entry of another size
    dataset, _ = load(root)
    said = tmp_path / 'warnings.txt'

    class Warnings:  # a forked worker's warnings, in a file: pytest records them in each process's own memory
        @staticmethod
        def warn(message):
            with open(said, 'a') as f:
                f.write(message.replace('\n', ' ') + '\n')

    monkeypatch.setattr(coco, 'warnings', Warnings)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=datasets.collate_fn,
                                         multiprocessing_context='fork')
    epochs = [{int(t['image_id']): t for _, (t,) in loader} for _ in range(2)]
    lines = said.read_text().splitlines()
    for needle in ('annotation id 105 reaches outside', 'annotation id 106 has zero', 'image id 3: '):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert not any('annotation id 109' in line for line in lines), lines
    assert sum('broken.jpg' in line for line in lines) == 2  # an unreadable image is met, and said, each epoch
    w, h = IMAGES[7][2:]
    for targets in epochs:  # 109 clipped to the image's right edge: [40.5, 0, 64, 48] in pixels
        box = targets[7]['boxes'][-1] * torch.tensor([w, h, w, h])
        torch.testing.assert_close(box, torch.tensor([(40.5 + 64) / 2, 24, 64 - 40.5, 48]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_workers_warnings_print_in_one_line_under_spawn(tmp_path, capfd):
    # a worker that was not forked (spawn; Python 3.14's default forkserver) started with Python's two-line format
    from detr_irpe.cli.runner import loader_worker_init
    dataset, _ = load(write_coco(tmp_path))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=1, collate_fn=datasets.collate_fn,
                                         multiprocessing_context='spawn', worker_init_fn=loader_worker_init)
    list(loader)
    err = capfd.readouterr().err
    assert 'warning: ' in err and 'annotation id 105 reaches outside the 50x40 image' in err, err[-2000:]
    assert 'UserWarning' not in err and 'warnings.warn(' not in err, err[-2000:]


def test_missing_paths_raise_errors_that_name_them(tmp_path):
    with pytest.raises(UsageError, match='--coco_path'):
        coco.build('val', None, None)
    with pytest.raises(UsageError, match='nowhere'):
        coco.build('val', tmp_path / 'nowhere', None)
    with pytest.raises(UsageError, match='instances_train2017.json'):
        coco.build('train', write_coco(tmp_path), None)
    (tmp_path / 'annotations' / 'instances_train2017.json').write_text('{}')
    with pytest.raises(UsageError, match='train2017.zip'):
        coco.build('train', tmp_path, None)


@pytest.mark.parametrize('prefix', ['images/', 'images\\'], ids=['wrong folder', 'windows separators'])
def test_a_file_where_no_image_is_found_names_one_and_the_folder(tmp_path, prefix):
    # the run stopped saying only "no usable image entry (of 5)": no file, no folder
    root = write_coco(tmp_path)
    path = root / 'annotations' / 'instances_val2017.json'
    data = json.loads(path.read_text())
    for image in data['images']:
        image['file_name'] = prefix + image['file_name']
    path.write_text(json.dumps(data))
    first = data['images'][0]
    expected = (f"no usable image entry (of 5), e.g. image id {first['id']} file {first['file_name']!r} is not in the "
                f"image folder {root / 'val2017'}")
    with pytest.raises(UsageError) as error:
        coco.build('val', root, None)
    assert expected in str(error.value)
    assert ("its '\\' separates folders on Windows only: write '/'" in str(error.value)) == ('\\' in prefix)


def test_boxes_written_as_corners_get_one_warning_at_load(tmp_path):
    # [x1, y1, x2, y2] boxes read as [x, y, w, h] trained on boxes too large, with one clipping warning per box
    boxes = [(2, 2, 10, 8), (30, 4, 20, 12), (10, 25, 30, 15), (40, 30, 20, 10)]
    annotations = [{'id': 200 + i, 'image_id': 7, 'category_id': 5, 'bbox': list(box)} for i, box in enumerate(boxes)]
    corners = [dict(a, bbox=[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]])
               for a in annotations]
    width, height = IMAGES[7][2:]
    past = [a['id'] for a in corners
            if a['bbox'][0] + a['bbox'][2] > width + 1 or a['bbox'][1] + a['bbox'][3] > height + 1]
    assert len(past) == 3  # of 4: the first box lies in the top-left quarter, whose corners fit either way
    for boxes, warned in ((annotations, False), (corners, True)):
        root = write_coco(tmp_path / str(warned), annotations=boxes)
        _, caught = load(root)
        said = [str(w.message) for w in caught if 'reach past' in str(w.message)]
        assert len(said) == warned, said
    assert f"3 of 4 boxes reach past their image's width or height (e.g. annotation id {past[0]}: " in said[0]
    assert 'convert them (width = x2 - x1, height = y2 - y1)' in said[0]


def parser_args(argv):
    return add_data_args(argparse.ArgumentParser()).parse_args(argv)


def test_dataset_args_defaults_are_detr_settings():
    args = parser_args([])
    assert args.train_scales == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert (args.train_max_size, args.val_size, args.val_max_size) == (1333, 800, 1333)
    assert args.crop_scales == [400, 500, 600] and args.crop_size == [384, 600]


def test_build_dataset_collate_and_coco_api(tmp_path):
    write_coco(tmp_path, 'train')
    args = parser_args(['--coco_path', str(tmp_path), '--train_scales', '40', '48', '--train_max_size', '100',
                        '--crop_scales', '40', '--crop_size', '20', '30'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dataset = datasets.build_dataset('train', args)
        images, targets = datasets.collate_fn([dataset[0], dataset[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert all(((t['boxes'] >= 0) & (t['boxes'] <= 1)).all() for t in targets)
    subset = torch.utils.data.Subset(torch.utils.data.Subset(dataset, [0, 1]), [0])
    assert datasets.get_coco_api_from_dataset(subset) is dataset.coco
    assert datasets.num_classes_for(subset) == 18
    assert datasets.num_classes_for(args) == 91
    args.dataset_file = 'voc'  # a namespace made in code, past the parser's choices
    with pytest.raises(ValueError, match="'voc'"):
        datasets.build_dataset('train', args)
