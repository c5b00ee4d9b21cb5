"""`compress search` on MNIST against the hand-written chain (issue 19).

Target: on each search seed, the chosen model Pareto-dominates recipes/mnist_deep_compression.yaml
measured side by side in the same run (test accuracy not lower, ORT batch-32 latency and file size not
higher); report wall time and what stage reuse saved.

    .venv/bin/python -m benchmarks.search_mnist [--seeds 0,1,2] [--trials 40] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import data_dir, machine_line
from compress.recipe import apply_override, read_yaml
from compress.search import search

ROOT = Path(__file__).resolve().parents[1]
RECIPE, HAND = ROOT / "recipes" / "mnist_search.yaml", ROOT / "recipes" / "mnist_deep_compression.yaml"
OUT = Path("benchmarks/results/search_mnist")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to both the search recipe and the hand-written one (e.g. stages.0.train.epochs=4)")
    args = ap.parse_args()
    data_dir()
    torch.set_num_threads(1)
    lines = []
    for seed in (int(s) for s in args.seeds.split(",")):
        doc, hand = read_yaml(RECIPE), read_yaml(HAND)
        for o in args.overrides:
            apply_override(doc, o)
            apply_override(hand, o)
        doc["search"]["seed"] = seed
        out = OUT / f"seed{seed}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.time()
        res = search(doc, out=out, trials=args.trials, time_limit=args.time_limit, compare=hand)
        wall = time.time() - t0
        c, h = res.test, (res.compare or {}).get("test")
        dominates = None
        if c and h:
            dominates = (c["accuracy"] >= h["accuracy"] and c["size"] <= h["size"]
                         and (res.compare["chosen_vs_compare_speedup"] or 0) >= 1.0)
        line = {"seed": seed, "trials": len({r["trial"] for r in res.rows}), "wall_s": round(wall, 1),
                "reuse": res.reuse, "message": res.message, "chosen_test": c, "hand_test": h,
                "chosen_vs_hand_speedup": (res.compare or {}).get("chosen_vs_compare_speedup"),
                "dominates_hand_written": dominates}
        lines.append(line)
        print(json.dumps(line, indent=1, default=str))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({"machine": machine_line(), "runs": lines}, indent=1, default=str))
    print(f"{machine_line()}\nsummary: {OUT / 'summary.json'}")


if __name__ == "__main__":
    main()
