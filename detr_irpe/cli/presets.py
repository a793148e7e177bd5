"""YAML presets (configs/*.yaml): keys are flag names without dashes; command-line flags override them."""
import argparse
import difflib
import sys

import torch
import yaml

from detr_irpe.cli.flags import get_args_parser

# libyaml's loader where PyYAML was built with it: the same safe rules, several times faster
SAFE_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


def parse_args_with_config(parser, argv=None):
    """Parse argv with `--config FILE` presets: file values become defaults, explicit flags win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser.add_argument('--config', default=None, help='YAML preset from configs/; flags given here override it')
    if known.config:
        preset = load_config(known.config, parser)
        if any(a.dest == 'dataset_file' for a in parser._actions):
            # here: a tool without data flags runs where datasets/ is not installed
            from detr_irpe_datasets.build import DATA_LOCATION_FLAGS
            if command_line_flags(parser, argv) & set(DATA_LOCATION_FLAGS):
                # data given on the command line replaces the preset's, whichever way each gives it
                preset = {k: v for k, v in preset.items() if k not in DATA_LOCATION_FLAGS}
        parser.set_defaults(**preset)
    return parser.parse_args(argv)


def load_config(path, parser):
    """The flag values of a YAML preset, each checked as the same flag on the command line would be (its type,
    range, choices and number of values; a switch takes true or false). A problem is the parser's usage error."""
    try:
        with open(path) as f:
            values = yaml.load(f, Loader=SAFE_LOADER) or {}
    except FileNotFoundError:
        parser.error(f'--config {path!r} does not exist; presets live in configs/ (e.g. configs/smoke.yaml).')
    except IsADirectoryError:
        parser.error(f'--config {path!r} is a folder; expected a YAML file such as configs/smoke.yaml.')
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        parser.error(f'--config {path!r} is not valid YAML: ' + ' '.join(str(e).split()))
    if not isinstance(values, dict):
        parser.error(f'--config {path!r} must be a mapping of flag names to values, got {type(values).__name__}.')
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ('help', 'config')}
    # One preset serves every tool: a key of training's flags that this tool does not use is left out.
    training = {a.dest for a in get_args_parser()._actions if a.option_strings}
    for key in values:
        if key not in actions and key not in training:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f'did you mean {close[0]}?' if close else 'keys are flag names without dashes, e.g. batch_size'
            parser.error(f'--config {path!r}: {key!r} is no flag of this tool; {hint}')
    return {key: preset_value(parser, actions[key], value, f'--config {path!r}: {key}')
            for key, value in values.items() if key in actions}


def preset_value(parser, action, value, where):
    """One preset value through the checks of its flag; `where` starts the error message."""
    if action.nargs == 0:  # a switch: store_true / store_false
        if not isinstance(value, bool):
            parser.error(f'{where}: expected true or false, got {value!r}')
        return value
    if action.nargs == '?' and isinstance(value, bool):  # `compile: true` as `--compile` alone on a command line
        return action.const if value else action.default
    if value is None:
        if action.default is None:
            return None
        parser.error(f'{where}: expected a value, got null (leave the key out for the default {action.default!r})')
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many != isinstance(value, list):
        expected = f'a list of {action.nargs} values' if isinstance(action.nargs, int) else (
            'a list of values' if many else 'a single value, not a list')
        parser.error(f'{where}: expected {expected}, got {value!r}')
    items = value if many else [value]
    if (isinstance(action.nargs, int) and len(items) != action.nargs) or (action.nargs == '+' and not items):
        parser.error(f'{where}: expected {action.nargs if action.nargs != "+" else "at least 1"} values, '
                     f'got {len(items)}: {value!r}')
    checked = []
    for item in items:
        if isinstance(item, (dict, list)):
            parser.error(f'{where}: expected a plain value, got {item!r}')
        # The flag's type sees the text a command line would give, so 2.5 is no integer and `yes` no number.
        text = item if isinstance(item, str) else ('true' if item is True else 'false' if item is False else str(item))
        try:
            item = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            parser.error(f'{where}: {e}')
        if action.choices is not None and item not in action.choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in action.choices], n=1)
            hint = f'; did you mean {close[0]}?' if close else ''
            parser.error(f'{where}: {item!r} is not one of {", ".join(map(str, action.choices))}{hint}')
        checked.append(item)
    return checked if many else checked[0]


def command_line_flags(parser, argv=None):
    """Destinations of the flags set on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    return {action.dest for action in parser._actions for opt in action.option_strings
            if any(a == opt or a.startswith(opt + '=') for a in argv)}


def output_dir_of_command_line(parser, argv, args):
    """args.output_dir as the command line gives it, else None: a tool that reads a checkpoint (eval, predict,
    visualize_rpe) writes beside it, since a preset's output_dir is its training run's folder."""
    if 'output_dir' not in command_line_flags(parser, argv):
        args.output_dir = None


def explicit_flags(parser, argv=None):
    """Destinations of the flags set on the command line or in the --config file (not left at defaults)."""
    argv = sys.argv[1:] if argv is None else argv
    given = command_line_flags(parser, argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', default=None)
    config = pre.parse_known_args(argv)[0].config
    if config:
        given |= set(load_config(config, parser))
    return given


def parse_checkpoint_args(parser, argv, what):
    """parse_args_with_config for a tool that runs a checkpoint: --resume required (`what`: what the file is for),
    --threads applied."""
    args = parse_args_with_config(parser, argv)
    if not args.resume:
        parser.error(f'--resume CHECKPOINT is required: {what}')
    use_threads(args)
    return args


def use_threads(args):
    """--threads N as torch's CPU threads (0: torch's default)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
