"""Stage reuse across trials: the models after a recipe prefix, keyed by a hash of that prefix.

Every trial of a search starts from the same teacher training (and often the same distillation): the
prefix ``seed, data, model, teacher, stages[0..k]`` determines the state after stage k (each stage is
seeded on its own), so it runs once and later trials load it. Only in-memory PyTorch models are kept;
caching stops at the first stage that writes a deployable file (export, int8 PTQ).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from compress.checkpoint import load_model, save_model
from compress.rundir import check_inside
from compress.utils import write_json


def prefix_key(doc: dict, k: int) -> str:
    """Hash of what the state after stage ``k`` depends on."""
    part = {key: doc.get(key) for key in ("seed", "data", "model", "teacher")}
    part["stages"] = doc["stages"][:k + 1]
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Folder of ``<key>/{model.pt, teacher.pt, entry.json}``; counts what ran and what reuse saved."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.saved_seconds = 0.0  # compute time the hits would have cost (the prefix's own run time)
        self.ran: Counter = Counter()  # "index:name" -> times that stage actually ran

    def entry(self, doc: dict, k: int) -> Path:
        """The folder of the prefix ending at stage ``k``; a link out of the cache is refused."""
        return check_inside(self.root, self.root / prefix_key(doc, k), "search cache entry")

    def load(self, doc: dict, n_stages: int, state) -> tuple[int, float]:
        """Put the longest cached prefix's models into ``state``; return how many stages it covers and
        the seconds they took to compute."""
        for k in reversed(range(n_stages)):
            d = self.entry(doc, k)
            entry = d / "entry.json"
            if not entry.is_file():
                continue
            for name in ("entry.json", "model.pt", "teacher.pt"):  # the files read, not only their folder
                check_inside(self.root, d / name, "search cache file")
            try:
                seconds = float(json.loads(entry.read_text())["seconds"])
                model = load_model(d / "model.pt")
                teacher = load_model(d / "teacher.pt") if (d / "teacher.pt").is_file() else None
            except Exception:  # a cache entry cut short by a kill (or not written by compress): run the prefix again
                continue
            state.model = model
            if teacher is not None:
                state.teacher = teacher
            self.hits += 1
            self.saved_seconds += seconds
            return k + 1, seconds
        return 0, 0.0

    def put(self, doc: dict, k: int, state, seconds: float) -> None:
        d = self.entry(doc, k)
        d.mkdir(parents=True, exist_ok=True)
        save_model(state.model, d / "model.pt")
        if state.teacher is not None:
            save_model(state.teacher, d / "teacher.pt")
        write_json(d / "entry.json", {"stages": k + 1, "seconds": round(seconds, 3), "written": time.time()})

    def stats(self) -> dict:
        return {"hits": self.hits, "saved_seconds": round(self.saved_seconds, 1), "stage_runs": dict(self.ran)}


def run_cached(doc: dict, run_dir: Path, cache: Optional[StageCache]):
    """Run a recipe document's stages in memory (files under ``run_dir``), reusing cached prefixes.

    Returns ``(state, last StageResult or None when every stage came from the cache)``.
    """
    from compress.pipeline import apply, build_state, run_stage
    from compress.recipe import parse_recipe

    recipe = parse_recipe(doc)
    state = build_state(recipe)
    state.run_dir = Path(run_dir)
    start, spent = cache.load(doc, len(recipe.stages), state) if cache else (0, 0.0)
    caching, result = cache is not None, None
    for spec in recipe.stages[start:]:
        t0 = time.time()
        result = run_stage(state, spec)
        apply(state, result)
        spent += time.time() - t0
        if cache is not None:
            cache.ran[f"{spec.index}:{spec.name}"] += 1
        caching = caching and result.artifact is None
        if caching:
            cache.put(doc, spec.index, state, spent)
    return state, result
