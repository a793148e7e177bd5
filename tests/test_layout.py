"""The layout as the imports read: the library never imports the command line or the lab, the data folder never
the command line, no module imports itself through others, tools/ holds entry points only, and datasets/ is
found under its installed name, never as an installed `datasets` package (Hugging Face's)."""
import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_name(path):
    """detr_irpe/cli/flags.py -> detr_irpe.cli.flags; datasets/coco.py -> detr_irpe_datasets.coco (its installed name)."""
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if parts[0] == 'datasets':
        parts[0] = 'detr_irpe_datasets'
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def our_modules():
    paths = glob.glob(os.path.join(ROOT, 'detr_irpe', '**', '*.py'), recursive=True)
    paths += glob.glob(os.path.join(ROOT, 'datasets', '*.py'))
    return {module_name(p): p for p in paths}


def top_level_imports(path, name, known):
    """The modules of ours that `path` (module `name`) imports when it is imported: statements outside functions."""
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    found = set()
    for node in ast.parse(open(path).read()).body:
        nodes = [node] + (list(ast.walk(node)) if isinstance(node, (ast.Try, ast.If)) else [])
        for n in nodes:
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ''
                if n.level:
                    base = '.'.join(package.split('.')[:len(package.split('.')) - n.level + 1] + ([base] if base else []))
                targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in n.names]
            else:
                continue
            found |= {t for t in targets if t in known and t != name}
    return found


def all_imports(path):
    """Every module of ours that `path` names in an import statement, in functions too."""
    found = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and not n.level:
            found |= {n.module} | {f'{n.module}.{a.name}' for a in n.names}
    return found


def test_library_and_data_never_import_the_command_line_or_the_lab():
    modules = our_modules()
    upward = []
    for name, path in modules.items():
        core = name.startswith('detr_irpe.') and not name.startswith(('detr_irpe.cli', 'detr_irpe.lab'))
        data = name.startswith('detr_irpe_datasets')
        for target in all_imports(path):
            if (core or data) and target.startswith(('detr_irpe.cli', 'detr_irpe.lab')):
                upward.append(f'{name} imports {target}')
    assert not upward, upward


def test_no_module_imports_itself_through_others():
    modules = our_modules()
    edges = {name: top_level_imports(path, name, modules) for name, path in modules.items()}
    cycles = []

    def visit(name, stack):
        for target in edges[name]:
            if target in stack:
                cycles.append(' -> '.join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack + [target])
        done.add(name)

    done = set()
    for name in edges:
        if name not in done:
            visit(name, [name])
    assert not cycles, cycles


def test_tools_are_entry_points_over_the_cli_package():
    for path in glob.glob(os.path.join(ROOT, 'tools', '*.py')):
        tool = os.path.basename(path)[:-3]
        code = [line for line in open(path).read().splitlines() if line and not line.startswith('#')]
        assert f'from detr_irpe.cli.{tool} import main' in code and code[-1] == 'main()', path
        assert len(open(path).read().splitlines()) <= 5 and 'sys.path' not in open(path).read(), path


def test_the_data_folder_is_never_found_as_an_installed_datasets_package(tmp_path):
    """With the checkout first on the path (python -c from its root) and a regular package `datasets` installed
    after it, `import datasets` gets the installed one: datasets/ has no __init__.py, and a namespace portion
    gives way to a regular package wherever that stands on the path. Ours is detr_irpe_datasets."""
    installed = tmp_path / 'site' / 'datasets'
    installed.mkdir(parents=True)
    (installed / '__init__.py').write_text("WHO = 'installed'\n")
    code = ('import sys, datasets, detr_irpe_datasets\n'
            'print(sys.path[0] == "", datasets.WHO, list(detr_irpe_datasets.__path__)[0])')
    env = {**os.environ, 'PYTHONPATH': str(tmp_path / 'site')}
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['True', 'installed', os.path.join(ROOT, 'datasets')]
    assert not os.path.exists(os.path.join(ROOT, 'datasets', '__init__.py'))
