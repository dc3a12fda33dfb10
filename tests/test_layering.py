"""The package layers of lib/lowbit (docs/ARCHITECTURE.md), read with `ast`:

  0 core  <-  1 nn, infrastructure  <-  2 papers  <-  3 experiments  <-  top (reproduce, lowbit/__init__)

Every import counts, at module or function level, absolute or relative. A module may import only
its own layer or below; infrastructure modules never import nn or a paper package; a paper package
never imports another except along a declared edge (PAPER_EDGES: alq -> lsq); the import graph has
no cycle. And lib/lowbit holds no duplicated block of
code (6 or more consecutive code lines appearing twice).
"""
import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
ROOT = LIB.parent
INFRASTRUCTURE = {"paths", "results", "utils", "processes", "profiles", "plotting", "data", "imagenet", "models", "evaluate",
                  "train"}
PAPERS = {"sq", "qrater", "lsq", "alq", "peers"}
# the declared paper-to-paper edges (docs/ARCHITECTURE.md): ALQ's fine-tuning is QAT with LSQ activations
# on lsq's machinery (prepare_qat, train_qat)
PAPER_EDGES = {("alq", "lsq")}
# experiments-layer packages that read several papers (notebook 08): they may import every paper package
CROSS_PAPER = {"compare"}
TOP = {"lowbit", "lowbit.reproduce"}
LAYER_NAMES = {0: "core", 1: "nn/infrastructure", 2: "paper", 3: "experiments", 4: "top"}
MIN_BLOCK = 6  # consecutive code lines that may not appear twice


def _modules() -> dict:
    """``{dotted module name: path}`` of every module of lib/lowbit (packages by their __init__)."""
    found = {}
    for path in sorted((LIB / "lowbit").rglob("*.py")):
        parts = list(path.relative_to(LIB).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer(module: str) -> int:
    """The layer of a lowbit module (ValueError for one no layer is defined for)."""
    if module in TOP:
        return 4
    parts = module.split(".")
    head = parts[1]
    if head == "core":
        return 0
    if head == "nn" or (head in INFRASTRUCTURE and len(parts) == 2):
        return 1
    if head in CROSS_PAPER:
        return 3
    if head in PAPERS:
        return 3 if any(p.startswith("experiments") for p in parts[2:]) else 2
    raise ValueError(f"{module} is in no layer: put it under core/, nn/ or a paper package, or add it to "
                     "INFRASTRUCTURE in tests/test_layering.py (and docs/ARCHITECTURE.md)")


def _resolve(name: str) -> str | None:
    """The lowbit module that importing ``name`` loads (the longest existing prefix)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """``[(imported lowbit module, line, at function level?)]`` of every import statement in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` loads the submodule pkg.sub when there is one, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            target = _resolve(name) if name.split(".")[0] == "lowbit" else None
            edge = (target, node.lineno, id(node) in nested)
            if target is not None and target != module and edge not in found:
                found.append(edge)
    return found


def _graph() -> dict:
    return {m: imports(m) for m in MODULES}


def _where(module, line, nested):
    rel = MODULES[module].relative_to(ROOT)
    return f"{rel}:{line}{' (function-level)' if nested else ''}"


def violations(graph: dict) -> list[str]:
    """Every import that breaks a layering rule, as ``a (layer) -> b (layer) at file:line: why``."""
    bad = []
    for src, edges in graph.items():
        for dst, line, nested in edges:
            ls, ld = layer(src), layer(dst)
            s_head, d_head = src.split(".")[1:2], dst.split(".")[1:2]
            why = None
            if ld > ls:
                why = "imports a higher layer"
            elif ls == 1 and s_head[0] in INFRASTRUCTURE and (d_head == ["nn"] or (d_head and d_head[0] in PAPERS)):
                why = "infrastructure imports nn or a paper package"
            elif ls >= 2 and ls < 4 and d_head and d_head[0] in PAPERS and d_head != s_head \
                    and s_head[0] not in CROSS_PAPER and (s_head[0], d_head[0]) not in PAPER_EDGES:
                why = "a paper package imports another paper package"
            if why:
                bad.append(f"{src} ({LAYER_NAMES[ls]}) -> {dst} ({LAYER_NAMES[ld]}) at "
                           f"{_where(src, line, nested)}: {why}")
    return sorted(bad)


def cycles(graph: dict) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    succ = {m: sorted({d for d, _, _ in edges}) for m, edges in graph.items()}
    index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    found = []
    for comp in comps:  # a shortest path back to the start, inside the component
        start = min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in succ[v]]:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in succ[v])
        path = [start]
        while last is not None and last != start:
            path.insert(1, last)
            last = prev[last]
        found.append(path + [start])
    return found


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    unknown = []
    for m in MODULES:
        try:
            layer(m)
        except ValueError as err:
            unknown.append(str(err))
    assert not unknown, "\n".join(unknown)


def test_imports_respect_the_layers():
    bad = violations(_graph())
    assert not bad, "imports that break the layering:\n  " + "\n  ".join(bad)


def test_import_graph_has_no_cycle():
    graph = _graph()
    found = cycles(graph)
    lines = []
    for cyc in found:
        steps = []
        for a, b in zip(cyc, cyc[1:]):
            line, nested = next((ln, n) for d, ln, n in graph[a] if d == b)
            steps.append(f"{a} -> {b} ({_where(a, line, nested)})")
        lines.append("; ".join(steps))
    assert not found, "import cycles:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------- the checker checks what it claims
@pytest.fixture
def fake_lib(tmp_path):
    """Point the checker at a throw-away lib/ built from ``{relative path: source}``."""
    saved = LIB, ROOT, MODULES

    def build(files: dict):
        for rel, text in files.items():
            p = tmp_path / "lib" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        globals()["LIB"], globals()["ROOT"] = tmp_path / "lib", tmp_path
        globals()["MODULES"] = _modules()

    yield build
    globals()["LIB"], globals()["ROOT"], globals()["MODULES"] = saved


def test_checker_finds_upward_cross_paper_and_function_level_imports(fake_lib):
    fake_lib({
        "lowbit/__init__.py": "import importlib\n",
        "lowbit/core/__init__.py": "",
        "lowbit/core/points.py": "def f():\n    from ..nn import graph\n",  # function-level, upward
        "lowbit/nn/__init__.py": "", "lowbit/nn/graph.py": "from lowbit.core import points\n",
        "lowbit/models.py": "from .nn.graph import x\n",  # infrastructure -> nn
        "lowbit/sq/__init__.py": "", "lowbit/sq/search.py": "from ..qrater import rounding\n",
        "lowbit/sq/experiments.py": "from . import search\nfrom lowbit import models\n",
        "lowbit/qrater/__init__.py": "", "lowbit/qrater/rounding.py": "import lowbit.sq.experiments\n",
    })
    bad = violations(_graph())
    assert any(b.startswith("lowbit.core.points (core) -> lowbit.nn.graph") and "function-level" in b for b in bad)
    assert any(b.startswith("lowbit.models (nn/infrastructure) -> lowbit.nn.graph") for b in bad)
    assert any(b.startswith("lowbit.sq.search (paper) -> lowbit.qrater.rounding") for b in bad)
    assert any(b.startswith("lowbit.qrater.rounding (paper) -> lowbit.sq.experiments (experiments)") for b in bad)
    assert not any(b.startswith("lowbit.sq.experiments ") for b in bad)  # experiments may import its paper
    assert not any(b.startswith("lowbit.nn.graph ") for b in bad)
    assert sorted(cycles(_graph())) == [["lowbit.core.points", "lowbit.nn.graph", "lowbit.core.points"],
                                        ["lowbit.qrater.rounding", "lowbit.sq.experiments", "lowbit.sq.search",
                                         "lowbit.qrater.rounding"]]


# ---------------------------------------------------------------------------- duplicated code
def _code_lines(path: Path) -> list[tuple[int, str]]:
    """``[(line number, whitespace-normalised text)]`` of the non-blank, non-comment, non-import lines."""
    text = path.read_text()
    skip = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        norm = " ".join(line.split())
        if norm and not norm.startswith("#") and i not in skip:
            out.append((i, norm))
    return out


def duplicated_blocks(paths, size: int = MIN_BLOCK) -> list[str]:
    """Runs of ``size`` or more code lines that occur at two places, as ``file:a-b == file:c-d``."""
    lines = {p: _code_lines(p) for p in paths}
    seen = defaultdict(list)
    for p, ls in lines.items():
        for k in range(len(ls) - size + 1):
            seen[tuple(t for _, t in ls[k:k + size])].append((p, k))
    pairs = set()
    for places in seen.values():
        for a in range(len(places)):
            for b in range(a + 1, len(places)):
                (pa, ka), (pb, kb) = places[a], places[b]
                if pa != pb or abs(ka - kb) >= size:
                    pairs.add((pa, ka, pb, kb))
    reported = []
    for pa, ka, pb, kb in sorted(pairs, key=lambda t: (str(t[0]), t[1], str(t[2]), t[3])):
        if (pa, ka - 1, pb, kb - 1) in pairs:
            continue  # inside a longer run already reported from its start
        n = size
        while (pa, ka + n - size + 1, pb, kb + n - size + 1) in pairs:
            n += 1
        la, lb = lines[pa], lines[pb]
        reported.append(f"{pa.relative_to(ROOT)}:{la[ka][0]}-{la[ka + n - 1][0]} == "
                        f"{pb.relative_to(ROOT)}:{lb[kb][0]}-{lb[kb + n - 1][0]} ({n} lines)")
    return reported


def test_no_duplicated_code_in_lib():
    found = duplicated_blocks(sorted(MODULES.values()))
    assert not found, "duplicated blocks (move them to one home):\n  " + "\n  ".join(found)


def test_duplicate_finder_finds_a_copied_block_only(tmp_path):
    block = "\n".join(f"    total = total + {i} * x" for i in range(6))
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text(f"import os\n\ndef f(x):\n    total = 0\n{block}\n    return total\n")
    b.write_text(f"from os import path\n\n\ndef g(x):\n    # a copy\n    if x:\n{block.replace('    ', '        ')}\n")
    c.write_text("def h(x):\n" + "\n".join(f"    total = total + {i} * x" for i in range(5)) + "\n")  # 5: allowed
    globals()["ROOT"], saved = tmp_path, ROOT
    try:
        found = duplicated_blocks([a, b, c])
    finally:
        globals()["ROOT"] = saved
    assert found == ["a.py:5-10 == b.py:7-12 (6 lines)"]


# ---------------------------------------------------------------------------- self-contained
def test_repository_points_nowhere_outside_itself():
    """No docs, code or notebook sends readers outside the repository or cites a paper by a data file name."""
    outside = re.compile(r"\.\./shared|\"(input|output)_path\": \"/|/work/|/home/|/Users/|\b\d{3}_[0-9a-f]{16}\.txt\b")
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "lib").rglob("*.py")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, "references outside the repository:\n  " + "\n  ".join(hits)
