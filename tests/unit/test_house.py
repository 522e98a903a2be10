"""The code's shape, checked: small rooms, short functions, one-way imports (method and data below,
tracking and launchers above), submitit behind the launcher module. The numbers are the house rules
of issue #36; a change that breaks one says where."""
import ast
from pathlib import Path

from conftest import ROOT

PIPELINE = ROOT / "pipeline"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PIPELINE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of the file, module-level or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def test_no_module_over_500_lines_and_no_function_over_80():
    long_modules = {str(p.relative_to(ROOT)): n for p in _modules().values()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long_functions = []
    for p in _modules().values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long_functions, long_functions


def test_no_import_circle_module_level_or_function_local():
    mods = _modules()
    graph = {name: {m for m, _ in _imports(name, p) if m in mods and m != name} for name, p in mods.items()}
    # a package's __init__ importing its own rooms is not a circle back from those rooms
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and mods[m].name == "__init__.py")}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):                                        # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_mathematics_imports_nothing_above_it_and_only_the_launchers_import_submitit():
    mods = _modules()
    for low in ("pipeline.phema", "pipeline.edm", "pipeline.networks", "pipeline.stats"):
        above = [m for m, _ in _imports(low, mods[low]) if m.startswith(("pipeline.tracking", "pipeline.sweep",
                                                                          "pipeline.launch", "pipeline.report"))]
        assert not above, f"{low} imports {above}"
    users = sorted({name for name, p in mods.items() for m, _ in _imports(name, p) if m.split(".")[0] == "submitit"})
    assert users == ["pipeline.launchers"], users
    everywhere = [p for d in ("stages", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")
                  if "import submitit" in p.read_text() or "from submitit" in p.read_text()]
    assert not everywhere, everywhere
