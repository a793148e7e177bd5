"""The package as pip installs it from a wheel (no checkout beside it: no tools/, no setup.py), used from another
folder: its packages, its compiled op and the console scripts that look for files of the checkout."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """(folder the wheel was installed into, environment that imports from there first). The wheel is built in
    the checkout, as pip builds a local folder: in build/, where make setup's compiled objects are reused."""
    tmp = tmp_path_factory.mktemp('install')
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    env = {**os.environ, 'MAX_JOBS': '2'}
    subprocess.run([*pip, 'wheel', '--no-build-isolation', '--no-deps', '-w', str(tmp / 'wheel'), ROOT],
                   env=env, check=True, capture_output=True, timeout=900)
    wheel, = os.listdir(tmp / 'wheel')
    target = tmp / 'site'
    subprocess.run([*pip, 'install', '--no-deps', '--target', str(target), str(tmp / 'wheel' / wheel)], env=env,
                   check=True, capture_output=True, timeout=300)
    # PYTHONPATH comes before site-packages, where the checkout's editable install is
    return target, {**env, 'PYTHONPATH': str(target), 'OMP_NUM_THREADS': '1'}


@pytest.mark.slow
def test_the_installed_packages_and_op_are_the_wheels(installed, tmp_path):
    target, env = installed
    code = ('import json, detr_irpe, detr_irpe_datasets.build, rpe_ops; '
            'print(json.dumps([detr_irpe.__file__, detr_irpe_datasets.build.__file__, rpe_ops.build_info()]))')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    library, datasets, info = json.loads(out.stdout)
    assert library.startswith(str(target)) and datasets.startswith(str(target))
    assert info['cpu'] is True and info['import_error'] is None
    assert not os.path.exists(target / 'tools') and not os.path.exists(target / 'setup.py')


@pytest.mark.slow
def test_console_scripts_that_look_for_the_checkout_run_from_the_install(installed, tmp_path):
    """gpu_check builds nothing there (it looked for setup.py); sweep launches training as a module (it looked
    for tools/train.py)."""
    target, env = installed
    run = subprocess.run([str(target / 'bin' / 'detr-irpe-gpu-check'), '--device', 'cpu', '--quick', '--checks',
                          'extension', 'op_matches_reference', '--benchmarks', '--output', 'check.json'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / 'check.json').read_text())
    assert report['build'] is None and report['failed'] == []
    code = 'import json; from detr_irpe.lab.sweep import launch_command as c; print(json.dumps(c(["--help"], None, 0)[0]))'
    command = json.loads(subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True,
                                        text=True, check=True).stdout)
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and '--enc_rpe2d' in run.stdout, run.stderr[-2000:]
