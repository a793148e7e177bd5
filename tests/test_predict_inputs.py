"""What predict and visualize_rpe (and the datasets) make of the images and files a user gives: every kind of image
decoded to the 8-bit RGB its pixels mean, a bad file refused before any work, unique image ids and pictures, and
outputs beside the checkpoint, never in a preset's training run folder."""
import importlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe import UsageError, build_model
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.lab.plots import list_images, load_image
from detr_irpe_datasets.build import ensure_synthetic
from detr_irpe_datasets.coco import CocoDetection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')


def tool(name):
    """The module of tools/<name>.py: its get_parser() and run(argv)."""
    return importlib.import_module(f'detr_irpe.cli.{name}')


# ---------------------------------------------------------------------------------- decoding

def sixteen_bit(h=6, w=5):
    """16-bit gray levels from 16705 to 65535, as in the file that PIL's convert('RGB') turned white."""
    return np.linspace(16705, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def scaled_to_8_bits(values):
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def gray_rgb(gray):
    return np.repeat(gray[..., None], 3, axis=-1)


def write_image(folder, kind):
    """(path of an image file of this kind, the 8-bit RGB pixels it shows, computed with numpy)."""
    rng = np.random.default_rng(0)
    if kind == 'png16':
        values = sixteen_bit()
        path = folder / 'png16.png'
        Image.fromarray(values).save(path)  # a 16-bit grayscale PNG: PIL reads it back as mode 'I;16'
        return path, gray_rgb(scaled_to_8_bits(values))
    if kind == 'tiff16_big_endian':
        values = sixteen_bit()
        path = folder / 'big.tif'
        Image.frombytes('I;16B', values.shape[::-1], values.astype('>u2').tobytes()).save(path)
        return path, gray_rgb(scaled_to_8_bits(values))
    if kind == 'int32':
        values = sixteen_bit()
        path = folder / 'int32.tif'
        Image.fromarray(values.astype(np.int32)).save(path)  # mode 'I', values in the 16-bit range
        return path, gray_rgb(scaled_to_8_bits(values))
    if kind == 'gray':
        values = rng.integers(0, 256, (6, 5), dtype=np.uint8)
        path = folder / 'gray.png'
        Image.fromarray(values).save(path)
        return path, gray_rgb(values)
    if kind == 'rgba':
        values = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
        path = folder / 'rgba.png'
        Image.fromarray(values).save(path)
        return path, values[..., :3]  # alpha dropped, colours kept
    if kind == 'palette':
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        indices = rng.integers(0, 256, (6, 5), dtype=np.uint8)
        image = Image.fromarray(indices, 'L')
        image = Image.frombytes('P', image.size, image.tobytes())
        image.putpalette(palette.ravel().tolist())
        path = folder / 'palette.png'
        image.save(path)
        return path, palette[indices]
    raise ValueError(kind)


KINDS = ['png16', 'tiff16_big_endian', 'int32', 'gray', 'rgba', 'palette']


@pytest.mark.parametrize('kind', KINDS)
def test_predict_reads_each_kind_of_image_as_the_8_bit_rgb_it_shows(tmp_path, kind):
    path, expected = write_image(tmp_path, kind)
    image, tensor = load_image(str(path), lambda im: np.asarray(im))
    assert image.mode == 'RGB'
    assert np.array_equal(np.asarray(image), expected)
    assert np.array_equal(tensor, expected)  # the transform is given the same pixels


def write_annotations(folder, names):
    path = folder / 'instances.json'
    images = [{'id': i, 'file_name': n, 'width': 5, 'height': 6} for i, n in enumerate(names, 1)]
    path.write_text(json.dumps({'images': images, 'annotations': [], 'categories': [{'id': 1, 'name': 'a'}]}))
    return path


def test_datasets_read_each_kind_of_image_as_predict_does(tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    written = [write_image(images, kind) for kind in KINDS]
    dataset = CocoDetection(images, write_annotations(tmp_path, [p.name for p, _ in written]))
    for i, (_, expected) in enumerate(written):
        image, target = dataset[i]
        assert int(target['image_id']) == i + 1
        assert np.array_equal(np.asarray(image), expected), KINDS[i]


def write_float_tiff(path):
    Image.fromarray(np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5)).save(path)  # mode 'F'
    return path


def test_a_float_image_is_refused_naming_the_file_its_mode_and_what_to_do(tmp_path):
    path = str(write_float_tiff(tmp_path / 'depth.tif'))
    with pytest.raises(UsageError) as e:
        load_image(path)
    assert path in str(e.value) and "'F'" in str(e.value) and 'PNG' in str(e.value) and '\n' not in str(e.value)


def test_a_32_bit_image_beyond_16_bits_is_refused(tmp_path):
    path = tmp_path / 'big.tif'
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(UsageError, match=r"big\.tif.*'I'.*70000"):
        load_image(str(path))


def test_datasets_skip_a_float_image_with_a_warning_naming_it(tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    write_float_tiff(images / 'depth.tif')
    gray, expected = write_image(images, 'gray')
    dataset = CocoDetection(images, write_annotations(tmp_path, ['depth.tif', gray.name]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        image, target = dataset[0]
    assert int(target['image_id']) == 2 and np.array_equal(np.asarray(image), expected)
    assert dataset.skipped == 1 and any('depth.tif' in str(w.message) and "'F'" in str(w.message) for w in caught)


# ------------------------------------------------------------------ predict on configs/smoke.yaml

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """(folder, flags of predict): an untrained configs/smoke.yaml model saved as tools/train.py saves it in
    folder/run/checkpoint.pth, its synthetic data in folder/data (made by the first tool that reads it)."""
    root = tmp_path_factory.mktemp('smoke')
    args = parse_args_with_config(get_args_parser(), ['--config', SMOKE, '--num_classes', '4'])
    torch.manual_seed(0)
    (root / 'run').mkdir()
    torch.save({'model': build_model(args)[0].state_dict(), 'args': vars(args)}, root / 'run' / 'checkpoint.pth')
    return root, ['--config', SMOKE, '--resume', str(root / 'run' / 'checkpoint.pth'),
                  '--synthetic_dir', str(root / 'data')]


def val_folder(root):
    """The val images of the smoke fixture's synthetic data, made if missing."""
    return ensure_synthetic(parse_args_with_config(get_args_parser(), ['--config', SMOKE, '--synthetic_dir',
                                                                       str(root / 'data')])) / 'val2017'


def test_image_ids_are_unique_and_a_val_id_goes_to_that_very_file_only(smoke, tmp_path):
    root, flags = smoke
    val = val_folder(root)
    annotations = json.loads((root / 'data' / 'annotations' / 'instances_val2017.json').read_text())
    val_ids = {img['file_name']: img['id'] for img in annotations['images']}
    own = tmp_path / 'own'
    own.mkdir()
    shutil.copy(val / '000001.jpg', own / '000001.jpg')  # the user's own file of a val image's name
    Image.fromarray(sixteen_bit(64, 64)).save(own / 'gray.png')
    inputs = [own / 'gray.png', val / '000001.jpg', own / '000001.jpg', val]  # 000001.jpg again, in the folder
    out = tmp_path / 'out'
    tool('predict').run(flags + [str(p) for p in inputs] + ['--output_dir', str(out)])
    images = json.loads((out / 'images.json').read_text())
    ids = {img['file_name']: img['id'] for img in images}
    expected_files = [own / 'gray.png', val / '000001.jpg', own / '000001.jpg'] + sorted(
        p for p in val.iterdir() if p.name != '000001.jpg')
    assert [img['file_name'] for img in images] == [str(p) for p in expected_files]  # a file given twice: once
    assert len(set(ids.values())) == len(images)
    for path in expected_files:
        if path.parent == val:
            assert ids[str(path)] == val_ids[path.name]
        else:
            assert ids[str(path)] > max(val_ids.values()), path  # scored against no val image's boxes
    detections = json.loads((out / 'detections.json').read_text())
    assert {d['image_id'] for d in detections} == set(ids.values())


def test_images_of_one_name_get_pictures_of_their_own(smoke, tmp_path):
    _, flags = smoke
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir()
    b.mkdir()
    rng = np.random.default_rng(1)
    sizes = {a / '000004.jpg': (40, 64), b / '000004.jpg': (48, 64), a / '000004.png': (56, 64),
             a / '000004_2.png': (64, 64)}
    for path, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    out = tmp_path / 'out'
    tool('predict').run(flags + [str(a), str(b), '--output_dir', str(out), '--min_size', '64'])
    pictures = sorted(p for p in os.listdir(out) if p.endswith('.png'))
    assert len(pictures) == len(sizes)
    # each input drawn once, at its own size: the pictures hold every input, none written over
    drawn = sorted(Image.open(out / p).size for p in pictures)
    assert drawn == sorted((w, h) for h, w in sizes.values())


def test_a_folder_gives_its_image_files_and_says_what_it_left_out(tmp_path, capsys):
    # notes and subfolders were left out silently: a folder of dated subfolders predicted on its top level only
    for name in ('a.png', 'B.JPG', 'sub/c.png'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new('RGB', (8, 8)).save(tmp_path / name, format='PNG' if name.endswith('png') else 'JPEG')
    (tmp_path / 'notes.txt').write_text('not an image')
    (tmp_path / '.DS_Store').write_bytes(b'\0\1')
    assert list_images([str(tmp_path)]) == [str(tmp_path / 'B.JPG'), str(tmp_path / 'a.png')]
    assert capsys.readouterr().out == (f'{tmp_path}: 2 images; left out 2 entries, not image files by their names or '
                                       f'subfolders (not searched): notes.txt, sub{os.sep}\n')
    list_images([str(tmp_path / 'sub')])
    assert capsys.readouterr().out == ''  # nothing left out, nothing said


def test_a_bad_file_stops_predict_before_any_work(smoke, tmp_path):
    _, flags = smoke
    folder = tmp_path / 'images'
    folder.mkdir()
    Image.new('RGB', (64, 64), (10, 200, 30)).save(folder / '000.png')  # sorted before the bad file
    (folder / 'broken.jpg').write_text('not an image')
    out = tmp_path / 'out'
    with pytest.raises(UsageError, match='broken.jpg'):
        tool('predict').run(flags + [str(folder), '--output_dir', str(out)])
    assert not out.exists()
    # nor is the model loaded first: with a checkpoint that is no checkpoint, the image is still what is named
    bad_checkpoint = tmp_path / 'checkpoint.pth'
    bad_checkpoint.write_text('no checkpoint')
    with pytest.raises(UsageError, match='broken.jpg'):
        tool('predict').run(['--resume', str(bad_checkpoint), str(folder), '--output_dir', str(out)])


def test_a_file_that_is_no_onnx_model_is_a_usage_error_naming_it(smoke, tmp_path):
    root, _ = smoke
    image = tmp_path / 'x.png'
    Image.new('RGB', (64, 64)).save(image)
    text = tmp_path / 'x.onnx'
    text.write_text('hello')
    for given in (text, root / 'run' / 'checkpoint.pth'):
        with pytest.raises(UsageError) as e:
            tool('predict').run(['--onnx', str(given), str(image), '--output_dir', str(tmp_path / 'out')])
        assert str(given) in str(e.value) and 'not an ONNX model' in str(e.value) and 'tools/export.py' in str(e.value)


def test_an_onnx_file_of_another_exporter_is_a_usage_error_naming_its_outputs(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    from detr_irpe.export import OnnxDetector
    graph = helper.make_graph([helper.make_node('Identity', ['images'], ['logits'])], 'g',
                              [helper.make_tensor_value_info('images', TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info('logits', TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), tmp_path / 'other.onnx')
    with pytest.raises(UsageError, match=r"other.onnx' has the outputs logits, not pred_logits and pred_boxes: it is "
                                         r"no detector of tools/export.py"):
        OnnxDetector(str(tmp_path / 'other.onnx'))


def preset_with_output_dir(tmp_path):
    """configs/smoke.yaml with its output_dir (the training run's folder) moved into tmp_path."""
    text = open(SMOKE).read()
    assert 'output_dir: outputs/smoke' in text
    config = tmp_path / 'smoke.yaml'
    config.write_text(text.replace('output_dir: outputs/smoke', f'output_dir: {tmp_path / "training_run"}'))
    return config


def test_predict_and_visualize_rpe_write_beside_the_checkpoint_not_in_the_presets_folder(smoke, tmp_path):
    root, flags = smoke
    flags = [str(preset_with_output_dir(tmp_path)) if f == SMOKE else f for f in flags]
    image = str(val_folder(root) / '000002.jpg')
    run_folder = root / 'run'
    assert tool('predict').run(flags + [image]) == str(run_folder / 'predict')
    assert (run_folder / 'predict' / 'detections.json').is_file()
    path = tool('visualize_rpe').run(flags + ['--image', image, '--dpi', '30'])
    assert path == str(run_folder / 'rpe_000002_layer0.png') and os.path.isfile(path)
    assert not (tmp_path / 'training_run').exists()
    given = tmp_path / 'given'
    assert tool('predict').run(flags + [image, '--output_dir', str(given)]) == str(given)
