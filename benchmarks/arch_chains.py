"""Users' architectures on real data (issue 17): recipes/mnist_vit_chain.yaml (timm ViT teacher -> narrower
ViT by KD -> heads and MLP width pruned -> int8) and recipes/mnist_resnet18_chain.yaml (torchvision
resnet18 at 32 px -> small CNN by KD -> channels pruned -> int8), every model trained from scratch.

Targets: the last stage at most 1 point below the teacher's test accuracy and at least 4x faster in ONNX
Runtime at batch 1 (interleaved with the teacher in one process), on every seed.

    python -m benchmarks.arch_chains --seeds 0 1 2 [--chains vit resnet18] [--set KEY=VALUE ...]
    python -m benchmarks.arch_chains --table-only        # the tables from the saved reports

--teacher once (the default, to keep CPU time bounded): the first seed trains the teacher (saved as
<chain>/teacher.pt, with what made it in teacher.json: a changed teacher, stage 0 or data retrains it) and
every seed starts from it (its train stage with 0 epochs is row 0, the baseline of
every ratio); --teacher per-seed trains one per seed. Seeds run in order, both chains per seed, and every
finished run is saved at once, so a cut-short run still leaves whole seeds to tabulate; a saved
(chain, seed) is not rerun unless --force.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table
from compress.report import stage_label

CHAINS = {"vit": ROOT / "recipes" / "mnist_vit_chain.yaml", "resnet18": ROOT / "recipes" / "mnist_resnet18_chain.yaml"}
OUT = ROOT / "benchmarks" / "results" / "arch_chains"
ACC_DROP, SPEEDUP = 1.0, 4.0  # the targets: points below the teacher, ORT b1 x faster


def ort(row: dict, batch: str) -> float | None:
    lat = (row.get("latency") or {}).get("onnxruntime", {}).get(batch)
    return lat.get("speedup") if lat else None


def spread(values: list[float], fmt: str) -> str:
    """mean [min, max] over seeds (the mean alone for one seed)."""
    mean = fmt.format(sum(values) / len(values))
    return mean if len(values) == 1 else f"{mean} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def table(chain: str, reports: list[dict]) -> str:
    """One row per stage: test accuracy, drop vs the teacher, params, MACs, file size, ORT b1/b32 x faster."""
    rows = []
    for i, first in enumerate(reports[0]["stages"]):
        per = [rep["stages"][i] for rep in reports]
        acc = [100 * r["metrics"]["accuracy"] for r in per]
        drop = [100 * (rep["stages"][0]["metrics"]["accuracy"] - r["metrics"]["accuracy"]) for rep, r in zip(reports, per)]
        speed = {b: [ort(r, b) for r in per] for b in ("1", "32")}
        rows.append([stage_label(first), spread(acc, "{:.2f}"), spread(drop, "{:+.2f}"), f"{first['params']:,}",
                     human(first["macs"]) if first.get("macs") else "-", f"{first['size_bytes'] / 1024:.1f} KiB",
                     *(spread(v, "{:.2f}") + "x" if all(x is not None for x in v) else "-" for v in speed.values())])
    header = ["stage", "test accuracy %", "drop vs teacher (points)", "params", "MACs", "file size", "ORT b1 x faster",
              "ORT b32 x faster"]
    last = [rep["stages"][-1] for rep in reports]
    worst_drop = max(100 * (rep["stages"][0]["metrics"]["accuracy"] - r["metrics"]["accuracy"]) for rep, r in zip(reports, last))
    least_fast = min(ort(r, "1") or 0.0 for r in last)
    seeds = ", ".join(str(rep["seed"]) for rep in reports)
    verdict = (f"targets, worst seed: {worst_drop:+.2f} points (<= {ACC_DROP:g}: {'met' if worst_drop <= ACC_DROP else 'MISSED'}), "
               f"{least_fast:.2f}x faster ORT b1 (>= {SPEEDUP:g}x: {'met' if least_fast >= SPEEDUP else 'MISSED'})")
    reuse = {rep.get("teacher_reuse", "per-seed") for rep in reports}
    how = "one teacher, trained once and reused by every seed" if reuse == {"once"} else "a teacher trained per seed"
    return (f"### {chain} ({len(reports)} seed{'s' * (len(reports) > 1)}: {seeds}; {how}; "
            f"mean [min, max] over seeds; params/MACs/size of seed {reports[0]['seed']})\n\n"
            + markdown_table(header, rows) + f"\n\n{verdict}")


def saved(chain: str, seed: int) -> Path:
    return OUT / chain / f"seed{seed}.json"


def run_one(chain: str, seed: int, overrides: list[str], teacher: str) -> dict:
    """One seed of one chain; with ``teacher == "once"`` the saved teacher is reused (or trained and saved)."""
    from compress.pipeline import Pipeline

    shared = OUT / chain / "teacher.pt"
    recipe = Pipeline.from_yaml(CHAINS[chain], [f"seed={seed}", *overrides]).recipe
    # what made the saved teacher: reused only while the recipe's teacher and its training are unchanged
    made_by = json.dumps({"teacher": recipe.teacher.model_dump(mode="json"),
                          "stage0": recipe.stages[0].config.model_dump(mode="json"),
                          "data": recipe.data.model_dump(mode="json", exclude={"root"})}, sort_keys=True, default=str)
    stamp = shared.with_suffix(".json")
    reuse = teacher == "once" and shared.is_file() and stamp.is_file() and stamp.read_text() == made_by
    sets = [f"seed={seed}", *overrides]
    if reuse:
        sets += [f"teacher.checkpoint={shared}", "stages.0.train.epochs=0"]
    run_dir = OUT / chain / f"run_seed{seed}"
    report = Pipeline.from_yaml(CHAINS[chain], sets).run(run_dir, force=True)
    if teacher == "once" and not reuse:
        shutil.copyfile(run_dir / "stages" / "00_train" / "teacher.pt", shared)
        stamp.write_text(made_by)
    report["teacher_reuse"] = teacher
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--chains", nargs="+", choices=sorted(CHAINS), default=list(CHAINS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--teacher", choices=["once", "per-seed"], default="once",
                    help="train the teacher once and reuse it for every seed, or once per seed")
    ap.add_argument("--force", action="store_true", help="rerun (chain, seed) pairs that have a saved report")
    ap.add_argument("--table-only", action="store_true", help="print the tables from the saved reports")
    args = ap.parse_args()
    data_dir()
    torch.set_num_threads(1)  # training too: on a shared 2-core machine one thread is faster and steadier
    if not args.table_only:
        for seed in args.seeds:
            for chain in args.chains:
                if saved(chain, seed).is_file() and not args.force:
                    continue
                saved(chain, seed).write_text(json.dumps(run_one(chain, seed, args.overrides, args.teacher), indent=2))
    parts = []
    for chain in CHAINS:  # every chain with saved runs: parallel runs of one chain each still make one table file
        reports = [json.loads(saved(chain, s).read_text()) for s in args.seeds if saved(chain, s).is_file()]
        if reports:
            parts.append(table(chain, reports))
    text = "\n\n".join(parts) + ("\n\nMNIST t10k, seeded 8,000/2,000 split; latency ratios timed interleaved with the "
                                 "teacher in one process on a shared machine.\n" + machine_line())
    print(text)
    (OUT / "tables.md").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "tables.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
