"""`compress search` on MNIST against the hand-written chain (issues 19 and 27).

Target: on each search seed, the chosen model Pareto-dominates recipes/mnist_deep_compression.yaml measured
side by side in the same run (test accuracy not lower, ORT batch-32 latency and artifact size not higher);
report wall time, seconds per trial, what stage reuse saved, and the validation front against the chain.
recipes/mnist_search.yaml is the hand-written chain stage for stage, so ``--set`` shortens both alike.

    .venv/bin/python -m benchmarks.search_mnist [--seeds 0,1,2] [--trials 40] [--jobs 2] [--set KEY=VALUE ...]

Each seed's result is kept in benchmarks/results/search_mnist/summary.json (seeds accumulate across sittings).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import data_dir, machine_line
from compress.recipe import apply_override, read_yaml
from compress.search import search
from compress.search.engine import dominates

ROOT = Path(__file__).resolve().parents[1]
RECIPE, HAND = ROOT / "recipes" / "mnist_search.yaml", ROOT / "recipes" / "mnist_deep_compression.yaml"
OUT = Path("benchmarks/results/search_mnist")
DIRS = {"accuracy": "max", "latency": "min", "size": "min"}


def per_trial_seconds(rows: list[dict]) -> dict:
    """Compute seconds per trial (its low and full rows together), from the rows the search stored."""
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for r in rows:
        wall[r["trial"]] = wall.get(r["trial"], 0.0) + r["seconds"]
        if r.get("cpu_seconds") is not None:
            cpu[r["trial"]] = cpu.get(r["trial"], 0.0) + r["cpu_seconds"]
    full = sum(1 for r in rows if r["fidelity"] == "full")
    return {"trials": len(wall), "full_budget": full, "mean_s": round(sum(wall.values()) / max(len(wall), 1), 1),
            "mean_cpu_s": round(sum(cpu.values()) / len(cpu), 1) if cpu else None, "cpu_measured_trials": len(cpu)}


def front_vs_hand(res) -> dict:
    """The validation front against the hand-written chain's validation point (latencies from separate
    timings, each interleaved with the teacher: compared through their speedups over it)."""
    h = (res.compare or {}).get("val")
    if not h:
        return {}
    hand = {"accuracy": h["accuracy"], "size": h["size"], "latency": -(h.get("speedup") or 0)}
    points = []
    for r in res.front:
        p = {"accuracy": r["accuracy"], "size": r["size"], "latency": -(r.get("speedup") or 0)}
        points.append({"trial": r["trial"], "params": r["params"], "val_accuracy": r["accuracy"], "size": r["size"],
                       "speedup": r.get("speedup"), "dominates_hand": dominates(p, hand, DIRS),
                       "dominated_by_hand": dominates(hand, p, DIRS)})
    return {"hand_val": {"accuracy": h["accuracy"], "size": h["size"], "speedup": h.get("speedup")}, "front": points}


def trial_cost(doc: dict, repeats: int) -> dict:
    """Wall and CPU seconds of one low-fidelity trial (the stages after the teacher at ``fidelity.low`` of their
    epochs) on the whole training split (before: issue 27) and on ``fidelity.data`` of it, interleaved in this
    process; each run starts from a cache holding only the teacher, so nothing else is reused."""
    from compress.search.cache import StageCache, run_cached
    from compress.search.config import parse_search, strip_search, trial_doc
    from compress.search.engine import scale_epochs

    cfg = parse_search(doc)
    base = strip_search(doc)
    params = {k: (v[len(v) // 2] if isinstance(v, list) else (v["low"] + v["high"]) / 2) for k, v in cfg.space.items()}
    low = scale_epochs(trial_doc(base, params), 1, cfg.fidelity.low)
    root = OUT / "trial_cost"
    shutil.rmtree(root, ignore_errors=True)
    teacher = StageCache(root / "teacher")
    run_cached(dict(base, stages=base["stages"][:1]), root / "t", teacher)
    out: dict = {"params": params, "epochs": cfg.fidelity.low, "runs": []}
    for rep in range(repeats):
        for fraction in (1.0, cfg.fidelity.data):
            cache = StageCache(root / f"cache{rep}_{fraction}")
            shutil.copytree(teacher.root, cache.root)
            t0, c0 = time.time(), time.process_time()
            run_cached(low, root / f"run{rep}_{fraction}", cache, (1, fraction))
            out["runs"].append({"data": fraction, "wall_s": round(time.time() - t0, 1),
                                "cpu_s": round(time.process_time() - c0, 1)})
    for fraction in (1.0, cfg.fidelity.data):
        runs = [r for r in out["runs"] if r["data"] == fraction]
        out[f"data_{fraction}"] = {k: round(sum(r[k] for r in runs) / len(runs), 1) for k in ("wall_s", "cpu_s")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the search recipe (default: recipes/mnist_search.yaml)")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="search worker processes (default: search.jobs)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per seed")
    ap.add_argument("--resume", action="store_true", help="continue each seed's search where it stopped")
    ap.add_argument("--trial-cost", type=int, default=0, metavar="REPEATS",
                    help="only measure one low-fidelity trial on the whole training split and on fidelity.data of it")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to both the search recipe and the hand-written one (e.g. stages.0.train.epochs=4)")
    args = ap.parse_args()
    data_dir()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.trial_cost:
        doc = read_yaml(args.recipe)
        for o in args.overrides:
            apply_override(doc, o)
        print(json.dumps({"machine": machine_line(), **trial_cost(doc, args.trial_cost)}, indent=1))
        return
    summary_file = OUT / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"runs": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        doc, hand = read_yaml(args.recipe), read_yaml(HAND)
        for o in args.overrides:
            apply_override(doc, o)
            apply_override(hand, o)
        doc["search"]["seed"] = seed
        out = OUT / f"seed{seed}"
        if not args.resume:
            shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        res = search(doc, out=out, trials=args.trials, time_limit=args.time_limit, compare=hand, jobs=args.jobs,
                     resume=args.resume, log=print)
        wall = time.time() - t0
        c, h = res.test, (res.compare or {}).get("test")
        dominates_hand = None
        if c and h:
            dominates_hand = (c["accuracy"] >= h["accuracy"] and c["size"] <= h["size"]
                              and (res.compare["chosen_vs_compare_speedup"] or 0) >= 1.0)
        line = {"seed": seed, "overrides": args.overrides, "jobs": args.jobs, "resumed": args.resume, "wall_s": round(wall, 1),
                "per_trial": per_trial_seconds(res.rows), "reuse": res.reuse, "message": res.message,
                "chosen": res.chosen is not None, "chosen_test": c, "hand_test": h,
                "chosen_vs_hand_speedup": (res.compare or {}).get("chosen_vs_compare_speedup"),
                "dominates_hand_written": dominates_hand, "val_front_vs_hand": front_vs_hand(res),
                "importance": res.explain.get("importance"), "wasted": res.explain.get("wasted")}
        summary["runs"][str(seed)] = line
        summary["machine"] = machine_line()
        summary_file.write_text(json.dumps(summary, indent=1, default=str))
        print(json.dumps(line, indent=1, default=str))
    wins = [r["dominates_hand_written"] for r in summary["runs"].values()]
    print(f"{machine_line()}\nchosen model dominates the hand-written chain on {sum(bool(w) for w in wins)} of "
          f"{len(wins)} seeds (target: 2 of 3)\nsummary: {summary_file}")


if __name__ == "__main__":
    main()
