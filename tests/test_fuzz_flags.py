"""Every flag of every tool, given bad values generated from its parser (zero, negative, huge, wrong type,
empty, a wrong number of values, a MIN above its MAX), ends in a one-line usage error naming the flag, or
runs; the same values written in a YAML preset get the same answer. A flag added to a parser is covered
without editing this file.

Parsing happens in-process (SystemExit caught, stderr captured). A value the DETR parser accepts goes on
through what tools/train.py does with it, cut to one image: data, model, one training step, the schedule,
one inference; that must run, or fail with the kind of error the tools print as one line (UsageError, or an
OSError naming its file) naming the flag. A few cases run end to end through tools/train.py.
"""
import argparse
import contextlib
import copy
import glob
import importlib
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

import detr_irpe_datasets.build as datasets
from detr_irpe import UsageError, build_model, engine
from detr_irpe.cli.presets import parse_args_with_config
from detr_irpe.precision import choose_precision


def load_tool(name):
    return importlib.import_module(f'detr_irpe.cli.{name}')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.yaml')
NUMBER_VALUES = ['0', '1', '-1', '1000000000000', '1e308', 'inf', 'nan', '1.5', 'abc', '']  # zero, smallest .. empty
WORD_VALUES = ['0', '-1', 'abc', '', '.', 'base.yaml']  # any text (a path, a name): also a folder and a file that exist


def accepts(action, text):
    try:
        action.type(text) if action.type else text
        return True
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False


def bad_values(action):
    """Lists of command-line words to give after the flag, generated from the action alone."""
    if action.nargs == 0 or not action.option_strings or action.dest == 'help':
        return []
    if action.choices is not None:
        singles = ['', 'no_such_choice']
    elif accepts(action, 'abc'):
        singles = WORD_VALUES  # any text goes: numbers are just more text
    else:
        singles = NUMBER_VALUES
    count = action.nargs if isinstance(action.nargs, int) else 1
    cases = [[v] * count for v in singles]
    if isinstance(action.nargs, int) and action.nargs > 1:
        cases.append(['1'])  # too few values
    if action.metavar == ('MIN', 'MAX') and isinstance(action.default, list):
        cases.append([str(v) for v in reversed(sorted(action.default))] if action.default[0] != action.default[1]
                     else [str(action.default[0] + 1), str(action.default[0])])
    return cases


def preset_value(words, action):
    """The value of a preset line giving `words` to the flag, as a user would write it in YAML."""
    def scalar(word):
        value = yaml.safe_load(word) if word else ''
        return value if isinstance(value, (int, float, str)) else word
    many = isinstance(action.nargs, int) or action.nargs in ('+', '*')
    return [scalar(w) for w in words] if many else scalar(words[0])


def parse_in_process(parse, argv):
    """(namespace or None, last stderr line) of one parse; SystemExit is the usage-error path."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            return parse(argv), ''
        except SystemExit as e:
            text = err.getvalue() + (e.code if isinstance(e.code, str) else '')
    lines = [line for line in text.splitlines() if line.strip()]
    return None, (lines[-1] if lines else '') + ('\nTraceback' if 'Traceback' in text else '')


class ReadRecorder:
    """A namespace stand-in that remembers which flags were read."""

    def __init__(self, args):
        object.__setattr__(self, '_args', args)
        object.__setattr__(self, 'read', set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._args, name)

    def __setattr__(self, name, value):
        setattr(self._args, name, value)


class Memo:
    """Results of a deterministic function of a namespace, keyed by the values of the flags it read: a value
    given to a flag the function never reads cannot change its result, so it is not run again."""

    def __init__(self, fn):
        self.fn, self.seen = fn, []  # [(names read, {their values: result})]

    def __call__(self, args):
        for names, results in self.seen:
            key = tuple(repr(getattr(args, n, None)) for n in names)
            if key in results:
                return results[key]
        # Nested in another Memo's function, args is that one's recorder: the keys below are read through it.
        recorder = ReadRecorder(copy.deepcopy(args._args if isinstance(args, ReadRecorder) else args))
        try:
            result = ('ok', self.fn(recorder))
        except UsageError as e:  # what the tools print as one line (run_tool)
            result = ('error', str(e))
        except OSError as e:  # one line too where it names its file
            result = ('error' if e.filename is not None else 'traceback', str(e))
        except Exception as e:  # noqa: BLE001 -- anything else would reach the user as a traceback
            result = ('traceback', f'{type(e).__name__}: {e}')
        names = tuple(sorted(recorder.read))
        for known, results in self.seen:
            if known == names:
                break
        else:
            results = {}
            self.seen.append((names, results))
        results[tuple(repr(getattr(args, n, None)) for n in names)] = result
        return result


def first_batches(args):
    dataset_train, dataset_val = datasets.build_dataset('train', args), datasets.build_dataset('val', args)
    datasets.check_against_training_set(dataset_train, args)
    return datasets.collate_fn([dataset_train[0]]), datasets.collate_fn([dataset_val[0]])


def model_parts(args):
    if args.num_classes is None:
        args.num_classes = datasets.num_classes_for(args)
    return build_model(args)


def raise_from(result):
    kind, value = result
    if kind == 'error':
        raise UsageError(value)
    if kind == 'traceback':
        raise AssertionError(value)  # not an error a tool prints cleanly: the fuzz reports it
    return value


class OneTrainingStep:
    """What tools/train.py does with args, cut to one image: data, model, one step, the schedule, inference.
    Data and model are built once per distinct value of the flags they read."""

    def __init__(self):
        self.data, self.model = Memo(first_batches), Memo(model_parts)
        self.run = Memo(self.step)

    def step(self, args):
        (train_batch, val_batch) = raise_from(self.data(args))
        model, criterion, postprocessors = copy.deepcopy(raise_from(self.model(args)))
        optimizer = engine.build_optimizer(model, args)
        lr_scheduler = engine.build_lr_scheduler(optimizer, args)
        device = torch.device(args.device)
        engine.train_one_epoch(model, criterion, [train_batch], optimizer, lr_scheduler, device, 0, args,
                               choose_precision(device, args.amp))
        lr_scheduler.step()
        images, targets = val_batch
        with torch.no_grad():
            postprocessors['bbox'](model.eval()(images), torch.stack([t['orig_size'] for t in targets]))

    def __call__(self, args):
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter('ignore')
            return self.run(args)


class Fuzz:
    """Tries the bad values of each flag of one parser and records every answer."""

    def __init__(self, tool, make_parser, parse, base_argv, run=None, skip=()):
        self.tool, self.make_parser, self.parse, self.base_argv = tool, make_parser, parse, base_argv
        self.run, self.skip = run, set(skip)
        self.answers = []  # (input, 'usage error' | 'ran' | 'error' | 'accepted', detail)
        self.kinds = {}  # (where: 'command line' | 'preset', dest, words) -> the answer's kind
        self.failures = []

    def actions(self):
        return [a for a in self.make_parser()._actions if a.option_strings and a.dest not in self.skip]

    def answer(self, label, flag_names, argv, key):
        self._answer(label, flag_names, argv)
        self.kinds[key] = self.answers[-1][1]

    def _answer(self, label, flag_names, argv):
        args, last_line = parse_in_process(lambda a: self.parse(self.make_parser(), a), argv)
        if args is None:
            if 'Traceback' in last_line or 'error' not in last_line or not any(n in last_line for n in flag_names):
                self.failures.append(f'{label}: usage error does not name {flag_names[0]} on its last line: '
                                     f'{last_line!r}')
            self.answers.append((label, 'usage error', last_line))
            return
        if self.run is None:
            self.answers.append((label, 'accepted', ''))
            return
        kind, message = self.run(args)
        if kind == 'traceback' or (kind == 'error' and not any(n in message for n in flag_names)):
            self.failures.append(f'{label}: accepted by the parser, then: {message[:300]}')
        self.answers.append((label, 'ran' if kind == 'ok' else 'error', message if kind != 'ok' else ''))

    def command_line(self):
        for action in self.actions():
            for words in bad_values(action):
                flag = action.option_strings[-1]
                self.answer(f'{self.tool} {flag} {" ".join(map(repr, words))}', [flag],
                            self.base_argv + [flag] + words, ('command line', action.dest, tuple(words)))

    def presets(self, folder, base_preset):
        """Each bad value written into a copy of the base preset (`base_preset`, a dict), given as --config."""
        for action in self.actions():
            if action.dest == 'config':
                continue
            for n, words in enumerate(bad_values(action)):
                path = os.path.join(folder, f'{self.tool}_{action.dest}_{n}.yaml')
                with open(path, 'w') as f:
                    f.write(yaml.safe_dump({**base_preset, action.dest: preset_value(words, action)}))
                flag = action.option_strings[-1]
                self.answer(f'{self.tool} preset {action.dest}: {words}', [flag, action.dest], ['--config', path],
                            ('preset', action.dest, tuple(words)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder to run in: relative paths given as values (an --output_dir '0') land here."""
    folder = tmp_path_factory.mktemp('fuzz')
    old = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(old)


def small_preset(folder):
    """configs/smoke.yaml on 4 + 2 synthetic images in `folder`, its output_dir there too; the backbone frozen
    (a step then updates the small transformer only: the fuzz takes a third of the time)."""
    with open(SMOKE) as f:
        preset = yaml.safe_load(f)
    return {**preset, 'synthetic_dir': str(folder / 'synthetic'), 'synthetic_train': 4, 'synthetic_val': 2,
            'output_dir': str(folder / 'out'), 'lr_backbone': 0}


def small_preset_argv(folder):
    path = folder / 'base.yaml'
    path.write_text(yaml.safe_dump(small_preset(folder)))
    return ['--config', str(path)]


@pytest.fixture(scope='module')
def detr_fuzz(workdir):
    train = load_tool('train')
    fuzz = Fuzz('train.py', train.get_parser, lambda p, a: parse_args_with_config(p, a), small_preset_argv(workdir),
                run=OneTrainingStep())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fuzz.command_line()
        fuzz.presets(str(workdir), small_preset(workdir))
    finally:
        torch.set_num_threads(threads)
    return fuzz


def test_every_flag_of_train_gives_a_usage_error_naming_it_or_runs(detr_fuzz, workdir):
    counts = {}
    for _, kind, _ in detr_fuzz.answers:
        counts[kind] = counts.get(kind, 0) + 1
    print(f'\ntrain.py (every DETR and data flag, on the command line and in a preset): {len(detr_fuzz.answers)} '
          f'bad inputs: {counts}')
    assert not detr_fuzz.failures, '\n'.join(detr_fuzz.failures[:40])
    assert not (workdir / 'out').exists()  # nothing ran far enough to write
    # each flag was tried on the command line and in a preset
    tried = {label.split()[1] for label, _, _ in detr_fuzz.answers if label.split()[1].startswith('--')}
    parser = load_tool('train').get_parser()
    flags = {a.option_strings[-1] for a in parser._actions if a.option_strings and bad_values(a)}
    assert flags <= tried


def test_a_preset_value_gets_the_same_answer_as_on_the_command_line(detr_fuzz):
    compared = 0
    for (where, dest, words), kind in detr_fuzz.kinds.items():
        if where == 'preset':
            assert kind == detr_fuzz.kinds[('command line', dest, words)], (dest, words, kind)
            compared += 1
    assert compared > 400


TOOLS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'tools', '*.py')))
OTHER_TOOLS = [t for t in TOOLS if t != 'train']


def required_argv(parser):
    """The least argv that parses: a word for each positional and each required flag."""
    argv = []
    for action in parser._actions:
        if not action.option_strings:
            argv.append('x.jpg')
        elif action.required:
            argv += [action.option_strings[-1], 'x']
    return argv


@pytest.mark.parametrize('tool', OTHER_TOOLS)
def test_every_own_flag_of_the_other_tools_gives_a_usage_error_naming_it_or_is_accepted(tool, workdir):
    """Their flags shared with train.py are fuzzed above; here their own ones, parsed only (their runs are not
    cheap: benchmarks, exports, plots of a checkpoint's output)."""
    module = load_tool(tool)
    assert hasattr(module, 'get_parser'), f'tools/{tool}.py has no get_parser(): its flags cannot be fuzzed'
    detr_flags = any(a.dest == 'enc_rpe2d' for a in module.get_parser()._actions)
    if detr_flags:
        parse = lambda p, a: parse_args_with_config(p, a)  # noqa: E731
        shared = {a.dest for a in load_tool('train').get_parser()._actions}
    else:
        parse = lambda p, a: p.parse_known_args(a)[0]  # noqa: E731
        shared = set()
    base = required_argv(module.get_parser())
    fuzz = Fuzz(f'{tool}.py', module.get_parser, parse, base, skip=shared | {'config'})
    fuzz.command_line()
    refused = sum(kind == 'usage error' for _, kind, _ in fuzz.answers)
    accepted = [label for label, kind, _ in fuzz.answers if kind == 'accepted']
    print(f'\n{tool}.py own flags: {len(fuzz.answers)} bad inputs, {refused} usage errors, accepted: {accepted}')
    assert not fuzz.failures, '\n'.join(fuzz.failures)
    # a number flag takes no text, no empty value and nothing non-finite (zero, negative and huge may be fine)
    text_flags = {a.option_strings[-1] for a in fuzz.actions() if accepts(a, 'abc')}
    for label in accepted:
        flag, value = label.split()[1], label.split(' ', 2)[2]
        assert flag in text_flags or value not in ("'nan'", "'inf'", "'abc'", "''"), label


def tool_run(*argv):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    env.pop('DETR_IRPE_DEBUG', None)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'train.py'), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('flags,named', [
    (['--num_queries', '0'], '--num_queries'),
    (['--hidden_dim', '250'], '--hidden_dim'),
    (['--threads', '-3'], '--threads'),
    (['--batch_size', '1000'], '--batch_size'),
    (['--num_classes', '2'], '--num_classes'),  # the smoke set's category ids go up to 3
])
def test_representative_bad_flags_end_to_end(tmp_path, flags, named):
    run = tool_run(*small_preset_argv(tmp_path), *flags)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-2000:]
    assert named in last and 'error' in last, run.stderr[-2000:]
    assert not (tmp_path / 'out').exists()  # nothing half-written
