"""compress.measure sits below the trainer and the quantizers: it must not import them (not even lazily)."""
import ast
from pathlib import Path

import compress

PKG = Path(compress.__file__).parent


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_measure_and_runtime_import_neither_trainer_nor_quant():
    files = sorted((PKG / "measure").glob("*.py")) + sorted((PKG / "runtime").glob("*.py")) + [PKG / "evaluation.py"]
    assert len(files) > 8
    for f in files:
        bad = {m for m in _imports(f) if m.startswith(("compress.trainer", "compress.quant", "compress.stages"))}
        assert not bad, f"{f.relative_to(PKG)} imports {bad}"
