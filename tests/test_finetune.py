"""--finetune and load_detector: weights of any source (here a Hugging Face DetrForObjectDetection folder written by
save_pretrained, random weights) into a new run or an inference model, checked against transformers' own outputs."""
import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers  # a test dependency (the Makefile's pins), never the package's

from detr_irpe import UsageError, build_model, load_detector
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.convert import hub_cache, hub_snapshot, read_source
from detr_irpe.from_checkpoint import load_for_finetuning
from detr_irpe.postprocess import PostProcess
from own_data import NAMES, make_flat_dataset
from test_convert import hf_config, padded_pair, randomise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two names shared with the flat dataset (circle: id 0 here, 3 there; square: 1 and 7), one not.
HF_ID2LABEL = {0: 'circle', 1: 'square', 2: 'N/A', 3: 'kite'}
SMALL = ['--train_scales', '64', '--train_max_size', '96', '--crop_scales', '64', '--crop_size', '48', '64',
         '--val_size', '64', '--val_max_size', '96', '--batch_size', '2', '--num_workers', '0', '--device', 'cpu']


def tool(name, *argv):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', name), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
    """(folder written by save_pretrained, the transformers model in eval mode): timm resnet18, d_model 32."""
    config = hf_config(backbone='resnet18', use_timm_backbone=True)
    config.id2label, config.label2id = HF_ID2LABEL, {v: k for k, v in HF_ID2LABEL.items()}
    model = transformers.DetrForObjectDetection(config).eval()
    randomise(model, seed=3)
    folder = str(tmp_path_factory.mktemp('hf'))
    model.save_pretrained(folder)
    return folder, model


def predictions(model, hf_model):
    images, pixel_values, pixel_mask = padded_pair()
    with torch.no_grad():
        return model(images), hf_model(pixel_values=pixel_values, pixel_mask=pixel_mask)


def test_load_detector_of_a_huggingface_folder_gives_transformers_predictions(hf):
    folder, hf_model = hf
    model, postprocessors = load_detector(folder)
    assert not model.training and 'bbox' in postprocessors
    got, expected = predictions(model, hf_model)
    # the same float32 arithmetic in another order: differences of a few 1e-6 measured; 1e-4 the bound
    torch.testing.assert_close(got['pred_logits'], expected.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got['pred_boxes'], expected.pred_boxes, rtol=0, atol=1e-4)
    # the classes it names (not 'N/A'), and labels of those only, as tools/predict.py gives them
    assert model.category_names == {0: 'circle', 1: 'square', 3: 'kite'}
    na_first = {**got, 'pred_logits': got['pred_logits'] + 10 * (torch.arange(5) == 2)}  # 'N/A' (2) most likely
    sizes = [(64, 80)] * len(got['pred_logits'])
    labels = [torch.cat([r['labels'] for r in post(na_first, sizes)]).tolist() for post in (postprocessors['bbox'],
                                                                                          PostProcess())]
    assert set(labels[0]) <= {0, 1, 3} and set(labels[1]) == {2}


def test_load_detector_of_a_published_detr_file_gives_the_models_predictions(tmp_path, capsys):
    args = get_args_parser().parse_args(['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32',
                                         '--nheads', '2', '--enc_layers', '1', '--dec_layers', '1',
                                         '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu'])
    model = build_model(args)[0].eval()
    randomise(model, seed=5)
    # facebookresearch/detr's layout, no args; a panoptic file's mask head is left out, and said so
    torch.save({'model': {**model.state_dict(), 'mask_head.lay1.weight': torch.zeros(8, 8, 3, 3)}},
               tmp_path / 'detr.pth')
    loaded, _ = load_detector(tmp_path / 'detr.pth', nheads=2)  # heads have no tensor: the one flag to give
    assert (f'note: 1 tensor of {tmp_path / "detr.pth"} is no part of a detector, not loaded '
            '(mask_head.lay1.weight)') in capsys.readouterr().out
    images = padded_pair()[0]
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    assert torch.equal(got['pred_logits'], expected['pred_logits'])
    assert torch.equal(got['pred_boxes'], expected['pred_boxes'])


def test_load_detector_refuses_a_device_this_machine_lacks_as_a_python_error():
    """The parser's check, raised: parse_args would print the caller's usage and exit its script."""
    missing = ['mps', f'cuda:{torch.cuda.device_count()}'] + ([] if torch.cuda.is_available() else ['cuda'])
    for device in missing:
        with pytest.raises(ValueError, match=rf"load_detector\(device='{device}'\): "):
            load_detector('detr.pth', device=device)


def test_a_published_file_without_args_runs_dilated_when_named_dc5_and_says_what_it_assumed(tmp_path, capsys):
    """DETR's model-zoo files keep no args, and DC5 changes strides, not shapes: detr-r50-dc5-*.pth ran as C5."""
    flags = ['--backbone', 'resnet50', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
             '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device',
             'cpu']
    models = {dc5: build_model(get_args_parser().parse_args(flags + ['--dilation'] * dc5))[0].eval()
              for dc5 in (True, False)}
    randomise(models[True], seed=6)
    models[False].load_state_dict(models[True].state_dict())  # one set of weights, two strides
    images = [image[:, :64, :80] for image in padded_pair()[0]]
    with torch.no_grad():
        expected = {dc5: model(images)['pred_boxes'] for dc5, model in models.items()}
    assert not torch.allclose(expected[True], expected[False], atol=1e-3)  # the check below can tell them apart
    for name, dc5 in (('detr-r50-dc5-f0fb7ef5.pth', True), ('detr-r50-e632da11.pth', False)):
        torch.save({'model': models[True].state_dict()}, tmp_path / name)
        loaded, _ = load_detector(str(tmp_path / name), nheads=2)
        with torch.no_grad():
            assert torch.equal(loaded(images)['pred_boxes'], expected[dc5]), name
        out = capsys.readouterr().out
        assert ("--dilation True, from the file's name (DC5); the file does not state it" in out) == dc5, out
        unstated = '--position_embedding' if dc5 else '--dilation, --position_embedding'
        assert f'note: --resume {tmp_path / name} does not state {unstated}; this run uses ' in out, out
    loaded, _ = load_detector(str(tmp_path / 'detr-r50-dc5-f0fb7ef5.pth'), nheads=2, dilation=False)  # told: obeyed
    with torch.no_grad():
        assert torch.equal(loaded(images)['pred_boxes'], expected[False])


def test_a_hub_id_reads_the_snapshot_the_hugging_face_cache_holds_and_downloads_nothing(hf, tmp_path, monkeypatch):
    """Engineers who ran transformers have facebook/detr-resnet-50 in ~/.cache/huggingface/hub: its id is enough."""
    folder, hf_model = hf
    cache = tmp_path / 'hub'
    repo, revision = cache / 'models--someone--detr-tiny', 'a' * 40
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'snapshots' / revision).mkdir(parents=True)
    for name in os.listdir(folder):  # as huggingface_hub lays it out: blobs, and a snapshot of links to them
        shutil.copy(os.path.join(folder, name), repo / 'blobs' / name)
        os.symlink(os.path.join('..', '..', 'blobs', name), repo / 'snapshots' / revision / name)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.chdir(tmp_path)
    from huggingface_hub import try_to_load_from_cache  # transformers' own: the layout above is the hub's
    assert try_to_load_from_cache('someone/detr-tiny', 'config.json', cache_dir=str(cache)) == \
        os.path.join(hub_snapshot('someone/detr-tiny'), 'config.json')
    model, _ = load_detector('someone/detr-tiny')
    got, expected = predictions(model, hf_model)
    torch.testing.assert_close(got['pred_logits'], expected.logits, rtol=0, atol=1e-4)
    assert read_source('someone/detr-tiny').category_names == read_source(folder).category_names
    with pytest.raises(UsageError, match=r"'someone/other' is no file or folder here, nor a model in the Hugging Face "
                                         rf"cache {re.escape(str(cache))} \(nothing is downloaded\); fetch it once"):
        read_source('someone/other')
    with pytest.raises(UsageError, match=r"^'runs/best.pth' does not exist"):  # a mistyped file, no hub advice
        read_source('runs/best.pth')
    from detr_irpe.cli.eval import eval_output_dir
    args = argparse.Namespace(resume='someone/detr-tiny', output_dir=None)  # not into the cache, nor ./someone/
    assert eval_output_dir(args) == os.path.join('outputs', 'someone--detr-tiny', 'eval_detr-tiny')
    (tmp_path / 'someone' / 'detr-tiny').mkdir(parents=True)  # a folder of that name here wins, as in transformers
    assert eval_output_dir(args) == str(tmp_path / 'someone' / 'eval_detr-tiny')
    with pytest.raises(UsageError, match="folder 'someone/detr-tiny' has no config.json"):
        read_source('someone/detr-tiny')


@pytest.mark.parametrize('env', [{}, {'HF_HOME': '/h'}, {'XDG_CACHE_HOME': '/x'},
                                 {'HF_HUB_CACHE': '/c', 'HF_HOME': '/h'},
                                 {'HUGGINGFACE_HUB_CACHE': '/legacy', 'XDG_CACHE_HOME': '/x'}])
def test_the_hub_cache_is_the_folder_huggingface_hub_uses(env, monkeypatch):
    import importlib
    import huggingface_hub.constants as constants
    for name in ('HF_HOME', 'XDG_CACHE_HOME', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        assert hub_cache() == importlib.reload(constants).HF_HUB_CACHE
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_load_detector_refuses_a_flag_it_does_not_know(hf):
    with pytest.raises(TypeError, match='no_such_flag'):
        load_detector(hf[0], no_such_flag=1)


def test_finetune_of_a_huggingface_folder_into_irpe_keeps_the_box_path_and_carries_classes_by_name(hf, tmp_path):
    folder, hf_model = hf
    data = make_flat_dataset(str(tmp_path / 'data'))
    out = tmp_path / 'run'
    # a learning rate far below float32's resolution of any weight: no weight moves in the one epoch
    result = tool('train.py', *data, *SMALL, '--finetune', folder, '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k',
                  '--rpe_init', 'zero', '--lr', '1e-30', '--lr_backbone', '0', '--epochs', '1', '--output_dir', str(out))
    assert result.returncode == 0, result.stderr
    report = next(line for line in result.stdout.splitlines() if line.startswith('--finetune'))
    source = read_source(folder)
    assert f'{len(source.state_dict) - 2} tensors loaded, 2 re-initialised' in report  # all but the class head
    assert '2 new' in report and 'rpe_k.lookup_table_weight' in report and '0 unused' in report
    assert 'circle, square' in report

    checkpoint = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 0 and checkpoint['category_names'] == NAMES
    weight, bias = checkpoint['model']['class_embed.weight'], checkpoint['model']['class_embed.bias']
    assert bias.shape == (max(NAMES) + 1 + 1,)  # largest id + 1 classes, + no-object
    for ours, theirs in ((3, 0), (7, 1), (-1, -1)):  # circle, square, no-object: transformers' rows
        assert torch.equal(weight[ours], hf_model.class_labels_classifier.weight[theirs].detach())
        assert torch.equal(bias[ours], hf_model.class_labels_classifier.bias[theirs].detach())

    model, _ = load_detector(str(out / 'checkpoint.pth'))
    assert model.transformer.encoder.layers[0].self_attn.rpe_k is not None  # iRPE on, its tables zero
    got, expected = predictions(model, hf_model)
    torch.testing.assert_close(got['pred_boxes'], expected.pred_boxes, rtol=0, atol=1e-4)


def test_a_stopped_finetuning_run_resumes_with_the_command_line_that_started_it(hf, tmp_path):
    # its model flags come from --finetune's source, not the command line: resuming compares the run's with them
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=4, num_val=2)
    argv = [*data, *SMALL, '--finetune', hf[0], '--output_dir', str(tmp_path / 'run'), '--resume', 'auto']
    first = tool('train.py', *argv, '--epochs', '1')
    assert first.returncode == 0, first.stderr[-3000:]
    again = tool('train.py', *argv, '--epochs', '2')
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'resumed from' in again.stdout and torch.load(tmp_path / 'run' / 'checkpoint.pth')['epoch'] == 1


def finetune_model(*argv):
    args = get_args_parser().parse_args(['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32',
                                         '--nheads', '4', '--enc_layers', '2', '--dec_layers', '2',
                                         '--dim_feedforward', '48', '--num_classes', '4', '--device', 'cpu', *argv])
    return build_model(args)[0]


def test_finetune_with_other_num_queries_reinitialises_only_the_query_embeddings(hf):
    source = read_source(hf[0])
    model = finetune_model('--num_queries', '7')
    fresh = model.query_embed.weight.detach().clone()
    report = load_for_finetuning(model, source, source.category_names, hf[0])  # the same classes
    assert 'query_embed.weight (num_queries differs' in report and '1 re-initialised' in report
    assert torch.equal(model.query_embed.weight, fresh)
    assert torch.equal(model.class_embed.weight, source.state_dict['class_embed.weight'])  # same classes: loaded


def test_a_class_head_of_the_same_size_naming_other_classes_carries_rows_by_name_not_by_id(hf):
    # copied by id, as any tensor of the same shape, the source's circle row would predict square here
    source = read_source(hf[0])
    model = finetune_model()
    fresh = model.class_embed.weight.detach().clone()
    names = {0: 'square', 1: 'circle', 3: 'Kite'}  # the source's 0 and 1 swapped; 2 named by neither; 3 alike
    report = load_for_finetuning(model, source, names, hf[0])
    assert model.class_embed.weight.shape == source.state_dict['class_embed.weight'].shape
    assert 'other classes at ids 0, 1; carried over: the no-object row and the rows of 3 classes' in report
    for ours, theirs in ((0, 1), (1, 0), (3, 3), (-1, -1)):
        assert torch.equal(model.class_embed.weight[ours], source.state_dict['class_embed.weight'][theirs])
        assert torch.equal(model.class_embed.bias[ours], source.state_dict['class_embed.bias'][theirs])
    assert torch.equal(model.class_embed.weight[2], fresh[2])


def test_finetune_with_another_hidden_dim_reinitialises_the_class_head_whole(hf):
    # its rows are of another width: carrying them over by class name failed with a RuntimeError
    source = read_source(hf[0])
    model = finetune_model('--hidden_dim', '64', '--num_queries', '5')
    fresh = model.class_embed.weight.detach().clone()
    report = load_for_finetuning(model, source, source.category_names, hf[0])
    assert re.search(r'class_embed.weight[^]]*shape differs: \(\d+, 32\) in the source, \(5, 64\) here', report)
    assert 'carried over' not in report and torch.equal(model.class_embed.weight, fresh)


def test_finetune_from_a_weights_file_alone_says_which_flags_it_took_as_defaults(hf, tmp_path, capsys):
    from detr_irpe.cli.train import finetune_source
    weights = next(f for f in ('model.safetensors', 'pytorch_model.bin') if os.path.isfile(os.path.join(hf[0], f)))
    shutil.copy(os.path.join(hf[0], weights), tmp_path / weights)  # without its config.json
    for source, said in ((str(tmp_path / weights), True), (hf[0], False)):
        args = get_args_parser().parse_args(['--finetune', source, '--device', 'cpu'])
        finetune_source(args, {'finetune', 'device'})
        out = capsys.readouterr().out
        assert ('does not state --nheads, --dilation, --position_embedding; this run uses --nheads 8, --dilation '
                "False, --position_embedding sine: pass the source's if they differ" in out) == said, out


def test_finetune_source_matching_under_half_of_the_model_is_refused_naming_the_formats(hf):
    model = finetune_model('--backbone', 'resnet50', '--num_queries', '5')  # the source's is a resnet18
    with pytest.raises(UsageError, match='only .* of the model.s .* tensors match.*DetrForObjectDetection'):
        load_for_finetuning(model, read_source(hf[0]), HF_ID2LABEL, hf[0])


def test_predict_runs_a_huggingface_folder_with_its_id2label_names(hf, tmp_path, monkeypatch):
    from detr_irpe.cli import predict as predict_tool
    folder, _ = hf
    data = make_flat_dataset(str(tmp_path / 'data'), num_train=1, num_val=1)
    drawn, real_draw = [], predict_tool.draw_detections

    def draw(image, detections, threshold, names, min_size):
        drawn.append(names)
        return real_draw(image, detections, threshold, names, min_size)
    monkeypatch.setattr(predict_tool, 'draw_detections', draw)
    out = predict_tool.run(['--resume', folder, os.path.join(data[7], 'val_000001.jpg'), '--val_size', '64',
                            '--val_max_size', '96', '--output_dir', str(tmp_path / 'predict'), '--device', 'cpu'])
    assert drawn == [{0: 'circle', 1: 'square', 3: 'kite'}]  # 'N/A' is no name
    assert os.path.isfile(os.path.join(out, 'detections.json'))
