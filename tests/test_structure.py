"""The package's structure as tested properties: no import cycles among zt_gguf's modules, no function longer
than MAX_FUNCTION_LINES lines without a comment saying why, only engine.py touches the compiled module, and
no test imports a benchmark script.

Every check is a function of files or source text, run once on the real tree and once on a small synthetic
example that breaks it (so that each check is shown to fail when it should).
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "python" / "zt_gguf"
TESTS_DIR = REPO / "tests"
BENCH_DIR = REPO / "benchmarks"

MAX_FUNCTION_LINES = 80
LONG_MARK = "long because"  # a comment with it lets a function be longer (and says why)
CORE = "_core"  # the compiled module: only ENGINE imports it
ENGINE = "engine"
# the smoke tests of the benchmark scripts themselves (they import zt_reference, bench_engine, ...)
BENCH_TESTS = frozenset({"test_bench_smoke.py"})

Graph = Mapping[str, set[str]]


# --- the checks -----------------------------------------------------------------------------------------


def package_modules(pkg_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under pkg_dir (a package __init__.py is the package)."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = path.relative_to(pkg_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (module level, in functions and classes), not those under
    ``if TYPE_CHECKING:`` (annotations only: no import happens, so no cycle at run time)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path) -> set[str]:
    """The dotted names a module's imports refer to, absolute: ``from .a import b`` in package p gives p.a.b
    (a module, or the name b of module p.a), ``from . import x`` gives p.x, ``import p.a`` gives p.a."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            where = ".".join(base + ([node.module] if node.module else []))
        else:
            where = node.module or ""
        out.update(f"{where}.{alias.name}" for alias in node.names)
    return out


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: each imported name resolved to the longest module that is
    a prefix of it (p.a.b: the module p.a.b, else the module p.a that defines b)."""
    modules = package_modules(pkg_dir)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            hit = next((p for p in prefixes if p in modules), None)
            if hit is not None and hit != module:
                targets.add(hit)
        graph[module] = targets
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (a list of modules, each importing the next, the last the first) per strongly connected
    component with more than one module or a self-import (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A cycle through the first module of a strongly connected component (breadth-first: a shortest one)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if child in component and child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in {sorted(component)}")  # a strongly connected component has one


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function or method longer than limit lines (the def line
    to the last line, decorators not counted) with no comment containing LONG_MARK in it."""
    tree = ast.parse(source)
    marked = {
        tok.start[0]
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and LONG_MARK in tok.string
    }
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                end = child.end_lineno or child.lineno
                n = end - child.lineno + 1
                if n > limit and not any(child.lineno <= line <= end for line in marked):
                    out.append((name, child.lineno, n))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def core_importers(pkg_dir: Path) -> set[str]:
    """The package's modules (other than ENGINE) that import the compiled module CORE."""
    root = pkg_dir.name
    core = f"{root}.{CORE}"
    out = set()
    for module, path in package_modules(pkg_dir).items():
        names = imported_names(module, path)
        if module != f"{root}.{ENGINE}" and any(n == core or n.startswith(core + ".") for n in names):
            out.add(module)
    return out


def benchmark_imports(source: str, bench_modules: set[str]) -> list[str]:
    """The imports of a test's source that load a benchmark script (a module of benchmarks/ by its name, or
    the benchmarks folder as a package)."""
    out = []
    for node in _runtime_imports(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if isinstance(node, ast.ImportFrom) and node.level:
            continue  # relative: within tests/
        out += [n for n in names if n.split(".")[0] in bench_modules | {"benchmarks"}]
    return out


# --- on the real tree -----------------------------------------------------------------------------------


def test_no_import_cycles_in_the_package() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert "zt_gguf.engine" in graph and "zt_gguf.cli" in graph  # the parser found the package
    assert "zt_gguf.engine" in graph["zt_gguf.cli"] or any("zt_gguf.engine" in t for t in graph.values())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_no_long_functions_in_the_package() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {name} ({n} lines)"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for name, line, n in long_functions(path.read_text())
    ]
    assert not found, (
        f"functions longer than {MAX_FUNCTION_LINES} lines without a '# {LONG_MARK} ...' comment:\n"
        + "\n".join(found)
    )


def test_only_the_engine_imports_the_compiled_module() -> None:
    engine_path = PACKAGE_DIR / f"{ENGINE}.py"
    assert f"zt_gguf.{CORE}" in imported_names(f"zt_gguf.{ENGINE}", engine_path)  # the check sees the import
    assert core_importers(PACKAGE_DIR) == set()


def test_no_test_imports_a_benchmark() -> None:
    bench = {p.stem for p in BENCH_DIR.glob("*.py")}
    assert "bench_load" in bench
    found = {
        p.name: names
        for p in sorted(TESTS_DIR.glob("*.py"))
        if p.name not in BENCH_TESTS and (names := benchmark_imports(p.read_text(), bench))
    }
    assert not found, f"tests importing benchmarks/ (use zt_gguf.testing): {found}"


# --- each check on a synthetic example that breaks it -------------------------------------------------


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / next(iter(files)).split("/")[0]


def test_find_cycles_on_fake_graphs() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    # two separate cycles; the shortest through the first module of each
    got = find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"b"}, "x": {"y"}, "y": {"x"}})
    assert sorted(got) == [["a", "b"], ["x", "y"]]


def test_import_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A cycle through a module-level ``from . import``, a function-level relative import into a
    subpackage and an absolute import; a name of a package is an edge to it; an import under TYPE_CHECKING
    is no edge."""
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "VERSION = '1'\n",
            "pkg/a.py": "from . import b, VERSION\n",
            "pkg/b.py": "def f():\n    from .sub import c\n    return c\n",
            "pkg/sub/__init__.py": "from .c import X\n",
            "pkg/sub/c.py": "import pkg.a\nX = 1\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import b\n",
        },
    )
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg", "pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.d": set(),
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},
    }
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_long_functions_on_synthetic_source() -> None:
    def func(name: str, n: int, comment: str = "", indent: str = "") -> str:
        body = [f"{indent}    x = {i}" for i in range(n - 2)]
        if comment:
            body[0] += f"  # {comment}"
        return "\n".join([f"{indent}def {name}():", *body, f"{indent}    return x"]) + "\n"

    assert long_functions(func("ok", 80)) == []
    assert long_functions(func("too_long", 81)) == [("too_long", 1, 81)]
    assert long_functions(func("explained", 120, "long because: one table, row by row")) == []
    assert long_functions(func("other_comment", 81, "long, but no reason")) == [("other_comment", 1, 81)]
    source = "class C:\n" + func("method", 90, indent="    ")
    assert long_functions(source) == [("C.method", 2, 90)]


def test_core_importers_on_a_synthetic_package(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            f"pkg/{ENGINE}.py": f"from . import {CORE}\n",
            "pkg/direct.py": f"def f():\n    from .{CORE} import thing\n",
            "pkg/absolute.py": f"import pkg.{CORE}\n",
            "pkg/clean.py": f"from .{ENGINE} import Model\n",
        },
    )
    assert core_importers(pkg) == {"pkg.direct", "pkg.absolute"}


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import bench_load\n", ["bench_load"]),
        ("def f():\n    from bench_load import Server\n", ["bench_load"]),
        ("import benchmarks.bench_load as b\n", ["benchmarks.bench_load"]),
        ("from zt_gguf.testing import start_server\nimport json\n", []),
        ("from . import bench_load\n", []),
    ],
)
def test_benchmark_imports_on_synthetic_tests(source: str, found: list[str]) -> None:
    assert benchmark_imports(source, {"bench_load", "_common"}) == found
