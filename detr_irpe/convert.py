"""Detector weights from elsewhere, renamed to this model's parameter names.

Three formats are read:
- 'detr-irpe': a checkpoint of tools/train.py, {'model': state_dict, 'args': {flag: value}, ...};
- 'published': a file of the DETR-with-iRPE model zoo or of facebookresearch/detr (detr-r50-e632da11.pth),
  {'model': state_dict} with, in some, 'args' as an argparse.Namespace; their names are already ours;
- 'huggingface': a transformers DetrForObjectDetection folder as save_pretrained writes it and the hub serves it
  (config.json + model.safetensors or pytorch_model.bin), that weights file alone, or a hub id whose snapshot the
  Hugging Face cache holds; timm ResNet backbones (use_timm_backbone, the hub's default) or transformers' own ResNet.

    from detr_irpe.convert import read_source
    source = read_source('detr-resnet-50/')   # source.state_dict in our names, source.flags for get_args_parser
"""
import json
import os
import re
from dataclasses import dataclass, field

import torch

from detr_irpe import UsageError
from detr_irpe.checkpoint import BEST_CHECKPOINT, CHECKPOINT, load_checkpoint

FORMATS = ('detr-irpe', 'published', 'huggingface')
FORMATS_HELP = ("a checkpoint of tools/train.py; a DETR-with-iRPE model-zoo or facebookresearch/detr .pth file "
                "({'model': state_dict}); a Hugging Face DetrForObjectDetection folder (config.json with "
                "model.safetensors or pytorch_model.bin, as save_pretrained writes it), its weights file alone, or "
                "its hub id (facebook/detr-resnet-50) when the Hugging Face cache holds it")
HF_WEIGHTS_FILES = ('model.safetensors', 'pytorch_model.bin')

# Flags that shape the model: what a source states and a model built from it adopts unless they are given.
MODEL_FLAGS = ('backbone', 'dilation', 'position_embedding', 'enc_layers', 'dec_layers', 'dim_feedforward',
               'hidden_dim', 'nheads', 'num_queries', 'pre_norm', 'enc_rpe2d', 'num_classes', 'aux_loss')
# Those that give the weights their meaning (--aux_loss only adds losses at the intermediate decoder layers): a run
# or a tool must not set them otherwise than the checkpoint's run did.
WEIGHT_FLAGS = tuple(f for f in MODEL_FLAGS if f != 'aux_loss')
# Flags of the data a checkpoint of tools/train.py was trained on, which the inference tools take as defaults.
DATA_FLAGS = ('dataset_file', 'coco_path', 'val_json', 'val_images', 'val_size', 'val_max_size', 'synthetic_dir',
              'synthetic_train', 'synthetic_val', 'synthetic_image_size', 'synthetic_classes', 'synthetic_objects',
              'synthetic_object_size', 'synthetic_seed', 'size_divisibility')

# The 80 COCO categories by id (1..90, with gaps), the classes of every published DETR and DETR-with-iRPE file.
COCO_CATEGORY_NAMES = {
    1: 'person', 2: 'bicycle', 3: 'car', 4: 'motorcycle', 5: 'airplane', 6: 'bus', 7: 'train', 8: 'truck',
    9: 'boat', 10: 'traffic light', 11: 'fire hydrant', 13: 'stop sign', 14: 'parking meter', 15: 'bench',
    16: 'bird', 17: 'cat', 18: 'dog', 19: 'horse', 20: 'sheep', 21: 'cow', 22: 'elephant', 23: 'bear',
    24: 'zebra', 25: 'giraffe', 27: 'backpack', 28: 'umbrella', 31: 'handbag', 32: 'tie', 33: 'suitcase',
    34: 'frisbee', 35: 'skis', 36: 'snowboard', 37: 'sports ball', 38: 'kite', 39: 'baseball bat',
    40: 'baseball glove', 41: 'skateboard', 42: 'surfboard', 43: 'tennis racket', 44: 'bottle', 46: 'wine glass',
    47: 'cup', 48: 'fork', 49: 'knife', 50: 'spoon', 51: 'bowl', 52: 'banana', 53: 'apple', 54: 'sandwich',
    55: 'orange', 56: 'broccoli', 57: 'carrot', 58: 'hot dog', 59: 'pizza', 60: 'donut', 61: 'cake', 62: 'chair',
    63: 'couch', 64: 'potted plant', 65: 'bed', 67: 'dining table', 70: 'toilet', 72: 'tv', 73: 'laptop',
    74: 'mouse', 75: 'remote', 76: 'keyboard', 77: 'cell phone', 78: 'microwave', 79: 'oven', 80: 'toaster',
    81: 'sink', 82: 'refrigerator', 84: 'book', 85: 'clock', 86: 'vase', 87: 'scissors', 88: 'teddy bear',
    89: 'hair drier', 90: 'toothbrush',
}
COCO_NUM_CLASSES = 91  # largest id + 1, DETR's convention

# Where our model's tensors live; a source key that maps outside these is unused.
OUR_PREFIXES = ('backbone.0.body.', 'backbone.1.', 'input_proj.', 'query_embed.', 'transformer.', 'class_embed.',
                'bbox_embed.')

# Blocks per ResNet stage and whether they are bottlenecks -> --backbone.
RESNETS = {((2, 2, 2, 2), False): 'resnet18', ((3, 4, 6, 3), False): 'resnet34',
           ((3, 4, 6, 3), True): 'resnet50', ((3, 4, 23, 3), True): 'resnet101'}
HF_RESNET_LAYER_TYPES = {'basic': False, 'bottleneck': True}

# DETR's own names of --position_embedding.
DETR_POSITION_EMBEDDINGS = {'v2': 'sine', 'v3': 'learned'}

# Hugging Face DetrForObjectDetection names -> ours: first the module prefix (a key matching none is unused),
# then, in order, the names inside it. Names are those save_pretrained writes and the hub serves; transformers 5
# calls some of them otherwise in memory (backbone.model, o_proj, mlp.fc1, position_embedding outside the
# backbone), which a torch.save of its state_dict keeps, so both are accepted.
HF_PREFIXES = [
    (r'model\.backbone\.(?:conv_encoder\.)?model\.', 'backbone.0.body.'),
    (r'model\.(?:backbone\.)?position_embedding\.row_embeddings\.', 'backbone.1.row_embed.'),
    (r'model\.(?:backbone\.)?position_embedding\.column_embeddings\.', 'backbone.1.col_embed.'),
    (r'model\.input_projection\.', 'input_proj.'),
    (r'model\.query_position_embeddings\.', 'query_embed.'),
    (r'model\.decoder\.layernorm\.', 'transformer.decoder.norm.'),
    (r'model\.(encoder|decoder)\.layers\.', r'transformer.\1.layers.'),
    (r'class_labels_classifier\.', 'class_embed.'),
    (r'bbox_predictor\.', 'bbox_embed.'),
]
HF_LAYER_NAMES = [
    (r'(layers\.\d+\.)self_attn_layer_norm\.', r'\1norm1.'),
    (r'(encoder\.layers\.\d+\.)final_layer_norm\.', r'\1norm2.'),
    (r'(decoder\.layers\.\d+\.)encoder_attn_layer_norm\.', r'\1norm2.'),
    (r'(decoder\.layers\.\d+\.)final_layer_norm\.', r'\1norm3.'),
    (r'(decoder\.layers\.\d+\.)encoder_attn\.', r'\1multihead_attn.'),
    (r'(layers\.\d+\.)(?:mlp\.)?fc([12])\.', r'\1linear\2.'),
    (r'(attn\.)o_proj\.', r'\1out_proj.'),
]
# transformers' own ResNet (use_timm_backbone=False) inside the body -> torchvision's names (timm's are the same).
HF_RESNET_BLOCK = re.compile(r'encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:shortcut|layer\.(\d+))\.'
                             r'(convolution|normalization)\.')
HF_RESNET_STEM = {'embedder.embedder.convolution.': 'conv1.', 'embedder.embedder.normalization.': 'bn1.'}
# nn.MultiheadAttention keeps q, k and v projections as one (3E, E) in_proj_weight, in that order.
HF_QKV = re.compile(r'(.*attn)\.([qkv])_proj\.(weight|bias)$')


@dataclass
class Source:
    """Weights read from a file or folder, in our names.

    state_dict: tensors under this model's parameter and buffer names.
    flags: model-shaping flags (get_args_parser's names) that the source states, in its args or config.json or
        through its tensors' shapes.
    category_names: {category id: name}, or None when the source names no classes.
    format: one of FORMATS.
    unused: source keys that map to no tensor of this model.
    data_flags: the DATA_FLAGS its run was given (a checkpoint of tools/train.py; empty for the others).
    """
    state_dict: dict
    flags: dict
    category_names: dict | None
    format: str
    unused: list
    data_flags: dict = field(default_factory=dict)


def read_source(path) -> Source:
    """Read detector weights from `path` (any of FORMATS, recognised by content) and rename them to ours."""
    source = read_any(path)
    if not source.state_dict:
        raise not_a_source(path, f'none of its {len(source.unused)} tensors is named as a DETR tensor')
    return source


def read_any(path):
    if is_hub_id(path):
        path = hub_snapshot(path)
    if os.path.isdir(path):
        return read_huggingface_folder(path)
    if not os.path.isfile(path):
        raise UsageError(f'{path!r} does not exist; expected {FORMATS_HELP}.')
    config_path = os.path.join(os.path.dirname(path), 'config.json')
    if os.path.basename(path) in HF_WEIGHTS_FILES and os.path.isfile(config_path):
        # the weights file of a save_pretrained folder: its config says what the shapes cannot
        return read_huggingface_folder(os.path.dirname(path) or '.', weights=path)
    kind = file_kind(path)
    if kind == 'safetensors':
        obj = read_safetensors(path)
    elif kind == 'torch':
        obj = load_checkpoint(path)
    else:
        raise not_a_source(path, 'it is neither a torch file nor a safetensors file')
    if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        if isinstance(obj.get('args'), dict):
            return from_detr(obj['model'], obj['args'], 'detr-irpe', obj.get('category_names'))
        declared = vars(obj['args']) if obj.get('args') is not None else {}
        return from_detr(obj['model'], declared, 'published')
    if is_state_dict(obj) and any(looks_huggingface(k) for k in obj):
        return from_huggingface(obj, config=None)
    if is_state_dict(obj) and any(k.startswith(('transformer.', 'detr.transformer.')) for k in obj):
        return from_detr(obj, {}, 'published')
    raise not_a_source(path, f'it holds a {type(obj).__name__} of neither layout')


# owner/name, e.g. facebook/detr-resnet-50; not a file's name (runs/best.pth mistyped is a missing file)
HUB_ID = re.compile(r'[\w.-]+/[\w.-]+(?<!\.pth)(?<!\.pt)(?<!\.bin)(?<!\.safetensors)(?<!\.ckpt)')


def is_hub_id(path):
    """Whether `path` names a Hugging Face hub model to read from the cache: owner/name, and nothing of that name here
    (a folder of that name wins, as in transformers)."""
    return not os.path.exists(path) and bool(HUB_ID.fullmatch(path))


def folder_beside(path):
    """Where the inference tools write by default: the folder of the checkpoint at `path`; for a hub id read from the
    cache, outputs/<owner>--<name> (neither the cache nor a folder named after the owner)."""
    if is_hub_id(path):
        return os.path.join('outputs', path.replace('/', '--'))
    return os.path.dirname(os.path.abspath(path).rstrip(os.sep))


def hub_cache():
    """The folder of Hugging Face's hub cache, as huggingface_hub finds it."""
    home = os.environ.get('HF_HOME') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser(os.path.join('~', '.cache')), 'huggingface')
    return os.environ.get('HF_HUB_CACHE') or os.environ.get('HUGGINGFACE_HUB_CACHE') or os.path.join(home, 'hub')


def hub_snapshot(model_id):
    """The folder of `model_id`'s snapshot in the hub cache (its main revision, else its only one), which
    transformers' from_pretrained or `huggingface-cli download` left there; nothing is downloaded."""
    repo = os.path.join(hub_cache(), 'models--' + model_id.replace('/', '--'))
    snapshots = os.path.join(repo, 'snapshots')
    main = os.path.join(repo, 'refs', 'main')
    if os.path.isfile(main):
        with open(main) as f:
            found = [f.read().strip()]
    else:
        found = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    if len(found) > 1:
        raise UsageError(f'the Hugging Face cache holds {len(found)} revisions of {model_id!r} and none marked main; '
                         f'pass the folder of one: {os.path.join(snapshots, found[-1])}')
    if not found or not os.path.isdir(os.path.join(snapshots, found[0])):
        raise UsageError(f'{model_id!r} is no file or folder here, nor a model in the Hugging Face cache '
                         f'{hub_cache()} (nothing is downloaded); fetch it once where there is a network '
                         f'(`huggingface-cli download {model_id}`, or transformers\' from_pretrained) and pass the '
                         'id again, or pass its folder.')
    return os.path.join(snapshots, found[0])


def not_a_source(path, why):
    return UsageError(f'{path!r} is not a detector file this project reads ({why}); expected {FORMATS_HELP}.')


def file_kind(path):
    """'torch' (zip or legacy pickle), 'safetensors' (8-byte header length, then JSON) or None, from the bytes."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
        return 'torch'
    if len(head) == 9 and head[8:9] == b'{':
        return 'safetensors'
    return None


def read_safetensors(path):
    from safetensors.torch import load_file  # only sources in this format need the package
    return load_file(path, device='cpu')


def is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def looks_huggingface(key):
    return key.startswith(('model.backbone.', 'model.encoder.', 'class_labels_classifier.', 'detr.model.'))


def without_counters(state_dict):
    # Batch-norm step counters: no weight, and frozen batch norm (ours, DETR's, HF's) drops them on load too.
    return {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}


def from_detr(state_dict, declared, fmt, category_names=None):
    """Source of a state dict already in our names (ours, or DETR's / the published iRPE code's)."""
    state_dict = {k.removeprefix('detr.'): v for k, v in without_counters(state_dict).items()}  # DETR panoptic
    ours = {k: v for k, v in state_dict.items() if k.startswith(OUR_PREFIXES)}
    flags = {k: declared[k] for k in MODEL_FLAGS if declared.get(k) is not None}
    if 'position_embedding' in flags:
        flags['position_embedding'] = DETR_POSITION_EMBEDDINGS.get(flags['position_embedding'],
                                                                   flags['position_embedding'])
    flags.update(flags_from_shapes(ours))
    if category_names is None and fmt == 'published' and flags.get('num_classes') == COCO_NUM_CLASSES:
        category_names = dict(COCO_CATEGORY_NAMES)
    synthetic = declared.get('dataset_file') == 'synthetic'  # the synthetic set's flags say nothing of other data
    data_flags = {k: declared[k] for k in DATA_FLAGS if k in declared and (synthetic or not k.startswith('synthetic_'))
                  } if fmt == 'detr-irpe' else {}
    return Source(ours, flags, category_names, fmt, sorted(state_dict.keys() - ours.keys()), data_flags)


def read_huggingface_folder(folder, weights=None):
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(config_path):
        kept = [f'{os.path.join(folder, name)} ({what})' for name, what in
                ((BEST_CHECKPOINT, 'the weights of its best evaluation'), (CHECKPOINT, 'its last'))
                if os.path.isfile(os.path.join(folder, name))]
        if kept:
            raise UsageError(f"{folder!r} is a training run's folder; pass a checkpoint in it: {' or '.join(kept)}")
        raise UsageError(f'folder {folder!r} has no config.json; expected {FORMATS_HELP}.')
    with open(config_path) as f:
        config = json.load(f)
    if config.get('model_type') != 'detr':
        raise UsageError(f"{config_path} describes a {config.get('model_type')!r} model, not 'detr'; expected "
                         f'{FORMATS_HELP}.')
    if weights is None:
        found = [os.path.join(folder, n) for n in HF_WEIGHTS_FILES if os.path.isfile(os.path.join(folder, n))]
        if not found:
            raise UsageError(f'folder {folder!r} has a DETR config.json but neither of {list(HF_WEIGHTS_FILES)}; '
                             'save the model with save_pretrained, or download its weights file into the folder.')
        weights = found[0]
    state_dict = read_safetensors(weights) if file_kind(weights) == 'safetensors' else load_checkpoint(weights)
    return from_huggingface(state_dict, config)


def from_huggingface(state_dict, config):
    """Source of a transformers DetrForObjectDetection state dict and its config.json (None: the file alone)."""
    mapped, unused, qkv = {}, [], {}
    for key, value in without_counters(state_dict).items():
        name = huggingface_name(key.removeprefix('detr.'))  # DetrForSegmentation wraps the detector as .detr
        match = HF_QKV.match(name) if name else None
        if match:
            qkv.setdefault(f'{match[1]}.in_proj_{match[3]}', {})[match[2]] = (key, value)
        elif name:
            mapped[name] = value
        else:
            unused.append(key)
    for name, parts in qkv.items():
        if parts.keys() == {'q', 'k', 'v'}:
            mapped[name] = torch.cat([parts[p][1] for p in 'qkv'])
        else:
            unused.extend(key for key, _ in parts.values())
    flags = huggingface_flags(config) if config is not None else {}
    flags.update(flags_from_shapes(mapped))
    names = huggingface_category_names(config) if config is not None else None
    return Source(mapped, flags, names, 'huggingface', sorted(unused))


def huggingface_name(key):
    """Our name of a transformers DETR key, or None."""
    for pattern, prefix in HF_PREFIXES:
        match = re.match(pattern, key)
        if match:
            name = match.expand(prefix) + key[match.end():]
            break
    else:
        return None
    if name.startswith('backbone.0.body.'):
        return 'backbone.0.body.' + torchvision_resnet_name(name[len('backbone.0.body.'):])
    for pattern, replacement in HF_LAYER_NAMES:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def torchvision_resnet_name(name):
    """torchvision's name of a transformers ResNet key (timm's and torchvision's are the same, kept as they are)."""
    for hf, ours in HF_RESNET_STEM.items():
        if name.startswith(hf):
            return ours + name[len(hf):]
    match = HF_RESNET_BLOCK.match(name)
    if not match:
        return name
    stage, block, conv, kind = match.groups()
    if conv is None:  # the shortcut: torchvision's downsample = (conv, norm)
        module = f"downsample.{0 if kind == 'convolution' else 1}"
    else:
        module = f"{'conv' if kind == 'convolution' else 'bn'}{int(conv) + 1}"
    return f'layer{int(stage) + 1}.{block}.{module}.' + name[match.end():]


def huggingface_flags(config):
    """Our model-shaping flags from a DETR config.json (transformers 4's layout, as on the hub, or 5's).

    auxiliary_loss is not taken for --aux_loss: it shapes no weight, and transformers' decoder with it on feeds each
    layer's normalised output to the next, which DETR does not (the hub's configs have it off)."""
    def get(key, default):
        value = config.get(key)
        return default if value is None else value
    # DetrConfig's defaults, for keys a config.json leaves out
    heads = (get('encoder_attention_heads', 8), get('decoder_attention_heads', 8))
    ffn = (get('encoder_ffn_dim', 2048), get('decoder_ffn_dim', 2048))
    problems = []
    if heads[0] != heads[1]:
        problems.append(f'encoder_attention_heads {heads[0]} and decoder_attention_heads {heads[1]} differ '
                        '(one --nheads here)')
    if ffn[0] != ffn[1]:
        problems.append(f'encoder_ffn_dim {ffn[0]} and decoder_ffn_dim {ffn[1]} differ (one --dim_feedforward here)')
    if get('activation_function', 'relu') != 'relu':
        problems.append(f"activation_function is {config['activation_function']!r} (DETR's, and this model's, is relu)")
    backbone, dilation = huggingface_backbone(config, problems)
    if problems:
        raise UsageError('this Hugging Face DETR cannot be built here: ' + '; '.join(problems) + '.')
    return {'backbone': backbone, 'dilation': dilation, 'hidden_dim': get('d_model', 256), 'nheads': heads[0],
            'enc_layers': get('encoder_layers', 6), 'dec_layers': get('decoder_layers', 6),
            'dim_feedforward': ffn[0], 'num_queries': get('num_queries', 100),
            'position_embedding': get('position_embedding_type', 'sine')}


def huggingface_backbone(config, problems):
    """(--backbone, --dilation) of a DETR config.json; what cannot be built here is added to `problems`."""
    backbone_config = config.get('backbone_config') or {}
    kind = backbone_config.get('model_type', 'timm_backbone' if config.get('use_timm_backbone', True) else 'resnet')
    # transformers 4 keeps DC5 as config.dilation, 5 as the timm backbone's output_stride 16
    dilation = bool(config.get('dilation')) or backbone_config.get('output_stride') == 16
    if kind == 'timm_backbone':
        timm_name = backbone_config.get('backbone') or config.get('backbone') or 'resnet50'
        name = timm_name.removeprefix('timm/').split('.')[0]  # 'timm/resnet50.a1_in1k': weights tag, same layers
        if name not in RESNETS.values():
            problems.append(f'the timm backbone {timm_name!r} is not one of {sorted(RESNETS.values())}')
        return name, dilation
    if kind == 'resnet':
        depths = tuple(backbone_config.get('depths', (3, 4, 6, 3)))
        layer_type = backbone_config.get('layer_type', 'bottleneck')
        name = RESNETS.get((depths, HF_RESNET_LAYER_TYPES.get(layer_type)))
        if name is None:
            problems.append(f'the ResNet backbone with depths {list(depths)} and {layer_type} layers is not one of '
                            f'{sorted(RESNETS.values())}')
        if backbone_config.get('downsample_in_bottleneck'):
            problems.append("the ResNet backbone strides in its bottlenecks' first 1x1 convolution "
                            "(downsample_in_bottleneck), torchvision's in the 3x3")
        return name, dilation
    problems.append(f'its backbone is a {kind!r}, not a ResNet')
    return None, dilation


def huggingface_category_names(config):
    """{id: name} from config.json's id2label, without placeholders ('N/A' for COCO's unused ids, 'LABEL_3')."""
    names = {int(i): name for i, name in (config.get('id2label') or {}).items()
             if name != 'N/A' and not re.fullmatch(r'LABEL_\d+', name)}
    return names or None


def flags_from_shapes(state_dict):
    """The model-shaping flags that the tensors' names and shapes of a state dict in our names determine.

    Not determined, so never returned: --nheads (heads split hidden_dim without tensors of their own), --dilation
    (DC5 changes strides, not weights), --enc_rpe2d (a table's shape does not name its bucket function),
    sine or no --position_embedding (neither has tensors), --aux_loss (training only)."""
    flags = {}
    blocks = tuple(count_indices(state_dict, f'backbone.0.body.layer{i}.') for i in range(1, 5))
    backbone = RESNETS.get((blocks, 'backbone.0.body.layer1.0.conv3.weight' in state_dict))
    if backbone:
        flags['backbone'] = backbone
    if 'backbone.1.row_embed.weight' in state_dict:
        flags['position_embedding'] = 'learned'
    if 'input_proj.weight' in state_dict:
        flags['hidden_dim'] = state_dict['input_proj.weight'].shape[0]
    if 'query_embed.weight' in state_dict:
        flags['num_queries'], flags['hidden_dim'] = state_dict['query_embed.weight'].shape
    if 'class_embed.bias' in state_dict:
        flags['num_classes'] = state_dict['class_embed.bias'].shape[0] - 1  # + 1: "no object"
    decoder_layers = count_indices(state_dict, 'transformer.decoder.layers.')
    if decoder_layers:
        flags['dec_layers'] = decoder_layers
        flags['enc_layers'] = count_indices(state_dict, 'transformer.encoder.layers.')
        flags['dim_feedforward'] = state_dict['transformer.decoder.layers.0.linear1.weight'].shape[0]
        flags['pre_norm'] = 'transformer.encoder.norm.weight' in state_dict  # the encoder's last norm: pre-norm only
    return flags


def count_indices(state_dict, prefix):
    """How many numbered modules `prefix<N>.` the keys name."""
    return len({k[len(prefix):].split('.')[0] for k in state_dict if k.startswith(prefix)})
