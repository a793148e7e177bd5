"""Bad input to the tools ends in a message that names it, never in a traceback."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from detr_irpe import UsageError, build_model
from detr_irpe.cli.flags import check_flag_combinations, get_args_parser
from detr_irpe.cli.presets import explicit_flags, parse_args_with_config
from detr_irpe.cli.runner import run_tool
from detr_irpe.irpe import rpe_config_from_string
from detr_irpe.position_encoding import build_position_encoding
from detr_irpe.transformer import build_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name, *argv):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    env.pop('DETR_IRPE_DEBUG', None)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', name), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_values_are_defaults_and_flags_override_them(tmp_path):
    config = write(tmp_path / 'c.yaml', 'enc_rpe2d: rpe-2.0-product-ctx-1-k\nbatch_size: 8\nlr: 2.0e-4\n')
    args = parse_args_with_config(get_args_parser(), ['--config', config, '--batch_size', '3'])
    assert (args.enc_rpe2d, args.batch_size, args.lr) == ('rpe-2.0-product-ctx-1-k', 3, 2e-4)
    given = explicit_flags(get_args_parser(), ['--config', config, '--batch_size', '3'])
    assert {'enc_rpe2d', 'batch_size', 'lr'} <= given and 'backbone' not in given


@pytest.mark.parametrize('text,message', [
    ('batchsize: 8\n', "'batchsize' is no flag of this tool; did you mean batch_size?"),
    ('backbone: resnet5\n', "backbone: 'resnet5' is not one of resnet18, resnet34, resnet50, resnet101; did you mean "
                             'resnet50?'),
    ('crop_size: 5\n', 'crop_size: expected a list of 2 values, got 5'),
    ('crop_size: [600, 384]\n', 'argument --crop_size: MIN 600 is larger than MAX 384'),
    ('amp: 3\n', 'amp: expected true or false, got 3'),
    ('batch_size: 2.5\n', "batch_size: expected an integer >= 1, got '2.5'"),
    ('batch_size: true\n', "batch_size: expected an integer >= 1, got 'true'"),
    ('num_queries: 0\n', "num_queries: expected an integer in [1, 10000000], got '0'"),
    ('hidden_dim: 250\n', '--hidden_dim 250 is not divisible by --nheads 8'),
    ('hidden_dim: 250\nnheads: 2\n', '--position_embedding sine needs --hidden_dim divisible by 4'),
    ('enc_rpe2d: rpe-2.0-product\n', "'rpe-2.0-product'"),
    ('backbone_in_workers: true\nlr_backbone: 0\nnum_workers: 0\n', '--backbone_in_workers needs --num_workers 1'),
    ('- a list\n', 'mapping'),
    ('lr: [unclosed\n', 'not valid YAML'),
])
def test_bad_config_file_is_a_clear_error(tmp_path, text, message, capsys):
    config = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(get_args_parser(), ['--config', config])
    assert message in str(e.value) + capsys.readouterr().err


def encoder_and_decoder_run(args):
    """Whether the position encoding and a transformer of these flags run on a 2x3 feature map."""
    try:
        encoding = build_position_encoding(args)
        transformer = build_transformer(args, rpe_config_from_string(args.enc_rpe2d))
        src, mask = torch.randn(1, args.hidden_dim, 2, 3), torch.zeros(1, 2, 3, dtype=torch.bool)
        transformer(src, mask, torch.randn(2, args.hidden_dim), None if encoding is None else encoding(src, mask))
        return True
    except Exception:  # noqa: BLE001 -- any failure: these flags do not make a working model
        return False


def without_checks_across_flags(parser, argv):
    """The namespace argv gives when each flag passes its own check (the checks across flags skipped)."""
    return argparse.ArgumentParser.parse_known_args(parser, argv)[0]


@pytest.mark.parametrize('position_embedding', ['sine', 'learned', 'none'])
def test_hidden_dim_and_nheads_are_accepted_exactly_when_the_model_runs(position_embedding, capsys):
    parser = get_args_parser()
    for nheads in (1, 2, 3, 4):
        for hidden_dim in range(1, 17):
            argv = ['--hidden_dim', str(hidden_dim), '--nheads', str(nheads), '--position_embedding',
                    position_embedding, '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '8',
                    '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k', '--backbone_weights', 'none', '--device', 'cpu']
            try:
                parser.parse_args(argv)
                accepted = True
            except SystemExit:
                message = capsys.readouterr().err.strip().splitlines()[-1]
                assert '--hidden_dim' in message and 'error' in message, message
                accepted = False
            runs = encoder_and_decoder_run(without_checks_across_flags(parser, argv))
            assert accepted == runs, (hidden_dim, nheads, position_embedding, accepted)


@pytest.mark.parametrize('dilation, multiple, largest', [(False, 1, 1600), (True, 1, 800), (False, 128, 1536)])
def test_a_learned_position_embedding_is_accepted_exactly_for_the_image_sizes_it_covers(dilation, multiple, largest,
                                                                                         capsys):
    # above them the forward failed mid-run with IndexError: index out of range in self
    model = None
    for side in (largest, largest + 1):
        argv = ['--position_embedding', 'learned', '--backbone', 'resnet50' if dilation else 'resnet18',  # DC5's
                '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2', '--enc_layers', '1',
                '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '3', '--device', 'cpu',
                '--val_size', '32', '--train_scales', '32', '--train_max_size', str(side), '--val_max_size', str(side),
                '--size_divisibility', str(multiple), *(['--dilation'] if dilation else [])]
        try:
            args, problem = get_args_parser().parse_args(argv), None
        except SystemExit:  # the parser's check of flag combinations
            problem = capsys.readouterr().err
        model = model or build_model(args)[0].eval()  # the first side's flags are accepted
        padded = -(-side // multiple) * multiple  # the widest batch these flags let through
        try:
            with torch.no_grad():
                model(samples=torch.zeros(1, 3, 32, padded), mask=torch.zeros(1, 32, padded, dtype=torch.bool))
            runs = True
        except IndexError:
            runs = False
        assert runs == (side == largest) and (problem is None) == runs, (side, problem)
    assert f'--train_max_size {largest + 1}' in problem and 'up to 50 x 50' in problem


def test_backbone_in_workers_is_refused_on_a_gpu_and_accepted_when_frozen_on_the_cpu():
    frozen = dict(backbone_in_workers=True, lr_backbone=0.0, num_workers=2)
    problem = check_flag_combinations(argparse.Namespace(**frozen, device='cuda:0'))
    assert problem.startswith('--backbone_in_workers runs the backbone on the CPU') and '--device cuda:0' in problem
    assert check_flag_combinations(argparse.Namespace(**frozen, device='cpu')) is None
    args = get_args_parser().parse_args(['--backbone_in_workers', '--lr_backbone', '0', '--num_workers', '1'])
    assert args.backbone_in_workers and args.num_workers == 1


def test_a_preset_backbone_in_workers_is_undone_on_the_command_line():
    demo = os.path.join(ROOT, 'configs', 'demo.yaml')
    parser = get_args_parser()
    assert parse_args_with_config(parser, ['--config', demo]).backbone_in_workers
    args = parse_args_with_config(get_args_parser(),
                                  ['--config', demo, '--num_workers', '0', '--no-backbone_in_workers'])
    assert not args.backbone_in_workers and args.num_workers == 0


def test_a_presets_boolean_model_and_precision_flags_are_undone_on_the_command_line(tmp_path):
    preset = tmp_path / 'p.yaml'
    preset.write_text('amp: true\ndilation: true\npre_norm: true\n')
    args = parse_args_with_config(get_args_parser(), ['--config', str(preset)])
    assert args.amp and args.dilation and args.pre_norm
    args = parse_args_with_config(get_args_parser(), ['--config', str(preset), '--no-amp', '--no-dilation',
                                                      '--no-pre_norm'])
    assert not (args.amp or args.dilation or args.pre_norm)


def test_help_with_a_preset_shows_the_presets_values_and_switches_no_misleading_default(capsys):
    demo = os.path.join(ROOT, 'configs', 'demo.yaml')
    with pytest.raises(SystemExit) as exit_:
        parse_args_with_config(get_args_parser(), ['--config', demo, '--help'])
    assert exit_.value.code == 0
    out = ' '.join(capsys.readouterr().out.split())
    assert '--hidden_dim HIDDEN_DIM default: 128' in out and '--epochs EPOCHS default: 24' in out  # demo.yaml's
    no_aux_loss = out[out.index('--no_aux_loss turn off'):]
    assert '(default' not in no_aux_loss[:no_aux_loss.index(' --', 3)]  # a switch: no "(default: True)" beside it
    assert "--amp, --no-amp autocast" in out and "a preset's) (default: True)" in out  # demo.yaml's amp: true


def test_training_with_flex_on_a_cpu_is_refused_before_anything_is_built(tmp_path):
    # torch's CPU flex_attention has a forward only: training failed at its first backward, after data and model
    from detr_irpe.cli import train as train_tool
    argv = ['--config', os.path.join(ROOT, 'configs', 'smoke.yaml'), '--attention_impl', 'flex', '--device', 'cpu',
            '--output_dir', str(tmp_path / 'out'), '--synthetic_dir', str(tmp_path / 'syn')]
    with pytest.raises(UsageError, match='--attention_impl flex trains on a GPU only'):
        train_tool.run(parse_args_with_config(get_args_parser(), argv))
    assert not (tmp_path / 'syn').exists()


def test_training_without_an_output_dir_is_refused_before_anything_is_built(tmp_path):
    # DETR's default output_dir '': a whole run trained and kept nothing, exit status 0
    from detr_irpe.cli import train as train_tool
    argv = ['--config', os.path.join(ROOT, 'configs', 'smoke.yaml'), '--output_dir', '', '--synthetic_dir',
            str(tmp_path / 'syn')]
    with pytest.raises(UsageError, match=r'^no --output_dir: this training run would keep no checkpoint, log or '
                                         r'evaluation; pass --output_dir DIR'):
        train_tool.run(parse_args_with_config(get_args_parser(), argv))
    assert not (tmp_path / 'syn').exists()
    train_tool.run(parse_args_with_config(get_args_parser(), argv + ['--epochs', '0']))  # a check keeps nothing
    assert (tmp_path / 'syn').exists()


def test_compile_takes_a_mode_and_cuda_graphs_are_refused_without_a_gpu(tmp_path, capsys):
    parse = get_args_parser().parse_args
    assert parse([]).compile is None and parse(['--compile']).compile == 'default'
    assert parse(['--compile', '--size_divisibility', '128']).size_divisibility == 128
    with pytest.raises(SystemExit):
        parse(['--compile', 'reduce-overhead', '--device', 'cpu'])
    assert 'error: --compile reduce-overhead records CUDA graphs' in capsys.readouterr().err
    # a preset's `compile: true` (the flag's old switch form) is --compile alone
    assert parse_args_with_config(get_args_parser(), ['--config', write(tmp_path / 'c.yaml', 'compile: true\n')]
                                  ).compile == 'default'
    problem = check_flag_combinations(argparse.Namespace(compile='reduce-overhead', device='cpu'))
    assert problem.startswith('--compile reduce-overhead records CUDA graphs') and '--device cpu' in problem
    assert check_flag_combinations(argparse.Namespace(compile='reduce-overhead', device='cuda')) is None
    assert check_flag_combinations(argparse.Namespace(compile='default', device='cpu')) is None


def test_world_size_must_be_what_torchrun_launched(monkeypatch, capsys):
    """--world_size was read from torchrun's environment alone: `train.py --world_size 4` trained one process."""
    from detr_irpe import distributed
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(['--world_size', '4'])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --world_size 4: the processes are the ones torchrun starts (without torchrun this is one); launch "
        "`torchrun --nproc_per_node 4 tools/train.py ...` and leave --world_size out")
    args = get_args_parser().parse_args(['--world_size', '1'])  # what it is
    distributed.init_distributed(args)
    assert args.world_size == 1 and not args.distributed
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert check_flag_combinations(argparse.Namespace(world_size=2)) is None
    assert 'torchrun started 2' in check_flag_combinations(argparse.Namespace(world_size=4))
    assert get_args_parser().parse_args([]).world_size is None  # left out: torchrun's, set by init_distributed


def test_a_device_this_machine_lacks_is_a_usage_error(capsys):
    # cuda:<count> exists nowhere: on a machine without CUDA, 'cuda' itself is missing too
    missing = [f'cuda:{torch.cuda.device_count()}', 'tpu'] + ([] if torch.cuda.is_available() else ['cuda'])
    for device in missing:
        with pytest.raises(SystemExit):
            get_args_parser().parse_args(['--device', device])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert '--device' in last and repr(device) in last, last
    assert get_args_parser().parse_args(['--device', 'cpu']).device == 'cpu'


def test_the_runner_prints_the_projects_warnings_in_one_line_and_others_as_python_does():
    # each data warning was two lines: 'path/build.py:132: UserWarning: ...' and the warn call's source line
    code = '''if True:
        import argparse, warnings
        import detr_irpe_datasets.build as datasets
        from detr_irpe.cli.runner import run_tool
        python_format = warnings.formatwarning
        def main():
            datasets.warn_val_size_outside_training_scales(argparse.Namespace(train_scales=[64], val_size=800))
            warnings.warn('from elsewhere')
        run_tool(main)
        print(warnings.formatwarning is python_format)'''
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout == 'True\n', run.stderr  # Python's format is back after the tool
    lines = run.stderr.splitlines()
    assert lines[0].startswith('warning: --val_size 800 lies outside the training scales (--train_scales 64): ')
    assert lines[1] == '<string>:8: UserWarning: from elsewhere' and len(lines) == 2, lines


def test_a_path_that_cannot_be_written_ends_in_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv('DETR_IRPE_DEBUG', raising=False)
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(SystemExit) as e:
        run_tool(os.makedirs, str(blocker / 'run'))  # what a tool does with --output_dir a_file/run
    assert str(e.value).startswith('error: ') and str(blocker / 'run') in str(e.value) and '\n' not in str(e.value)


def test_the_runner_ends_a_usage_error_in_one_line_and_leaves_a_bug_its_traceback(monkeypatch, capsys):
    monkeypatch.delenv('DETR_IRPE_DEBUG', raising=False)

    def raises(error):
        raise error
    with pytest.raises(SystemExit) as e:
        run_tool(raises, UsageError('--lr -1: expected a finite number >= 0'))
    assert e.value.code == 2 and capsys.readouterr().err == 'error: --lr -1: expected a finite number >= 0\n'
    # a bug: a plain ValueError, RuntimeError (a shape mismatch, out of memory), an OSError naming no file
    for bug in (ValueError('bad shape'), RuntimeError('CUDA out of memory'), OSError('no file named')):
        with pytest.raises(type(bug)):
            run_tool(raises, bug)


def _assert_clean_failure(run, *needles):
    assert run.returncode != 0
    assert 'Traceback' not in run.stderr, run.stderr[-2000:]
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr[-2000:])


def test_missing_coco_path_names_it_and_the_layout(tmp_path):
    run = tool('train.py', '--dataset_file', 'coco', '--coco_path', str(tmp_path / 'nowhere'), '--device', 'cpu',
               '--backbone_weights', 'none', '--output_dir', str(tmp_path / 'out'))
    _assert_clean_failure(run, 'nowhere', 'annotations')


def test_coco_path_not_given_says_what_to_pass(tmp_path):
    run = tool('train.py', '--dataset_file', 'coco', '--device', 'cpu', '--backbone_weights', 'none', '--output_dir',
               str(tmp_path / 'out'))
    _assert_clean_failure(run, '--coco_path')


def test_malformed_enc_rpe2d_on_the_command_line(tmp_path):
    run = tool('train.py', '--config', 'configs/smoke.yaml', '--enc_rpe2d', 'rpe-2.0-product-ctx-9-k')
    _assert_clean_failure(run, "'rpe-2.0-product-ctx-9-k'", 'shared_head')


def test_resume_from_a_missing_checkpoint(tmp_path):
    run = tool('eval.py', '--config', 'configs/smoke.yaml', '--resume', str(tmp_path / 'none.pth'),
               '--synthetic_dir', str(tmp_path / 's'))
    _assert_clean_failure(run, 'none.pth', 'does not exist')


def test_eval_refuses_a_checkpoint_that_would_run_code(tmp_path, code_running_checkpoint):
    path, marker = code_running_checkpoint
    run = tool('eval.py', '--config', 'configs/smoke.yaml', '--resume', path, '--synthetic_dir', str(tmp_path / 's'))
    _assert_clean_failure(run, 'refusing to load')
    assert not os.path.exists(marker)


def test_backbone_weights_offline_imagenet_or_bad_path_is_explained(tmp_path):
    run = tool('train.py', '--config', 'configs/smoke.yaml', '--backbone_weights', str(tmp_path / 'r18.pth'),
               '--synthetic_dir', str(tmp_path / 's'), '--output_dir', str(tmp_path / 'o'))
    _assert_clean_failure(run, 'r18.pth')


def test_a_presets_relative_file_from_another_folder_names_the_folder_it_was_looked_for_in(tmp_path):
    """configs/demo.yaml names its backbone relative to the checkout; run from elsewhere, the error says where it
    looked."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'train.py'), '--config',
                          os.path.join(ROOT, 'configs', 'demo.yaml')], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    _assert_clean_failure(run, "'configs/weights/synthetic_resnet18.pth'",
                          f'(no such file below the current folder {tmp_path})')
