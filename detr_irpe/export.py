"""Export a detector for deployment: an ONNX file that plain onnxruntime runs, or a torch.export program (.pt2).

The exported graph takes `images` (B, 3, H, W) float32, normalised as for evaluation, and `mask` (B, H, W)
bool, True on padding, with B, H and W dynamic, and returns `pred_logits` (B, Q, num_classes + 1) and
`pred_boxes` (B, Q, 4) normalised cxcywh: the model's own outputs (post-processing stays in Python, see
detr_irpe.postprocess). Bucket ids are computed inside the graph from the feature map's size (see
irpe.cached_when_eager), so one file serves every image size.

Beside the graph each file keeps, as JSON texts, the category names and the val transform's size flags the model
was trained with (file_metadata): an ONNX file in its metadata_props, a .pt2 program as torch.export extra files.

The rpe_ops custom ops stay in the .pt2 program (import rpe_ops before torch.export.load, as load_pt2 does);
in ONNX each becomes standard operators, GatherElements and ScatterElements per bucket id (onnx_translations).
"""
import contextlib
import copy
import json
import math
import os
import warnings

import torch
from torch import nn

from detr_irpe import UsageError
from detr_irpe.checkpoint import atomic_write, check_output_file

FORMATS = ('onnx', 'pt2')
INPUT_NAMES = ('images', 'mask')
OUTPUT_NAMES = ('pred_logits', 'pred_boxes')
# ScatterElements' reduction='add' (rpe_reduce, iRPE on values) is ONNX opset 16; the exporter itself
# starts at 18. onnxscript knows opsets up to 23.
MIN_OPSET, MAX_OPSET = 18, 23
# The smallest height and width the exported graph takes (see dynamic_shapes).
MIN_SIDE = 33
# The val transform's flags an exported file keeps, so that a tool running it resizes images as the model was
# trained to see them: the same model at another size gives other detections.
SIZE_FLAGS = ('val_size', 'val_max_size')
# The example batch of the export: its H x W are not those of the images it will see (all dynamic).
EXAMPLE_SIZE = (2, 224, 288)


class DetectorOutputs(nn.Module):
    """(images (B, 3, H, W), mask (B, H, W)) -> (pred_logits, pred_boxes): the detector without the
    auxiliary decoder outputs, in the tuple form an exported graph returns."""

    def __init__(self, detector):
        super().__init__()
        # A shallow copy that shares the weights: the auxiliary outputs are for training losses, and
        # with one decoder layer their loop is an empty unbind that torch.export.load cannot read back.
        self.detector = copy.copy(detector)
        self.detector.aux_loss = False

    def forward(self, images, mask):
        out = self.detector(images, mask)
        return out['pred_logits'], out['pred_boxes']


def example_inputs(batch=2, height=224, width=288, padded=True):
    """Random (images (batch, 3, height, width), mask (batch, height, width)); with padded, the last image
    covers only the top-left 3/4 x 2/3 of the batch (True in the mask outside it)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if padded and batch > 1:
        mask[-1, height * 3 // 4:, :] = True
        mask[-1, :, width * 2 // 3:] = True
        images[-1].masked_fill_(mask[-1], 0.0)
    return images, mask


def dynamic_shapes():
    """Batch, height and width of both inputs as named dynamic dimensions (the ONNX file keeps the names).

    At least 33 pixels: the backbone's stride is 32, and torch.export treats a size of 1 (a feature map of one
    row or column) as a special case a dynamic dimension cannot take."""
    Dim = torch.export.Dim
    batch = Dim('batch', min=1, max=1024)
    height, width = Dim('height', min=MIN_SIDE, max=8192), Dim('width', min=MIN_SIDE, max=8192)
    return {'images': {0: batch, 2: height, 3: width}, 'mask': {0: batch, 1: height, 2: width}}


def export_program(model, example=None):
    """torch.export.ExportedProgram of DetectorOutputs(model), with dynamic batch, height and width. Puts the
    model in eval mode (dropout off, as for inference)."""
    images, mask = example if example is not None else example_inputs(*EXAMPLE_SIZE)
    with torch.no_grad():
        return torch.export.export(DetectorOutputs(model).eval(), (images, mask), dynamic_shapes=dynamic_shapes())


# ---- ONNX lowering of the rpe_ops custom ops (their definitions: rpe_ops/__init__.py) ----

def _onnx_translations():
    from onnx import TensorProto
    from onnxscript import opset18 as op

    def rpe_index(input, index):
        """y[b, h, i, j] = input[b, h, i, index[i, j]]: index broadcast to (B, H, Lq, Lk), one GatherElements."""
        shape = op.Concat(op.Shape(input, start=0, end=3), op.Shape(index, start=1, end=2), axis=0)
        return op.GatherElements(input, op.Expand(op.Cast(index, to=TensorProto.INT64), shape), axis=3)

    def rpe_index_qk(input, index, input_t, index_t):
        # The key-side term, gathered per key row with the transposed ids, then transposed back.
        key_side = rpe_index(input_t, op.Transpose(index_t, perm=[1, 0]))
        return op.Add(rpe_index(input, index), op.Transpose(key_side, perm=[0, 1, 3, 2]))

    def rpe_reduce(values, index, num_buckets):
        """out[b, h, i, t] = sum over j with index[i, j] == t of values[b, h, i, j]: a ScatterElements
        with reduction 'add' into zeros (B, H, Lq, num_buckets)."""
        shape = op.Concat(op.Shape(values, start=0, end=3), op.Constant(value_ints=[num_buckets]), axis=0)
        zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), values), shape)
        ids = op.Expand(op.Cast(index, to=TensorProto.INT64), op.Shape(values))
        return op.ScatterElements(zeros, ids, values, axis=3, reduction='add')

    return {torch.ops.rpe_ops.rpe_index.default: rpe_index,
            torch.ops.rpe_ops.rpe_index_qk.default: rpe_index_qk,
            torch.ops.rpe_ops.rpe_reduce.default: rpe_reduce}


def onnx_translations():
    """{rpe_ops op overload: onnxscript translation} for torch.onnx.export(custom_translation_table=...);
    empty without the compiled op (the model then runs torch.gather / scatter_add, which export as they are)."""
    import rpe_ops
    if not rpe_ops.build_info()['cpu']:
        return {}
    return _onnx_translations()


def check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f'ONNX opset {opset!r} is not supported: the exporter writes opsets {MIN_OPSET} to '
                         f'{MAX_OPSET}; pass --opset {MIN_OPSET} for the widest runtime support.')


@contextlib.contextmanager
def _quiet_shared_storage():
    """torch.export.save and load warn of weights that are views of one storage (in_proj_weight's slices);
    they are saved and loaded whole, on the CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='No complete tensor found in the group')
        yield


def file_metadata(category_names=None, size_flags=None):
    """{key: JSON text} that an exported file keeps beside its graph: 'category_names' ({id: name}) and the
    SIZE_FLAGS in size_flags ({flag: value}), each only when given."""
    metadata = {flag: json.dumps(size_flags[flag]) for flag in SIZE_FLAGS if flag in (size_flags or {})}
    if category_names:
        metadata['category_names'] = json.dumps({str(k): v for k, v in category_names.items()})
    return metadata


def export_pt2(model, path, example=None, category_names=None, size_flags=None, check=None):
    """Write the torch.export program of `model` to `path` (torch.export.save), with file_metadata(category_names,
    size_flags) as its extra files: torch.export.load(path, extra_files=files) adds them to `files`, which must not
    be empty (torch replaces an empty dict with its own). check(written path), when given, runs on the file before
    it takes `path`'s place: what it raises leaves `path` as it was. Returns the program."""
    program = export_program(model, example)
    metadata = file_metadata(category_names, size_flags)

    def write(tmp):
        torch.export.save(program, tmp, extra_files=metadata)
        if check is not None:
            check(tmp)
    with _quiet_shared_storage():
        check_output_file('--output', path, 'detr.pt2')
        atomic_write(path, write)
    return program


def load_pt2(path):
    """The ExportedProgram saved by export_pt2 (its .module() is callable as (images, mask))."""
    import rpe_ops  # noqa: F401  registers the rpe_ops custom ops the program calls
    with _quiet_shared_storage():
        return torch.export.load(path)


def export_onnx(model, path, opset=MIN_OPSET, example=None, category_names=None, size_flags=None, check=None):
    """Write `model` as one ONNX file (weights inside) at `path`, rpe ops lowered to standard operators, with
    file_metadata(category_names, size_flags) in its metadata_props; check as export_pt2's. Returns the
    torch.onnx.ONNXProgram."""
    check_opset(opset)
    check_output_file('--output', path, 'detr.onnx')
    program = export_program(model, example)
    onnx_program = torch.onnx.export(program, (), opset_version=opset, dynamo=True, input_names=list(INPUT_NAMES),
                                     output_names=list(OUTPUT_NAMES), custom_translation_table=onnx_translations(),
                                     optimize=True, verbose=False)
    # The program's symbols (s0, s1, ...) as the dimension names of dynamic_shapes(), in the whole graph.
    images = onnx_program.model.graph.inputs[0]
    onnx_program.rename_axes({images.shape[0]: 'batch', images.shape[2]: 'height', images.shape[3]: 'width'})
    onnx_program.model.metadata_props.update(file_metadata(category_names, size_flags))

    def write(tmp):
        onnx_program.save(tmp, external_data=False)
        if check is not None:
            check(tmp)
    atomic_write(path, write)
    return onnx_program


def onnx_session(path, threads=0):
    """An onnxruntime InferenceSession of `path` on the CPU (threads 0: onnxruntime's default)."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


class OnnxDetector:
    """An exported ONNX file run by onnxruntime, called as the PyTorch detector is: on a list of (3, H_i, W_i)
    images (padded and masked as the model pads them) or on (images (B, 3, H, W), mask (B, H, W)).
    Returns {'pred_logits', 'pred_boxes'} as CPU torch tensors, ready for detr_irpe.postprocess."""

    def __init__(self, path, threads=0):
        if not os.path.isfile(path):
            raise UsageError(f'ONNX file {path!r} does not exist: write one with tools/export.py '
                                    '--format onnx --output FILE.')
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf
        try:
            self.session = onnx_session(path, threads)
        except (InvalidProtobuf, InvalidGraph, InvalidArgument, Fail) as e:  # a checkpoint, a text file
            why = str(e).splitlines()[0].rpartition(' failed:')[2]  # onnxruntime's reason, without its error code
            raise UsageError(f'ONNX file {path!r} is not an ONNX model ({why}): write one with tools/export.py '
                             '--format onnx --output FILE (a .pth checkpoint is run with --resume).') from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        stored = metadata.get('category_names')
        # {id: name} the exported model was trained with, or None for a file that keeps none
        self.category_names = {int(k): v for k, v in json.loads(stored).items()} if stored else None
        # {flag: value} of the val transform it was trained with; empty for a file exported before they were kept
        self.size_flags = {flag: json.loads(metadata[flag]) for flag in SIZE_FLAGS if flag in metadata}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(OUTPUT_NAMES) - outputs.keys():  # another exporter's file (Optimum's says 'logits')
            raise UsageError(f'ONNX file {path!r} has the outputs {", ".join(outputs)}, not '
                             f'{" and ".join(OUTPUT_NAMES)}: it is no detector of tools/export.py; write one with '
                             'tools/export.py --format onnx --output FILE.')
        logits = outputs['pred_logits']
        # the classes of pred_logits without the no-object class (None where the file leaves the size open)
        self.num_classes = logits.shape[-1] - 1 if isinstance(logits.shape[-1], int) else None

    def __call__(self, samples, mask=None):
        from detr_irpe.detr import images_and_mask
        samples, mask = images_and_mask(samples, mask)
        if min(samples.shape[2:]) < MIN_SIDE:
            raise UsageError(f'images of {samples.shape[2]}x{samples.shape[3]} pixels: the exported graph takes '
                             f'at least {MIN_SIDE} a side; pad or resize them (--val_size) first.')
        outputs = self.session.run(list(OUTPUT_NAMES), {'images': samples.detach().cpu().float().numpy(),
                                                        'mask': mask.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, outputs)}


def run_exported(path, fmt, images, mask):
    """(pred_logits, pred_boxes) of an exported file (fmt 'onnx' or 'pt2') on (images, mask)."""
    if fmt == 'onnx':
        out = OnnxDetector(path)(images, mask)
        return out['pred_logits'], out['pred_boxes']
    with torch.no_grad():
        return load_pt2(path).module()(images, mask)


# A size unlike the export's, so that a check sees the dynamic height and width at work.
CHECK_SIZE = (2, 193, 257)
# How far an exported output may be from PyTorch's: this fraction of its largest |value| (at least 1: boxes in [0, 1]).
# Why 1e-3: float32 sums the exporter reorders differ by ~1e-6 of it (measured, tiny to R50), a wrong op by ~1e-1.
AGREEMENT = 1e-3


@torch.no_grad()
def max_difference(model, path, fmt, size=CHECK_SIZE):
    """(size, output, largest |difference|, bound) between the exported file and `model` on a batch of that size
    (batch, height, width) whose last image is padded: of the output (pred_logits or pred_boxes) nearest its bound,
    AGREEMENT times its largest |value| in PyTorch (at least 1)."""
    images, mask = example_inputs(*size)
    expected = DetectorOutputs(model).eval()(images, mask)
    got = run_exported(path, fmt, images, mask)
    # a NaN in one output and not the other is as different as can be
    measured = [(name, (a - b).abs().nan_to_num(nan=math.inf).max().item(), AGREEMENT * max(1.0, b.abs().max().item()))
                for name, a, b in zip(OUTPUT_NAMES, got, expected)]
    return (size, *max(measured, key=lambda m: m[1] / m[2]))
