"""Why the search found what it found: which searched keys moved which objective, and Optuna's importances.

A key *moved* an objective when, among trials that agree on every other categorical key (and were measured at
the same fidelity), the objective changed while the key did. Continuous keys cannot be matched, so their
variation is not held fixed: the test errs towards 'moved', and a key is named *wasted* only when it took
different values in such a group and no objective changed there, ever (a pruning ratio that leaves a dense file
of the same size, at the same latency and accuracy).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any, Optional

# How much an objective must change to count as moved: files and MACs are exact; accuracy is an evaluation
# on a fixed split (exact); latency is a noisy median, so 10% (twice the run-to-run spread on a busy machine).
RELATIVE = {"latency": 0.10}
MIN_TRIALS = 3  # fANOVA on fewer full-budget trials returns equal shares or fails on zero variance


def _value(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _changed(values: list[float], objective: str) -> bool:
    lo, hi = min(values), max(values)
    return hi - lo > RELATIVE.get(objective, 0.0) * max(abs(lo), abs(hi), 1e-12)


def moved(rows: list[dict], space: dict, objectives: list[str]) -> dict[str, dict[str, Optional[bool]]]:
    """key -> objective -> True (moved it), False (varied but never moved it), None (never varied with the
    other categorical keys fixed, so no evidence yet)."""
    categorical = [k for k, spec in space.items() if isinstance(spec, list)]
    out: dict[str, dict[str, Optional[bool]]] = {}
    for key in space:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            if key in r["params"]:
                fixed = tuple(_value(r["params"].get(k)) for k in categorical if k != key)
                groups[(r["fidelity"], fixed)].append(r)
        varied = [g for g in groups.values() if len({_value(r["params"][key]) for r in g}) > 1]
        out[key] = {}
        for o in objectives:
            usable = [[r[o] for r in g if r.get(o) is not None] for g in varied]
            usable = [v for v in usable if len(v) > 1]
            out[key][o] = None if not usable else any(_changed(v, o) for v in usable)
    return out


def wasted(table: dict[str, dict[str, Optional[bool]]]) -> list[str]:
    """Keys that varied and moved no objective."""
    return [k for k, per in table.items() if per and all(v is False for v in per.values())]


def importances(optuna, study, objectives: list[str], seed: int) -> dict[str, Any]:
    """objective -> {key: share of its variance} (Optuna's fANOVA over the full-budget trials), or a string
    saying why not (too few trials, an objective that never changed)."""
    TS = optuna.trial.TrialState
    done = study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
    out: dict[str, Any] = {}
    for i, o in enumerate(objectives):
        values = [t.values[i] for t in done]
        if len(done) < MIN_TRIALS:
            out[o] = f"needs at least {MIN_TRIALS} full-budget trials, has {len(done)}"
            continue
        if max(values) == min(values):
            out[o] = "the same in every full-budget trial: no key moved it"
            continue
        try:
            got = optuna.importance.get_param_importances(
                study, target=lambda t, i=i: t.values[i],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
        except Exception as exc:  # fANOVA's zero-variance RuntimeError, a distribution Optuna cannot split
            out[o] = f"not computed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
            continue
        out[o] = {k: round(float(v), 3) for k, v in got.items() if math.isfinite(float(v))}
    return out


def explain(optuna, study, rows: list[dict], cfg, seed: int) -> dict[str, Any]:
    objectives = list(cfg.objectives)
    table = moved(rows, cfg.space, objectives)
    return {"importance": importances(optuna, study, objectives, seed), "moved": table, "wasted": wasted(table)}


def describe(ex: dict) -> list[str]:
    """The CLI's lines: what mattered for each objective, and the keys searched for nothing."""
    lines = []
    for o, imp in ex["importance"].items():
        if isinstance(imp, dict):
            top = sorted(imp.items(), key=lambda kv: -kv[1])
            lines.append(f"{o}: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
        else:
            lines.append(f"{o}: importances {imp}")
    for k in ex["wasted"]:
        lines.append(f"wasted: {k} moved no objective ({', '.join(ex['moved'][k])}) across the trials so far")
    for k, per in ex["moved"].items():
        still = [o for o, v in per.items() if v is False]
        if k not in ex["wasted"] and still:
            lines.append(f"{k} never moved {', '.join(still)}")
    return lines
