"""The package's modules import downward only: the graph of gpfq's imports (at any depth of a module,
function-level imports included) has no circle, and every import goes to the same layer or one below it
(docs/design.md): the foundations (errors, paths, threads) < methods < pipeline < io < config < api < runner."""
import ast

from gpfq.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "gpfq"


def module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, modules: set) -> set:
    """The gpfq modules `path` imports (`from . import x` counts as gpfq.x when x is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules}


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def find_circle(graph: dict):
    """One circle [a, b, …, a] of the graph, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return None


def test_the_finder_sees_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_gpfq_imports_form_no_circle():
    graph = import_graph()
    assert "gpfq.api" in graph and "gpfq.methods.gpfq.engine" in graph["gpfq.methods.gpfq.variants"]  # the walk sees real edges
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


LAYERS = [("gpfq.errors", "gpfq.paths", "gpfq.threads"), ("gpfq.methods",), ("gpfq.pipeline",), ("gpfq.io",),
          ("gpfq.config",), ("gpfq.api",), ("gpfq.runner",), ("gpfq",)]


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that names `module` or a package above it."""
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for index, names in enumerate(LAYERS):
            if prefix in names:
                return index
    raise KeyError(f"{module} is in no layer of LAYERS: add it where it belongs")


def upward_imports(graph: dict) -> list:
    """(importer, imported) pairs where the imported module sits in a higher layer than the importer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"gpfq.methods.alphabet": {"gpfq.pipeline.network"}}) == [
        ("gpfq.methods.alphabet", "gpfq.pipeline.network")]
    assert upward_imports({"gpfq.pipeline.network": {"gpfq.methods.alphabet", "gpfq.errors"}}) == []


def test_gpfq_imports_go_downward_through_the_layers():
    graph = import_graph()
    assert "gpfq.methods.gpfq.engine" in graph["gpfq.pipeline.network"]  # the walk sees edges across layers
    assert upward_imports(graph) == []
