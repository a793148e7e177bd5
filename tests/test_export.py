"""Export to ONNX and torch.export: the exported graph computes what the PyTorch model computes, on image
sizes and batches other than the export's, and bad input gets a message saying what to do.

Exports are slow on 2 cores (10-30 s each): one export per setting, shared by the tests of a module-scoped
fixture; the ONNX ones are marked slow.
"""
import argparse
import json
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detr_irpe import export
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.detr import build_model
from detr_irpe.irpe import rpe_parameters


def tool(name):
    """The module of tools/<name>.py: its get_parser() and run(argv)."""
    return importlib.import_module(f'detr_irpe.cli.{name}')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '64', '--num_queries', '5',
        '--num_classes', '4', '--dropout', '0', '--device', 'cpu',
        # a val size other than the default 800, as a model trained on small images has
        '--val_size', '64', '--val_max_size', '96']
# Batch 2 whose second image is padded, at sizes other than the export's (export.EXAMPLE_SIZE).
CHECK_SIZES = [(2, 161, 203), (2, 96, 352), (2, 289, 130)]
SETTINGS = {
    'plain': '',
    'irpe_k': 'rpe-2.0-product-ctx-1-k',
    'irpe_qkv': 'rpe-2.0-product-ctx-1-qkv',
    'bias': 'rpe-1.9-euc-bias-0-qk',
    'cross': 'rpe-2.0-cross-ctx-1-qkv',
}


def tiny_args(rpe):
    return get_args_parser().parse_args(TINY + ['--enc_rpe2d', rpe])


def tiny_checkpoint(folder, rpe, seed=0):
    """(model in eval mode, checkpoint path): a tiny DETR whose iRPE tables are random (they start at zero,
    which would hide a wrong bucket), saved as tools/train.py saves it."""
    torch.manual_seed(seed)
    args = tiny_args(rpe)
    model = build_model(args)[0].eval()
    with torch.no_grad():
        for table in rpe_parameters(model):
            table.normal_(0.0, 0.5)
    path = os.path.join(folder, 'checkpoint.pth')
    torch.save({'model': model.state_dict(), 'args': vars(args)}, path)
    return model, path


@pytest.fixture(scope='module')
def onnx_exports(tmp_path_factory):
    """setting name -> (PyTorch model, ONNX path, checkpoint path): exported once by tools/export.py, when first
    asked for."""
    done = {}

    def get(name):
        if name not in done:
            folder = str(tmp_path_factory.mktemp(name))
            model, checkpoint = tiny_checkpoint(folder, SETTINGS[name])
            path = os.path.join(folder, 'detr.onnx')
            assert tool('export').run(['--resume', checkpoint, '--output', path]) == path
            done[name] = model, path, checkpoint
        return done[name]
    return get


def pytorch_outputs(model, images, mask):
    with torch.no_grad():
        out = model(images, mask)
    return out['pred_logits'], out['pred_boxes']


@pytest.mark.slow
@pytest.mark.parametrize('setting', list(SETTINGS))
def test_onnxruntime_equals_pytorch_on_other_sizes(onnx_exports, setting):
    model, path, _ = onnx_exports(setting)
    detector = export.OnnxDetector(path)
    for size in CHECK_SIZES:
        images, mask = export.example_inputs(*size)
        assert mask[1].any() and not mask[0].any()
        got = detector(images, mask)
        logits, boxes = pytorch_outputs(model, images, mask)
        assert got['pred_logits'].shape == logits.shape and got['pred_boxes'].shape == boxes.shape
        torch.testing.assert_close(got['pred_logits'], logits, atol=1e-4, rtol=0, msg=lambda m: f'{size}: {m}')
        torch.testing.assert_close(got['pred_boxes'], boxes, atol=1e-4, rtol=0, msg=lambda m: f'{size}: {m}')


@pytest.mark.slow
@pytest.mark.parametrize('setting', list(SETTINGS))
def test_onnx_file_has_standard_operators_only_and_dynamic_inputs(onnx_exports, setting):
    _, path, _ = onnx_exports(setting)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {'', 'ai.onnx'}       # no rpe_ops:: node left
    assert {i.domain: i.version for i in model.opset_import}.get('', 0) >= 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {'images': ['batch', 3, 'height', 'width'], 'mask': ['batch', 'height', 'width']}
    assert [o.name for o in model.graph.output] == ['pred_logits', 'pred_boxes']


def write_images(folder, sizes):
    """Random RGB PNGs of these (height, width) as folder/0.png, 1.png, ...; their paths."""
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = [str(folder / f'{i}.png') for i in range(len(sizes))]
    for path, (h, w) in zip(paths, sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return paths


def same_detections(folder_a, folder_b):
    """Whether tools/predict.py wrote the same images.json and detections.json (boxes within 0.01 pixel, scores
    within 1e-4) and the same files into both folders."""
    for file in ('images.json', 'detections.json'):
        a_all, b_all = (json.loads((folder / file).read_text()) for folder in (folder_a, folder_b))
        assert len(a_all) > 0
        if len(a_all) != len(b_all):
            return False
        for a, b in zip(a_all, b_all):
            if ({k: v for k, v in a.items() if k not in ('bbox', 'score')} !=
                    {k: v for k, v in b.items() if k not in ('bbox', 'score')}
                    or not np.allclose(a.get('bbox', 0), b.get('bbox', 0), atol=1e-2)   # pixels
                    or not np.isclose(a.get('score', 0), b.get('score', 0), atol=1e-4)):
                return False
    return sorted(os.listdir(folder_a)) == sorted(os.listdir(folder_b))


@pytest.mark.slow
def test_predict_with_onnx_writes_the_detections_pytorch_writes(onnx_exports, tmp_path):
    _, path, checkpoint = onnx_exports('irpe_k')
    predict = tool('predict')
    flags = write_images(tmp_path, [(90, 120), (130, 70)]) + ['--val_size', '96', '--val_max_size', '160',
                                                               '--min_size', '16']
    predict.run(flags + ['--resume', checkpoint, '--output_dir', str(tmp_path / 'torch')])
    predict.run(flags + ['--onnx', path, '--output_dir', str(tmp_path / 'onnx')])
    assert same_detections(tmp_path / 'onnx', tmp_path / 'torch')
    with pytest.raises(ValueError, match='20x64 pixels.*at least 33 a side'):
        export.OnnxDetector(path)([torch.zeros(3, 20, 64)])
    with pytest.raises(TypeError, match='image 0 is torch.uint8; the model takes float images normalised'):
        export.OnnxDetector(path)([torch.zeros(3, 64, 64, dtype=torch.uint8)])  # was run as 0-255 floats
    with pytest.raises(TypeError, match=r'mask is torch.int64; expected a bool tensor'):
        export.OnnxDetector(path)(torch.zeros(1, 3, 64, 64), torch.ones(1, 64, 64, dtype=torch.long))


@pytest.mark.slow
def test_predict_with_onnx_resizes_as_the_checkpoint_did_unless_told_otherwise(onnx_exports, tmp_path, capsys):
    _, path, checkpoint = onnx_exports('irpe_k')
    predict = tool('predict')
    # 150 x 200: resized to 64 x 85 as trained (TINY's val size), to 800 x 1066 at the defaults
    image = write_images(tmp_path, [(150, 200)]) + ['--min_size', '16']

    def run(name, *flags):
        predict.run(image + list(flags) + ['--output_dir', str(tmp_path / name)])
        return tmp_path / name

    resume = run('resume', '--resume', checkpoint)
    assert re.search('from the checkpoint: .*--val_size 64, --val_max_size 96', capsys.readouterr().out)
    assert same_detections(run('onnx', '--onnx', path), resume)
    assert 'from the ONNX file: --val_size 64, --val_max_size 96' in capsys.readouterr().out
    # a flag given wins over the file's, the other one is still taken from it
    onnx_72 = run('onnx_72', '--onnx', path, '--val_size', '72')
    assert 'from the ONNX file: --val_max_size 96\n' in capsys.readouterr().out
    assert same_detections(onnx_72, run('resume_72', '--resume', checkpoint, '--val_size', '72'))
    assert not same_detections(onnx_72, resume)
    # a file exported before the size was kept: the defaults, as before
    old = onnx.load(path)
    kept = [p for p in old.metadata_props if p.key not in ('val_size', 'val_max_size')]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, str(tmp_path / 'old.onnx'))
    onnx_old = run('onnx_old', '--onnx', str(tmp_path / 'old.onnx'))
    assert 'from the ONNX file' not in capsys.readouterr().out
    assert same_detections(onnx_old, run('resume_800', '--resume', checkpoint, '--val_size', '800',
                                         '--val_max_size', '1333'))
    assert not same_detections(onnx_old, resume)


# ---- the ONNX lowering of each rpe op, against loops over its definition ----

class RpeOps(torch.nn.Module):
    """All three lowered ops at once: rpe_index, rpe_index_qk and rpe_reduce."""

    def forward(self, input, input_t, values, index, index_t):
        import rpe_ops
        return (rpe_ops.rpe_index(input, index), rpe_ops.rpe_index_qk(input, index, input_t, index_t),
                rpe_ops.rpe_reduce(values, index, input.shape[3]))


def loop_definitions(input, input_t, values, index, index_t):
    B, H, Lq, K = input.shape
    Lk = index.shape[1]
    y, y_qk, r = np.zeros((B, H, Lq, Lk)), np.zeros((B, H, Lq, Lk)), np.zeros((B, H, Lq, K))
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    y[b, h, i, j] = input[b, h, i, index[i, j]]
                    y_qk[b, h, i, j] = input[b, h, i, index[i, j]] + input_t[b, h, j, index_t[i, j]]
                    r[b, h, i, index[i, j]] += values[b, h, i, j]
    return y, y_qk, r


def test_onnx_lowering_of_rpe_ops_matches_their_loop_definitions(tmp_path):
    import rpe_ops
    if not export.onnx_translations():
        pytest.skip('rpe_ops is not compiled: the model exports torch.gather / scatter_add as they are')
    g = torch.Generator().manual_seed(0)

    def inputs(B, H, L, K, Kt):
        return (torch.randn(B, H, L, K, generator=g), torch.randn(B, H, L, Kt, generator=g),
                torch.randn(B, H, L, L, generator=g), torch.randint(0, K, (L, L), generator=g, dtype=torch.int32),
                torch.randint(0, Kt, (L, L), generator=g, dtype=torch.int32))
    B, H, L = (torch.export.Dim(n, min=2, max=64) for n in ('B', 'H', 'L'))
    shapes = {'input': {0: B, 1: H, 2: L}, 'input_t': {0: B, 1: H, 2: L}, 'values': {0: B, 1: H, 2: L, 3: L},
              'index': {0: L, 1: L}, 'index_t': {0: L, 1: L}}
    program = torch.onnx.export(RpeOps().eval(), inputs(2, 2, 5, 7, 3), dynamo=True, dynamic_shapes=shapes,
                                custom_translation_table=export.onnx_translations(), verbose=False)
    program.save(str(tmp_path / 'ops.onnx'))
    session = ort.InferenceSession(str(tmp_path / 'ops.onnx'), providers=['CPUExecutionProvider'])
    assert {n.op_type for n in onnx.load(str(tmp_path / 'ops.onnx')).graph.node} >= {'GatherElements', 'ScatterElements'}
    x = inputs(3, 2, 6, 7, 3)  # other sizes than the export's
    got = session.run(None, {name: t.numpy() for name, t in zip(('input', 'input_t', 'values', 'index', 'index_t'), x)})
    for g_, e in zip(got, loop_definitions(*(t.numpy() for t in x))):
        np.testing.assert_allclose(g_, e, atol=1e-5)
    assert rpe_ops.build_info()['cpu']


# ---- torch.export (.pt2) ----

@pytest.fixture(scope='module')
def pt2_tool_export(tmp_path_factory):
    """A .pt2 written by tools/export.py from a checkpoint of iRPE-QKV (every rpe op), and the model; the folder
    of --output is made, as every tool makes its output's."""
    folder = str(tmp_path_factory.mktemp('pt2'))
    model, checkpoint = tiny_checkpoint(folder, SETTINGS['irpe_qkv'], seed=1)
    path = os.path.join(folder, 'exports', 'detr.pt2')
    assert tool('export').run(['--resume', checkpoint, '--output', path]) == path
    return model, path


def test_pt2_program_reloads_and_gives_pytorch_outputs(pt2_tool_export):
    model, path = pt2_tool_export
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask     # as open() would make it, not mkstemp's 0o600
    program = export.load_pt2(path).module()
    for size in CHECK_SIZES + [(1, 64, 96), (3, 100, 100)]:
        images, mask = export.example_inputs(*size)
        with torch.no_grad():
            logits, boxes = program(images, mask)
        expected = pytorch_outputs(model, images, mask)
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, expected[1], atol=1e-4, rtol=0)


def test_pt2_program_keeps_the_val_size_of_the_checkpoint(pt2_tool_export):
    import rpe_ops  # noqa: F401  the program calls its ops
    _, path = pt2_tool_export
    files = dict.fromkeys(export.SIZE_FLAGS, '')  # filled in by the load (an empty dict would not be: `or {}`)
    torch.export.load(path, extra_files=files)
    assert {k: json.loads(files[k]) for k in ('val_size', 'val_max_size')} == {'val_size': 64, 'val_max_size': 96}


def test_export_leaves_eager_bucket_id_cache_real(pt2_tool_export):
    # Tracing computes bucket ids on fake tensors: none of them may have entered the eager cache.
    from detr_irpe.irpe import get_bucket_ids_2d
    model, _ = pt2_tool_export
    images, mask = export.example_inputs(*export.EXAMPLE_SIZE)
    pytorch_outputs(model, images, mask)
    ids = get_bucket_ids_2d('product', 7, 9, 0, 2.0, 'piecewise', torch.device('cpu'))[0]
    assert type(ids) is torch.Tensor and ids.shape == (63, 63)


# ---- the tool ----

def test_help_shows_an_example():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'export.py'), '--help'], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'python tools/export.py ' in out.stdout and '--format pt2 --output' in out.stdout


# ---- bad input ----

def test_unsupported_opset_is_refused_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool('export').run(['--resume', str(tmp_path / 'missing.pth'), '--output', str(tmp_path / 'm.onnx'), '--opset', '17'])
    assert 'expected an integer in [18, 23]' in capsys.readouterr().err
    with pytest.raises(ValueError, match='opset 24 is not supported.*--opset 18'):
        export.export_onnx(None, str(tmp_path / 'm.onnx'), opset=24)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('output, message', [('dir.onnx', r"is a folder; give a file name, e.g. .*dir.onnx/detr.onnx'"),
                                             ('file.txt/m.onnx', "file.txt' is a file, not a folder")])
def test_output_that_cannot_be_written_is_refused_with_advice(tmp_path, output, message):
    os.makedirs(tmp_path / 'dir.onnx')
    (tmp_path / 'file.txt').write_text('')
    with pytest.raises(ValueError, match=message):
        tool('export').run(['--resume', str(tmp_path / 'missing.pth'), '--output', str(tmp_path / output)])


def test_output_extension_or_format_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool('export').run(['--resume', 'x.pth', '--output', str(tmp_path / 'model.bin')])
    assert '--format onnx or --format pt2' in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_flags_names_the_flag(tmp_path):
    _, checkpoint = tiny_checkpoint(str(tmp_path), SETTINGS['irpe_k'])
    with pytest.raises(ValueError, match='--enc_rpe2d'):
        tool('export').run(['--resume', checkpoint, '--output', str(tmp_path / 'm.pt2'), '--enc_rpe2d', 'rpe-2.0-product-ctx-0-k'])
    assert os.listdir(tmp_path) == ['checkpoint.pth']


def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    def write_half_then_fail(program, path, **options):
        with open(path, 'wb') as f:
            f.write(b'half a program')
        raise RuntimeError('disk full')
    monkeypatch.setattr(export, 'export_program', lambda model, example=None: argparse.Namespace())
    monkeypatch.setattr(torch.export, 'save', write_half_then_fail)
    (tmp_path / 'keep.txt').write_text('other file')
    with pytest.raises(RuntimeError, match='disk full'):
        export.export_pt2(None, str(tmp_path / 'detr.pt2'))
    assert os.listdir(tmp_path) == ['keep.txt']
