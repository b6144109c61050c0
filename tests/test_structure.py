"""The package's shape: no import cycles, every module named in the package map, explicit constructors."""

import ast
import inspect
import pathlib

import keras_vit

PACKAGE_DIR = pathlib.Path(keras_vit.__file__).parent


def _module_name(path):
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: modules of keras_vit it imports}, imports inside functions included.

    `from keras_vit.x import y` and `import keras_vit.x` are edges to keras_vit.x
    (or to keras_vit.x.y when that is a module); `import keras_vit` and
    `from keras_vit import name` (not a module) are edges to the package itself.
    """
    paths = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in paths and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert "keras_vit.npz" in graph and "keras_vit.training.loop" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_sees_a_lazy_import():
    # The check above must be able to fail: a lazy import back into the package is a cycle.
    graph = import_graph()
    graph["keras_vit.registry"] = graph["keras_vit.registry"] | {"keras_vit.models"}
    assert find_cycle(graph) is not None


def test_every_module_has_a_line_in_the_package_map():
    modules = {name.split(".")[1] for name in import_graph() if name.count(".") >= 1}
    documented = {line.split()[0] for line in keras_vit.__doc__.splitlines() if line.startswith("    ") and line.split()}
    assert modules - {"__main__", "testing"} <= documented, modules - documented


def test_constructors_are_explicit_functions():
    for name, constructor in keras_vit.CONSTRUCTORS.items():
        assert f"def {name}(" in inspect.getsource(constructor), name
        assert getattr(keras_vit, name) is constructor
        assert "include_top" in inspect.signature(constructor).parameters
        assert constructor.__doc__.startswith("Builds "), name


def test_setup_cfg_ships_every_subpackage():
    # An editable install finds every folder; a wheel holds only the packages setup.cfg lists.
    import configparser

    config = configparser.ConfigParser()
    config.read(PACKAGE_DIR.parent / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    packages = {_module_name(init) for init in PACKAGE_DIR.rglob("__init__.py")}
    assert packages <= listed, packages - listed


def test_constructors_follow_the_keras_free_table():
    from keras_vit import variants

    assert list(keras_vit.CONSTRUCTORS) == list(variants.CONSTRUCTOR_VARIANTS)
    for name, constructor in keras_vit.CONSTRUCTORS.items():
        assert constructor.variant == variants.CONSTRUCTOR_VARIANTS[name]
        assert constructor.config == variants.variant_config(constructor.variant)


def test_layers_register_when_keras_comes_in_through_a_keras_vit_module():
    """`from keras_vit import views` imports Keras half-way through its own
    import: the modules registering serializables (which import views) are
    imported once it is done, not before (that would fail), nor never."""
    import subprocess
    import sys

    code = (
        "import sys, keras_vit\n"
        "from keras_vit import views\n"
        "import keras\n"
        "missing = [m for m in keras_vit._REGISTERING if m not in sys.modules]\n"
        "assert not missing, missing\n"
        "for name in ('PatchEncoder', 'ResNetStem', 'MaskedPatchPrediction', 'WarmupDecay'):\n"
        "    assert keras.saving.get_registered_object('keras_vit>' + name) is not None, name\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               cwd=PACKAGE_DIR.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
