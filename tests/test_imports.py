"""The import graph of src/loramix: no circle, counting every import statement (under TYPE_CHECKING and inside
functions too), and no import inside a function but the command line's (each command loads its modules) and the
optional extras' (inside `requires`). An import of a.b.c is an arrow to a.b.c: the package __init__ files that
Python runs first only gather their submodules' names."""

import ast
import subprocess
import sys
from pathlib import Path

import loramix

PACKAGE = Path(loramix.__file__).parent
LAZY_IMPORTS = {"loramix.cli"}  # modules whose functions may import loramix modules: the commands


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The loramix modules an import statement of `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = ".".join(part for part in (package if node.level else "", node.module or "") if part)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in MODULES:  # `import loramix.data.base.X`: the module that holds X
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each loramix module -> the loramix modules it imports anywhere in its file."""
    graph = {}
    for module, path in MODULES.items():
        statements = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[module] = set().union(*(targets(node, module) for node in statements))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of the graph as the path that closes it (first == last), or None."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if (cycle := visit(node)) is not None:
            return cycle
    return None


def local_imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement inside a function, and whether it lies in a `with requires(...)` block."""
    found = []

    def visit(node: ast.AST, in_function: bool, in_requires: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and in_function:
            found.append((node, in_requires))
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.With):
            calls = [item.context_expr for item in node.items if isinstance(item.context_expr, ast.Call)]
            in_requires = in_requires or any(getattr(call.func, "id", None) == "requires" for call in calls)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function, in_requires)

    visit(tree, False, False)
    return found


def test_the_package_has_no_import_circle():
    assert len(MODULES) > 50 and "loramix.targets" in import_graph()["loramix.methods.alora"]
    cycle = find_cycle(import_graph())
    assert cycle is None, f"an import circle: {' -> '.join(cycle)}"


def test_a_circle_is_found_however_its_arrows_are_written():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("if TYPE_CHECKING:\n    from loramix.config import MixLoraConfig\nfrom . import base")
    statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found = set().union(*(targets(node, "loramix.routing.task") for node in statements))
    assert found == {"loramix.config", "loramix.routing.base"}


def test_modules_import_loramix_at_their_top():
    misplaced = [
        f"{module}:{node.lineno}"
        for module, path in MODULES.items()
        if module not in LAZY_IMPORTS
        for node, in_requires in local_imports(ast.parse(path.read_text()))
        if not in_requires and any(name.startswith("loramix") for name in _imported_names(node))
    ]
    assert misplaced == []


def _imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or "loramix"]


def test_loramix_eval_does_not_import_the_training_module(tmp_path):
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loramix.cli import app\n"
        "result = CliRunner().invoke(app, ['eval', '--run', sys.argv[1]])\n"
        "assert 'is missing' in result.output, result.output\n"
        "print(sorted(name for name in sys.modules if name.startswith('loramix.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    loaded = result.stdout
    assert "'loramix.evaluate'" in loaded and "'loramix.train'" not in loaded
