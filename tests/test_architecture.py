"""The house rules, checked on the source: layer boundaries, no import cycles (imports inside
functions included), and short functions.  Read with `ast`, so nothing is imported or run."""
import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = (("valor_fast", "valor_fast"), ("kernels", "valor_fast.kernels"))
MAX_FUNCTION_LINES = 80


def _modules() -> Dict[str, str]:
    mods = {}
    for folder, pkg in PACKAGES:
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                    if rel == "__init__":
                        name = pkg
                    else:
                        name = pkg + "." + (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
                    mods[name] = os.path.join(dirpath, f)
    return mods


MODULES = _modules()


def _targets(cur: str, node) -> List[str]:
    """Project modules an import statement names (a `from x import y` names x and x.y)."""
    is_pkg = MODULES[cur].endswith("__init__.py")
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            parts = cur.split(".") if is_pkg else cur.split(".")[:-1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts) + ("." + node.module if node.module else "")
        else:
            base = node.module or ""
        names = [base] + [base + "." + a.name for a in node.names]
    return [n for n in names if n in MODULES and n != cur]


def _graph() -> Dict[str, Set[str]]:
    g = {}
    for m, path in MODULES.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        g[m] = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for t in _targets(m, n)}
    return g


GRAPH = _graph()


def _is_ancestor_package(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_cycles():
    """Strongly connected components of the import graph, every import statement counted
    (top level or inside a function).  A package's __init__ importing its own submodules is the
    one edge allowed to point down; a submodule importing its package back is a cycle."""
    edges = {m: {t for t in ts if not _is_ancestor_package(m, t)} for m, ts in GRAPH.items()}
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not comps, f"import cycles: {comps}"


def _imports_under(prefix: str) -> Dict[str, Set[str]]:
    return {m: ts for m, ts in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def test_kernels_import_nothing_from_valor_fast():
    bad = {m: sorted(t for t in ts if not t.startswith("valor_fast.kernels"))
           for m, ts in _imports_under("valor_fast.kernels").items()}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"kernels/ must import nothing from valor_fast outside valor_fast.kernels: {bad}"


def test_model_and_ops_never_import_train_or_data():
    forbidden = ("valor_fast.train", "valor_fast.data", "valor_fast.tasks", "valor_fast.eval", "valor_fast.cli")
    bad = {}
    for layer in ("valor_fast.model", "valor_fast.ops"):
        for m, ts in _imports_under(layer).items():
            hit = sorted(t for t in ts if t.startswith(forbidden))
            if hit:
                bad[m] = hit
    assert not bad, f"model/ and ops/ are below train/, data/, tasks/ and eval/: {bad}"


def test_lower_layers_never_import_train():
    """data/, tasks/, eval/ and the runtime helpers sit below train/: only cli and train import it."""
    bad = {m: sorted(t for t in ts if t.startswith("valor_fast.train"))
           for m, ts in GRAPH.items()
           if m.startswith(("valor_fast.data", "valor_fast.tasks", "valor_fast.eval", "valor_fast.model",
                            "valor_fast.ops", "valor_fast.infer", "valor_fast.runtime"))}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"train/ is imported only by the cli: {bad}"


def _is_triton_jit(fn) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def test_functions_are_short():
    """No function over 80 lines; @triton.jit bodies are exempt (splitting them costs registers)."""
    long = []
    for m, path in MODULES.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_jit(n):
                lines = n.end_lineno - n.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{os.path.relpath(path, ROOT)}:{n.lineno} {n.name} ({lines} lines)")
    assert not long, "functions over %d lines: %s" % (MAX_FUNCTION_LINES, long)


def test_the_checker_sees_the_package():
    # guards the checks above against passing vacuously (a moved folder, a wrong root)
    assert "valor_fast.model.valor" in MODULES and "valor_fast.kernels.flash_attention" in MODULES
    assert GRAPH["valor_fast.model.valor"], "the import graph is empty"
