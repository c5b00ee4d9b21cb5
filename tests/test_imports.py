"""The package's import graph has no cycle: stages import their contract (``stages.base``), never the
runner; command modules share ``cli_options``, not the group; models bring hooks without the trainer.

Every ``compress`` import counts, at module level or inside a function (a lazy import that dodges a
cycle is still one); only ``if TYPE_CHECKING:`` blocks are left out (they never run).
"""
import ast
from pathlib import Path

import compress

PKG = Path(compress.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        skip = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                for b in i.body for n in ast.walk(b)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("compress"):
                deps |= {owner(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("compress")}
        graph[name] = deps - {name, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_compress():
    assert cycles(import_graph()) == []


def test_measure_does_not_import_the_trainer_or_quantization():
    graph = import_graph()
    measure = {m for m in graph if m == "compress.measure" or m.startswith("compress.measure.")}
    deps = set().union(*(graph[m] for m in measure))
    assert not {d for d in deps if d == "compress.trainer" or d.startswith("compress.quant")}
