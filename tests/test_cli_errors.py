"""Bad input to the tools ends in a message that names it, never in a traceback."""
import os
import subprocess
import sys

import pytest

from detr_irpe import get_args_parser
from detr_irpe.config import explicit_flags, parse_args_with_config

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
    ('batchsize: 8\n', 'batchsize'),
    ('enc_rpe2d: rpe-2.0-product\n', "'rpe-2.0-product'"),
    ('- a list\n', 'mapping'),
    ('lr: [unclosed\n', 'not valid YAML'),
])
def test_bad_config_file_is_a_clear_error(tmp_path, text, message, capsys):
    config = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(get_args_parser(), ['--config', config])
    assert message in str(e.value) + capsys.readouterr().err


def _assert_clean_failure(run, *needles):
    assert run.returncode != 0
    assert 'Traceback' not in run.stderr, run.stderr[-2000:]
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr[-2000:])


def test_missing_coco_path_names_it_and_the_layout(tmp_path):
    run = tool('train.py', '--dataset_file', 'coco', '--coco_path', str(tmp_path / 'nowhere'), '--device', 'cpu',
               '--backbone_weights', 'none')
    _assert_clean_failure(run, 'nowhere', 'annotations')


def test_coco_path_not_given_says_what_to_pass():
    run = tool('train.py', '--dataset_file', 'coco', '--device', 'cpu', '--backbone_weights', 'none')
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
