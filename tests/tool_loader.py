"""Load a script of tools/ as a module (tools/ is no package), so tests call its get_parser() and main()."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """tools/<name>.py, freshly executed: a new module object on every call."""
    spec = importlib.util.spec_from_file_location(f'tool_{name}', os.path.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
