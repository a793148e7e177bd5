"""The command line: flags (flags.py), YAML presets (presets.py), the tool runner (runner.py), and one module per
tool with its get_parser() and main(), which tools/<name>.py and the detr-irpe-<name> console scripts call."""
