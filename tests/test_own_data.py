"""Your own data: a flat-layout COCO-format dataset with non-contiguous named categories trains, evaluates and
predicts with the four data flags; and each silent trap a new user met is now a usage error or a stated default."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError
from detr_irpe.cli import eval as eval_tool
from detr_irpe.cli import predict as predict_tool
from detr_irpe.cli import train as train_tool
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.cli.presets import parse_args_with_config
from own_data import NAMES, make_flat_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')
# the smoke preset's tiny model, its sizes given on the command line (no preset: its data is synthetic)
SMALL = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
         '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '64', '--num_queries', '5',
         '--train_scales', '64', '--train_max_size', '96', '--crop_scales', '64', '--crop_size', '48', '64',
         '--val_size', '64', '--val_max_size', '96', '--batch_size', '2', '--num_workers', '0', '--device', 'cpu',
         '--epochs', '1', '--lr_drop', '1']


def tool(name, *argv, cwd=ROOT):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    env.pop('DETR_IRPE_DEBUG', None)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', name), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(data flags, run folder) of one epoch of tools/train.py on the flat dataset, given to it as paths relative
    to the folder it ran in (the flags returned are absolute)."""
    folder = tmp_path_factory.mktemp('own')
    data = make_flat_dataset(str(folder / 'data'))
    relative = [os.path.relpath(value, folder) if value.startswith(str(folder)) else value for value in data]
    result = tool('train.py', *relative, *SMALL, '--output_dir', str(folder / 'run'), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, folder / 'run', result.stdout


def test_flat_dataset_trains_with_the_four_flags_and_says_what_it_uses(trained):
    data, run, stdout = trained
    line = next(line for line in stdout.splitlines() if line.startswith('data:'))
    assert '8 images' in line and '4 images' in line and '3 circle, 7 square, 12 triangle' in line
    assert line.endswith(f'num_classes {max(NAMES) + 1}')
    checkpoint = torch.load(run / 'checkpoint.pth', weights_only=True)
    assert checkpoint['model']['class_embed.bias'].shape == (max(NAMES) + 1 + 1,)  # largest id + 1, + no-object
    assert checkpoint['category_names'] == NAMES


def test_eval_takes_the_checkpoints_data_and_sizes_names_its_classes_and_writes_beside_it(trained, capsys):
    data, run, _ = trained
    training_eval = (run / 'eval.json').read_bytes()
    eval_tool.run(['--resume', str(run / 'checkpoint.pth'), '--num_workers', '0'])  # from another folder
    out = capsys.readouterr().out
    taken = next(line for line in out.splitlines() if line.startswith('from the checkpoint:'))
    # training was given data/val.json: the checkpoint keeps where that was, not the relative path
    assert '--val_size 64' in taken and '--val_max_size 96' in taken and f'--val_json {data[5]}' in taken
    table = out[out.index('category  AP'):].splitlines()[1:4]
    assert [row.split()[0] for row in table] == list(NAMES.values())
    assert (run / 'eval.json').read_bytes() == training_eval  # training's result stays
    assert json.loads((run / 'eval_checkpoint' / 'eval.json').read_text())['checkpoint'] == \
        str(run / 'checkpoint.pth')


def test_eval_refuses_a_model_flag_other_than_the_checkpoints_where_no_shape_would_differ(trained):
    # without the check the weights ran as another model: AP 0.010 instead of 0.321 in the demo, exit status 0
    _, run, _ = trained
    for flags, said in ((['--position_embedding', 'none'], "--position_embedding 'sine'"),
                        (['--dilation'], '--dilation False')):
        with pytest.raises(UsageError, match=f"was trained with {said}.*Leave these flags out"):
            eval_tool.run(['--resume', str(run / 'checkpoint.pth'), '--num_workers', '0', *flags])
    eval_tool.run(['--resume', str(run / 'checkpoint.pth'), '--num_workers', '0', '--position_embedding', 'sine',
                   '--attention_impl', 'sdpa'])  # the checkpoint's value, and an implementation choice


def test_resuming_training_with_other_model_flags_is_refused_before_anything_is_built(trained, tmp_path):
    data, run, _ = trained
    argv = [*data, *SMALL, '--epochs', '2', '--resume', str(run / 'checkpoint.pth'), '--output_dir', str(tmp_path)]
    with pytest.raises(UsageError, match=r"the run that wrote it had --pre_norm False \(this run: True\)"):
        train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--pre_norm']))


def test_val_categories_under_other_ids_than_the_models_are_refused(trained, tmp_path):
    data, run, _ = trained
    val = json.loads(open(data[data.index('--val_json') + 1]).read())
    moved = {7: 5}  # 'square' under another id, as a hand-edited val file might have it
    val['categories'] = [dict(c, id=moved.get(c['id'], c['id'])) for c in val['categories']]
    val['annotations'] = [dict(a, category_id=moved.get(a['category_id'], a['category_id'])) for a in val['annotations']]
    (tmp_path / 'val.json').write_text(json.dumps(val))
    with pytest.raises(UsageError, match=r"'square' is id 5 here and id 7 in --resume"):
        eval_tool.run(['--resume', str(run / 'checkpoint.pth'), '--num_workers', '0',
                       '--val_json', str(tmp_path / 'val.json'), '--val_images', data[data.index('--val_images') + 1]])
    argv = [*data, *SMALL, '--output_dir', str(tmp_path / 'run')]
    argv[argv.index('--val_json') + 1] = str(tmp_path / 'val.json')
    with pytest.raises(UsageError, match=r"'square' is id 5 here and id 7 in the training set"):
        train_tool.run(parse_args_with_config(get_args_parser(), argv))


def test_resuming_on_a_training_set_whose_categories_moved_is_refused(trained, tmp_path):
    # the run's 'square' row would go on training as whatever now has id 7
    data, run, _ = trained
    for split in ('train', 'val'):
        d = json.loads(open(data[data.index(f'--{split}_json') + 1]).read())
        moved = {7: 5, 3: 7}
        d['categories'] = [dict(c, id=moved.get(c['id'], c['id'])) for c in d['categories']]
        d['annotations'] = [dict(a, category_id=moved.get(a['category_id'], a['category_id']))
                            for a in d['annotations']]
        (tmp_path / f'{split}.json').write_text(json.dumps(d))
    argv = [*data, *SMALL, '--epochs', '2', '--resume', str(run / 'checkpoint.pth'),
            '--output_dir', str(tmp_path / 'r')]
    for split in ('train', 'val'):
        argv[argv.index(f'--{split}_json') + 1] = str(tmp_path / f'{split}.json')
    expected = (r"categories of .*train.json do not fit --resume .*'circle' is id 7 here and id 3 in --resume .*"
                r"'square' is id 5 here and id 7 .* the id it has in --resume")
    with pytest.raises(UsageError, match=expected):
        train_tool.run(parse_args_with_config(get_args_parser(), argv))
    assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_a_split_without_annotations_is_refused(trained, tmp_path, split):
    # an empty val set trained a whole run evaluating to AP -1, "the best so far", exit status 0
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=4, num_val=3)
    ann_file = data[data.index(f'--{split}_json') + 1]
    content = json.loads(open(ann_file).read())
    content['annotations'] = []
    open(ann_file, 'w').write(json.dumps(content))
    expected = {'train': 'training set .* has 4 images and no annotations: nothing to learn',
                'val': "val set .* has 3 images and no annotations: nothing to score .* or run tools/predict.py"}[split]
    with pytest.raises(UsageError, match=expected):
        train_tool.run(parse_args_with_config(get_args_parser(), [*data, *SMALL, '--output_dir', str(tmp_path / 'r')]))
    assert not (tmp_path / 'r').exists()
    if split == 'val':
        with pytest.raises(UsageError, match=expected):
            eval_tool.run(['--resume', str(trained[1] / 'checkpoint.pth'), '--num_workers', '0',
                           *data[data.index('--val_json'):]])


def test_images_of_more_objects_than_queries_are_warned_once_counting_as_detr_does(tmp_path):
    # DETR's matcher leaves the objects beyond --num_queries out of the loss: a crowded dataset trained silently
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=6, num_val=4, seed=3)  # 2 objects in some of each
    files = {split: data[data.index(f'--{split}_json') + 1] for split in ('train', 'val')}
    content = json.loads(open(files['train']).read())
    per_image = Counter(a['image_id'] for a in content['annotations'])
    alone = next(i for i, n in per_image.items() if n == 1)
    content['annotations'].append(dict(content['annotations'][0], id=999, image_id=alone, iscrowd=1))  # not a target
    open(files['train'], 'w').write(json.dumps(content))
    over = {}
    for split, path in files.items():
        per_image = Counter(a['image_id'] for a in json.loads(open(path).read())['annotations'] if not a['iscrowd'])
        over[split] = sum(n > 1 for n in per_image.values())
    assert over['train'] and over['val'] and max(per_image.values()) == 2
    argv = [*data, *SMALL, '--epochs', '0', '--output_dir', str(tmp_path / 'run')]
    for queries, expected in (('1', [f"{over['train']} of the 6 training images and {over['val']} of the 4 val images "
                                     'hold more objects than --num_queries 1 (up to 2): DETR predicts at most 1 box '
                                     'an image, so the objects beyond go unmatched in training and undetected in '
                                     'evaluation; pass --num_queries 2 or more']), ('2', [])):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--num_queries', queries]))
        assert [str(w.message) for w in record if 'num_queries' in str(w.message)] == expected
        shutil.rmtree(tmp_path / 'run')


def test_val_categories_without_training_annotations_are_warned_with_their_counts(tmp_path):
    # a rare class whose few images all went to val: its AP of 0 lowered the mean, silently
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=6, num_val=4, seed=4)  # each split has every class
    files = {split: data[data.index(f'--{split}_json') + 1] for split in ('train', 'val')}
    argv = [*data, *SMALL, '--epochs', '0', '--output_dir', str(tmp_path / 'run')]
    train = json.loads(open(files['train']).read())
    val = json.loads(open(files['val']).read())
    gone = min({a['category_id'] for a in val['annotations']} & {a['category_id'] for a in train['annotations']})
    in_val = sum(a['category_id'] == gone for a in val['annotations'])
    classes = len({a['category_id'] for a in val['annotations']})
    expected = (f"1 of the {classes} categories annotated in {files['val']} have no annotation in the training set: "
                f"{gone} {NAMES[gone]!r} ({in_val} in val); the model cannot learn them")
    for dropped in (False, True):
        if dropped:
            train['annotations'] = [a for a in train['annotations'] if a['category_id'] != gone]
            open(files['train'], 'w').write(json.dumps(train))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            train_tool.run(parse_args_with_config(get_args_parser(), argv))
        said = [str(w.message) for w in record if 'no annotation in the training set' in str(w.message)]
        assert len(said) == dropped and all(m.startswith(expected) for m in said), said
        shutil.rmtree(tmp_path / 'run')


def test_a_roboflow_export_given_as_coco_path_gets_the_four_flags_that_read_it(tmp_path):
    # {train,valid}/_annotations.coco.json beside the images: --coco_path said only what COCO's layout is
    data = make_flat_dataset(str(tmp_path / 'flat'))
    export = tmp_path / 'export'
    for split, folder in (('train', 'train'), ('val', 'valid')):
        (export / folder).mkdir(parents=True)
        entries = json.loads(open(data[data.index(f'--{split}_json') + 1]).read())
        for image in entries['images']:
            shutil.copy(os.path.join(data[data.index(f'--{split}_images') + 1], image['file_name']), export / folder)
        (export / folder / '_annotations.coco.json').write_text(json.dumps(entries))
    argv = [*SMALL, '--epochs', '0', '--output_dir', str(tmp_path / 'run')]
    with pytest.raises(UsageError) as error:
        train_tool.run(parse_args_with_config(get_args_parser(), ['--coco_path', str(export), *argv]))
    said = str(error.value)
    assert said.startswith(f'annotation file {export}/annotations/instances_train2017.json not found;'), said
    flags = said.split('pass instead of --coco_path: ')[1].split()
    assert flags == ['--train_json', f'{export}/train/_annotations.coco.json', '--train_images', f'{export}/train',
                     '--val_json', f'{export}/valid/_annotations.coco.json', '--val_images', f'{export}/valid']
    train_tool.run(parse_args_with_config(get_args_parser(), [*flags, *argv]))  # they read it
    shutil.rmtree(export / 'valid')  # no split pair: the annotation files found are named
    with pytest.raises(UsageError, match=re.escape(f'. JSON files in {export}: {export}/train/_annotations.coco.json; '
                                                   'for annotation files in another layout pass --train_json FILE')):
        train_tool.run(parse_args_with_config(get_args_parser(), ['--coco_path', str(export), *argv]))


def test_val_images_that_training_lists_too_are_warned(tmp_path):
    # a split made by hand, or one file given to both flags: the val AP counted images the model had trained on
    data = make_flat_dataset(str(tmp_path / 'data'))
    files = {split: data[data.index(f'--{split}_json') + 1] for split in ('train', 'val')}
    train, val = (json.loads(open(files[split]).read()) for split in ('train', 'val'))
    folder = data[data.index('--val_images') + 1]
    argv = [*data, *SMALL, '--epochs', '0', '--output_dir', str(tmp_path / 'run')]
    for shared in (0, 2):
        if shared:
            names = {entry['file_name'] for entry in val['images']}
            taken = [entry for entry in train['images'] if entry['file_name'] not in names][:shared]
            top = max(entry['id'] for entry in val['images'])
            val['images'] += [{**entry, 'id': top + 1 + i} for i, entry in enumerate(taken)]
            open(files['val'], 'w').write(json.dumps(val))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            train_tool.run(parse_args_with_config(get_args_parser(), argv))
        said = [str(w.message) for w in record if 'training images too' in str(w.message)]
        example = os.path.join(os.path.abspath(folder), min(entry['file_name'] for entry in taken)) if shared else ''
        assert said == ([f'{shared} of the {len(val["images"])} val images are training images too (the same file, '
                         f'e.g. {example}): the val AP counts images the model trains on; give each image to one '
                         'split'] if shared else []), said
        shutil.rmtree(tmp_path / 'run')


def test_a_val_size_outside_the_training_scales_is_warned(tmp_path):
    # --train_scales given for small images, --val_size left at DETR's 800: evaluated at 12x the training scale
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=2, num_val=1)
    for sizes, warned in ((['--train_scales', '56', '64'], False),
                          (['--val_size', '800', '--val_max_size', '1333'], True),
                          (['--train_scales', '72', '80', '--train_max_size', '120'], True)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            train_tool.run(parse_args_with_config(get_args_parser(), [*data, *SMALL, '--epochs', '0', *sizes]))
        said = [str(w.message) for w in record if 'training scales' in str(w.message)]
        assert len(said) == warned, (sizes, said)
    assert said[0].startswith('--val_size 64 lies outside the training scales (--train_scales 72-80)')


def test_eval_with_the_training_preset_writes_beside_the_checkpoint(trained, tmp_path):
    # a preset's output_dir is its training run's folder (configs/smoke.yaml's, as the README's eval example)
    _, run, _ = trained
    (tmp_path / 'preset.yaml').write_text(f'output_dir: {run}\n')
    eval_tool.run(['--config', str(tmp_path / 'preset.yaml'), '--resume', str(run / 'checkpoint.pth'),
                   '--num_workers', '0'])
    assert (run / 'eval_checkpoint' / 'eval.json').is_file()


def test_eval_into_a_training_runs_folder_is_a_usage_error(trained):
    _, run, _ = trained
    result = tool('eval.py', '--resume', str(run / 'checkpoint.pth'), '--output_dir', str(run))
    assert result.returncode == 2 and "training run's folder" in result.stderr


def test_predict_draws_the_checkpoints_names_and_writes_only_the_datasets_ids(trained, tmp_path, monkeypatch):
    data, run, _ = trained
    drawn, real_draw = [], predict_tool.draw_detections

    def draw(image, detections, threshold, names, min_size):
        drawn.append(names)
        return real_draw(image, detections, threshold, names, min_size)
    monkeypatch.setattr(predict_tool, 'draw_detections', draw)
    image = os.path.join(data[7], 'val_000001.jpg')
    # --dataset_file given, with no files: no annotations are read, the names come with the model
    out = predict_tool.run(['--resume', str(run / 'checkpoint.pth'), image, '--dataset_file', 'coco',
                            '--output_dir', str(tmp_path), '--threshold', '0'])
    assert drawn == [NAMES]
    detections = json.loads(open(os.path.join(out, 'detections.json')).read())
    assert len(detections) == 5 and {d['category_id'] for d in detections} <= set(NAMES)


def test_predict_refuses_val_categories_the_model_has_no_class_for(trained, tmp_path):
    # a checkpoint keeping no names took the val file's: ids past its classes were dropped, and with none left
    # every detection came out as category 0 with score 0, exit status 0
    data, run, _ = trained
    checkpoint = torch.load(run / 'checkpoint.pth', weights_only=False)
    del checkpoint['category_names']
    torch.save(checkpoint, tmp_path / 'nameless.pth')
    val = json.loads(open(data[data.index('--val_json') + 1]).read())
    moved = {3: 20, 7: 21, 12: 22}
    val['categories'] = [dict(c, id=moved[c['id']]) for c in val['categories']]
    val['annotations'] = [dict(a, category_id=moved[a['category_id']]) for a in val['annotations']]
    (tmp_path / 'val.json').write_text(json.dumps(val))
    image = os.path.join(data[7], 'val_000001.jpg')
    with pytest.raises(UsageError, match=r"id 20 \('circle'\) has no class in a model of --num_classes 13.* Number the "
                                         r"categories as the data the model was trained on \(ids below 13\)\. Or "
                                         r"predict without val annotations"):
        predict_tool.run(['--resume', str(tmp_path / 'nameless.pth'), image, '--val_json', str(tmp_path / 'val.json'),
                          '--val_images', data[7], '--output_dir', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


def test_val_categories_named_otherwise_at_the_models_ids_are_warned(trained, tmp_path):
    data, run, _ = trained
    val = json.loads(open(data[data.index('--val_json') + 1]).read())
    val['categories'] = [dict(c, name={7: 'Square', 12: 'star'}.get(c['id'], c['name'])) for c in val['categories']]
    (tmp_path / 'val.json').write_text(json.dumps(val))
    with pytest.warns(UserWarning) as caught:
        eval_tool.run(['--resume', str(run / 'checkpoint.pth'), '--num_workers', '0', '--output_dir',
                       str(tmp_path / 'eval'), '--val_json', str(tmp_path / 'val.json'),
                       '--val_images', data[data.index('--val_images') + 1]])
    renamed = [str(w.message) for w in caught if 'otherwise than' in str(w.message)]
    # 'Square' is 'square' (as fine-tuning compares names); 'star' is scored as the model's triangles
    assert len(renamed) == 1 and re.search(r"names 1 category otherwise than --resume .*: id 12 is 'star' here and "
                                           r"'triangle' there; the model's detections", renamed[0]), renamed


def test_predict_warns_of_images_a_viewer_shows_turned(trained, tmp_path):
    from PIL import Image
    data, run, _ = trained
    with Image.open(os.path.join(data[7], 'val_000001.jpg')) as f:
        exif = f.getexif()
        exif[0x0112] = 6  # shown turned 90 degrees clockwise
        f.save(tmp_path / 'phone.jpg', exif=exif)
        f.save(tmp_path / 'plain.jpg')
    with pytest.warns(UserWarning, match=r'1 of the images \(.*phone.jpg\) carry an EXIF orientation .* predicted as '
                                         r'stored') as caught:
        predict_tool.run(['--resume', str(run / 'checkpoint.pth'), str(tmp_path / 'phone.jpg'),
                          str(tmp_path / 'plain.jpg'), '--dataset_file', 'coco', '--output_dir', str(tmp_path / 'o')])
    assert not any('plain.jpg' in str(w.message) for w in caught)


def test_eval_of_a_run_scores_its_checkpoint_under_its_epoch_and_needs_one(trained, tmp_path):
    data, run, _ = trained
    result = tool('train.py', *data, *SMALL, '--output_dir', str(tmp_path / 'out'), '--eval')
    assert result.returncode == 2 and '--eval evaluates a checkpoint: pass --resume' in result.stderr
    shutil.copytree(run, tmp_path / 'copy')
    result = tool('train.py', *data, *SMALL, '--output_dir', str(tmp_path / 'copy'), '--resume', 'auto', '--eval')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'of epoch 0' in result.stdout and json.loads((tmp_path / 'copy' / 'eval.json').read_text())['epoch'] == 0


def test_resume_of_a_finished_run_is_a_usage_error_unless_evaluating(trained, tmp_path):
    data, run, _ = trained
    # into its own folder, and into another whose log.txt lacks the run's lines (it is the run's own log that counts)
    for output_dir in (run, tmp_path / 'elsewhere'):
        result = tool('train.py', *data, *SMALL, '--output_dir', str(output_dir), '--resume',
                      str(run / 'checkpoint.pth'))
        assert result.returncode == 2 and 'has trained 1 epochs and --epochs 1 asks for no more' in result.stderr
        assert 'parameters:' not in result.stdout and 'images' not in result.stdout  # before data and model are built


def test_a_category_id_beyond_91_sets_num_classes(tmp_path):
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=2, num_val=1)
    for path in (data[1], data[5]):
        with open(path) as f:
            coco = json.load(f)
        coco['categories'].append({'id': 120, 'name': 'hexagon'})
        for ann in coco['annotations'][:1]:
            ann['category_id'] = 120
        with open(path, 'w') as f:
            json.dump(coco, f)
    args = get_args_parser().parse_args([*data, *SMALL])
    dataset = datasets.build_dataset('train', args)
    assert datasets.num_classes_for(dataset) == 121


def test_data_flag_the_presets_dataset_does_not_read_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(train_tool.get_parser(), ['--config', SMOKE, '--coco_path', '/data/coco'])
    assert e.value.code == 2
    assert '--coco_path given, but --dataset_file is synthetic' in capsys.readouterr().err


def test_data_on_the_command_line_replaces_the_presets(tmp_path):
    preset = tmp_path / 'p.yaml'
    preset.write_text('dataset_file: coco\ncoco_path: /data/coco\n')
    args = parse_args_with_config(train_tool.get_parser(), ['--config', str(preset), '--train_json', 'a.json',
                                                            '--train_images', 'i', '--val_json', 'b.json',
                                                            '--val_images', 'i'])
    assert args.coco_path is None and args.train_json == 'a.json'


def test_missing_image_file_is_skipped_when_the_annotations_are_read(tmp_path):
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=3, num_val=1)
    os.remove(os.path.join(data[3], 'train_000002.jpg'))
    args = get_args_parser().parse_args([*data, *SMALL])
    with pytest.warns(UserWarning, match="'train_000002.jpg' is not in the image folder"):
        dataset = datasets.build_dataset('train', args)
    assert len(dataset) == 2 and dataset.skipped_entries >= 1


@pytest.mark.parametrize('argv', [['--frozen_weights', 'no_such.pth']])
def test_flags_that_did_nothing_are_gone(argv, capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(argv)


def test_eval_resume_help_speaks_of_what_it_loads():
    action = next(a for a in eval_tool.get_parser()._actions if a.dest == 'resume')
    assert action.help.startswith('the detector to load') and 'resum' not in action.help


def test_no_aux_loss_help_says_aux_loss_is_on_by_default():
    action = next(a for a in get_args_parser()._actions if a.dest == 'aux_loss')
    assert 'on by default' in action.help and action.default is True


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=4, num_val=1)
    # Adam's first step moves every weight by about the learning rate: at 1e30 the next loss is not finite
    result = tool('train.py', *data, *SMALL, '--lr', '1e30', '--clip_max_norm', '0', '--output_dir',
                  str(tmp_path / 'run'))
    assert result.returncode == 2 and 'loss is not finite' in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_onnx_export_keeps_the_category_names(trained, tmp_path):
    import onnx
    from detr_irpe.export import OnnxDetector
    _, run, _ = trained
    result = tool('export.py', '--resume', str(run / 'checkpoint.pth'), '--output', str(tmp_path / 'detr.onnx'))
    assert result.returncode == 0, result.stderr[-2000:]
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / 'detr.onnx')).metadata_props}
    assert json.loads(stored['category_names']) == {str(k): v for k, v in NAMES.items()}
    detector = OnnxDetector(str(tmp_path / 'detr.onnx'))
    assert detector.category_names == NAMES and detector.num_classes == max(NAMES) + 1
