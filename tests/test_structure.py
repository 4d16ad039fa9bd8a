"""The package's shape: no import cycles (imports inside functions included), and no function or
file past its length budget except the few listed below, a list that may only shrink."""

import ast
import pathlib
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "paratrain"

FUNCTION_LINES = 80  # from the `def` line to the last line of the body
FILE_LINES = 520
# Over the budget today, with their length now: an entry may shrink or go, never grow, and nothing joins.
LONG_FUNCTIONS: dict[str, int] = {}
LONG_FILES: dict[str, int] = {}


def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module and package of paratrain/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported_names(node: ast.AST, package: str, known: dict) -> list[str]:
    """The paratrain modules one import statement (or importlib.import_module("...") call) names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, pathlib.Path]]:
    """module -> {imported paratrain module: line}, over module-level and function-level imports.
    An import counts for the module it names; the packages above it, which Python runs first, do not
    (the root package re-exports the Trainer, so every module would lie on a cycle through it)."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph.setdefault(mod, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported_names(node, package, known):
                while name and name not in known:  # `from m import function`: the module m
                    name = name.rpartition(".")[0]
                if name.startswith("paratrain") and name != mod:
                    edges[name] = min(edges.get(name, node.lineno), node.lineno)
    return graph, known


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search: empty exactly when the graph has no cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, {})):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return cycles


def test_import_graph_sees_imports_inside_functions():
    graph, _ = import_graph()
    assert "paratrain.layout" in graph["paratrain.planner.cost"]  # module level
    assert "paratrain.sources" in graph["paratrain.config"]  # inside validate's data check
    assert "paratrain.planner.calibrate" in graph["paratrain.planner.search"]  # inside run_plan


def test_no_import_cycles():
    graph, files = import_graph()

    def edge(a: str, b: str) -> str:
        return f"{a} ({files[a].relative_to(ROOT)}:{graph[a][b]})"
    cycles = [" -> ".join(edge(a, b) for a, b in zip(c, c[1:])) + f" -> {c[-1]}" for c in find_cycles(graph)]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def lengths() -> tuple[dict[str, int], dict[str, int]]:
    """'path:Class.method' -> lines of every function (nested ones too), and 'path' -> lines of every file."""
    functions, files = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        source = path.read_text()
        files[rel] = len(source.splitlines())

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if not isinstance(child, ast.ClassDef):
                        functions[f"{rel}:{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
                    walk(child, f"{prefix}{child.name}.")
                else:
                    walk(child, prefix)
        walk(ast.parse(source, rel), "")
    return functions, files


def _over_budget(kind: str, found: dict[str, int], limit: int, allowed: dict[str, int]) -> list[str]:
    problems = []
    for name, n in sorted(found.items()):
        if n > limit and name not in allowed:
            problems.append(f"{kind} {name}: {n} lines, over {limit}; split it")
        elif name in allowed and n > allowed[name]:
            problems.append(f"{kind} {name}: {n} lines, more than the {allowed[name]} it is allowed; split it")
    stale = [name for name in allowed if found.get(name, 0) <= limit]
    if stale:
        warnings.warn(f"within the budget now, remove from the allow-list: {', '.join(stale)}")
    return problems


def test_functions_and_files_stay_short():
    functions, files = lengths()
    problems = (_over_budget("function", functions, FUNCTION_LINES, LONG_FUNCTIONS)
                + _over_budget("file", files, FILE_LINES, LONG_FILES))
    assert not problems, "\n".join(problems)
