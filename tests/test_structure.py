"""The package's shape: no import cycles (function-level imports count: a lazy import that closes a
cycle still ties the two modules together), and no module past the size where it should be split."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vlretrieval")
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """Package modules `path` imports, anywhere in the file. `from a import b` counts as a.b where
    that is a module, else as a; a package's own __init__ is not counted for its submodules."""
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in modules else node.module)
    return {target for target in targets if target in modules}


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_evaluation_and_conversion_do_not_import_the_trainer():
    graph = _import_graph()
    for name, targets in graph.items():
        if name.startswith(("vlretrieval.evaluation", "vlretrieval.convert")):
            assert "vlretrieval.train" not in targets, name


def test_no_module_is_past_the_size_where_it_should_be_split():
    long = {name: n for name, path in _modules().items()
            if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert not long, long
