"""YAML presets (configs/*.yaml): keys are flag names without dashes; command-line flags override them."""
import argparse
import sys

import yaml


def parse_args_with_config(parser, argv=None):
    """Parse argv with `--config FILE` presets: file values become defaults, explicit flags win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser.add_argument('--config', default=None, help='YAML preset from configs/; flags given here override it')
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


def load_config(path, parser):
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SystemExit(f'--config {path!r} does not exist; presets live in configs/ (e.g. configs/smoke.yaml).')
    except yaml.YAMLError as e:
        raise SystemExit(f'--config {path!r} is not valid YAML: {e}')
    if not isinstance(values, dict):
        raise SystemExit(f'--config {path!r} must be a mapping of flag names to values, got {type(values).__name__}.')
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        raise SystemExit(f'--config {path!r} has keys that are no flag of this tool: {", ".join(unknown)}. '
                         f'Keys are flag names without dashes, e.g. enc_rpe2d, batch_size.')
    for key, value in values.items():
        # Values go through the flag's own type check, so a preset cannot hold what the flag would refuse.
        action = actions[key]
        if action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise SystemExit(f'--config {path!r}: {key}: {e}')
        values[key] = value
    return values


def explicit_flags(parser, argv=None):
    """Destinations of the flags set on the command line or in the --config file (not left at defaults)."""
    argv = sys.argv[1:] if argv is None else argv
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + '=') for a in argv):
                given.add(action.dest)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', default=None)
    config = pre.parse_known_args(argv)[0].config
    if config:
        given |= set(load_config(config, parser))
    return given


def run_tool(main, *args):
    """Run a tool's main; an error about the user's input ends with its message, not a traceback
    (set DETR_IRPE_DEBUG=1 for the traceback)."""
    import os
    try:
        return main(*args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get('DETR_IRPE_DEBUG'):
            raise
        sys.exit(f'error: {e}')
