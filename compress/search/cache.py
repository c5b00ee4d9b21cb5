"""Stage reuse across trials: the models after a recipe prefix, keyed by a hash of that prefix.

Every trial of a search starts from the same teacher training (and often the same distillation): the
prefix ``seed, data, model, teacher, stages[0..k]`` determines the state after stage k (each stage is
seeded on its own), so it runs once and later trials load it. A prefix that only trains the teacher
(``train: {target: teacher}``) does not depend on the student (``model``): its key leaves it out and only the
teacher is kept, so a search trains one teacher whatever student the trials build. Only in-memory PyTorch
models are kept; caching stops at the first stage that writes a deployable file (export, int8 PTQ).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from compress.checkpoint import load_model, save_model
from compress.rundir import check_inside
from compress.search.config import teacher_only
from compress.utils import write_json


def prefix_key(doc: dict, k: int, low: Optional[tuple[int, float]] = None) -> str:
    """Hash of what the state after stage ``k`` depends on (``low``: the data fraction from a stage on)."""
    stages = doc["stages"][:k + 1]
    keys = ("seed", "data", "teacher") if all(teacher_only(s) for s in stages) else ("seed", "data", "model", "teacher")
    part = {key: doc.get(key) for key in keys}
    part["stages"] = stages
    if low is not None and k >= low[0] and low[1] < 1:
        part["data_fraction"] = low[1]
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_fraction(data, fraction: float, seed: int):
    """``data`` with a seeded ``fraction`` of its training split (low fidelity); val and test untouched."""
    if fraction >= 1 or data.train is None:
        return data
    import torch
    from torch.utils.data import Subset

    n = len(data.train)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, round(n * fraction))]
    return dataclasses.replace(data, train=Subset(data.train, sorted(idx.tolist())))


class StageCache:
    """Folder of ``<key>/{model.pt, teacher.pt, entry.json}``; counts what ran and what reuse saved."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.saved_seconds = 0.0  # compute time the hits would have cost (the prefix's own run time)
        self.ran: Counter = Counter()  # "index:name" -> times that stage actually ran

    def entry(self, doc: dict, k: int, low: Optional[tuple[int, float]] = None) -> Path:
        """The folder of the prefix ending at stage ``k``; a link out of the cache is refused."""
        return check_inside(self.root, self.root / prefix_key(doc, k, low), "search cache entry")

    def load(self, doc: dict, n_stages: int, state, low: Optional[tuple[int, float]] = None) -> tuple[int, float]:
        """Put the longest cached prefix's models into ``state``; return how many stages it covers and
        the seconds they took to compute."""
        for k in reversed(range(n_stages)):
            d = self.entry(doc, k, low)
            entry = d / "entry.json"
            if not entry.is_file():
                continue
            for name in ("entry.json", "model.pt", "teacher.pt"):  # the files read, not only their folder
                check_inside(self.root, d / name, "search cache file")
            try:
                seconds = float(json.loads(entry.read_text())["seconds"])
                model = load_model(d / "model.pt") if (d / "model.pt").is_file() else None
                teacher = load_model(d / "teacher.pt") if (d / "teacher.pt").is_file() else None
            except Exception:  # a cache entry cut short by a kill (or not written by compress): run the prefix again
                continue
            if model is not None:  # none: a teacher-only prefix, the student stays as this trial built it
                state.model = model
            if teacher is not None:
                state.teacher = teacher
            self.hits += 1
            self.saved_seconds += seconds
            return k + 1, seconds
        return 0, 0.0

    def put(self, doc: dict, k: int, state, seconds: float, low: Optional[tuple[int, float]] = None) -> None:
        """Written to a private folder, then renamed into place: a worker of ``--jobs`` never reads half an
        entry (when two workers computed the same prefix, the first rename wins)."""
        d = self.entry(doc, k, low)
        if (d / "entry.json").is_file():
            return
        tmp = check_inside(self.root, self.root / f".{d.name}.{os.getpid()}", "search cache entry")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if not all(teacher_only(s) for s in doc["stages"][:k + 1]):
            save_model(state.model, tmp / "model.pt")
        if state.teacher is not None:
            save_model(state.teacher, tmp / "teacher.pt")
        write_json(tmp / "entry.json", {"stages": k + 1, "seconds": round(seconds, 3), "written": time.time()})
        try:
            os.rename(tmp, d)
        except OSError:  # another worker's entry is there already
            shutil.rmtree(tmp, ignore_errors=True)

    def merge(self, other: dict) -> None:
        """Add another worker's ``stats()``."""
        self.hits += other["hits"]
        self.saved_seconds += other["saved_seconds"]
        self.ran.update(other["stage_runs"])

    def stats(self) -> dict:
        return {"hits": self.hits, "saved_seconds": round(self.saved_seconds, 1), "stage_runs": dict(self.ran)}


def run_cached(doc: dict, run_dir: Path, cache: Optional[StageCache], low: Optional[tuple[int, float]] = None):
    """Run a recipe document's stages in memory (files under ``run_dir``), reusing cached prefixes.

    ``low = (first, fraction)``: stages ``first..`` train on a seeded ``fraction`` of the training split.
    Returns ``(state, last StageResult or None when every stage came from the cache)``.
    """
    from compress.pipeline import apply, build_state, run_stage
    from compress.recipe import parse_recipe

    recipe = parse_recipe(doc)
    state = build_state(recipe)
    state.run_dir = Path(run_dir)
    start, spent = cache.load(doc, len(recipe.stages), state, low) if cache else (0, 0.0)
    caching, result, full_data = cache is not None, None, state.data
    for spec in recipe.stages[start:]:
        if low is not None and spec.index >= low[0]:
            state.data = train_fraction(full_data, low[1], recipe.seed)
        t0 = time.time()
        result = run_stage(state, spec)
        apply(state, result)
        # what a later stage reads of this one (encode packs the int8 file the stage before wrote)
        state.results.append({"index": spec.index, "name": spec.name, "model_file": None,
                              "artifact": str(result.artifact) if result.artifact else None})
        spent += time.time() - t0
        if cache is not None:
            cache.ran[f"{spec.index}:{spec.name}"] += 1
        caching = caching and result.artifact is None
        if caching:
            cache.put(doc, spec.index, state, spent, low)
    state.data = full_data  # measured on the whole validation split, whatever the fidelity
    return state, result
