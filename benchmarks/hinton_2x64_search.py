"""What we tried to make distillation close 80% of the 2x64 student's gap, on validation only (800 images).

    .venv/bin/python -m benchmarks.hinton_2x64_search --seeds 0 --jobs 2     # every variant (about 15 min)
    .venv/bin/python -m benchmarks.hinton_2x64_search --only kd,jitter_scratch --seeds 0,1

Each variant starts from the recipe's 2x64 settings (recipes/mnist_kd.yaml: KD T=4, alpha 0.1, Adam lr 3e-3,
120 epochs) and changes what its name says; the teacher is the saved teacher of benchmarks/hinton_mnist.py
(trained if missing). Errors are counted on the validation split; the 2,000 test images are never read.
"""
from __future__ import annotations

import json
import statistics

import click

from benchmarks.common import data_dir, machine_line, markdown_table
from benchmarks.hinton_mnist import RESULTS, ROOT, _errors, _pool, _setup, _student

RECIPE = str(ROOT / "recipes" / "mnist_kd.yaml")
# name -> (label, kind, changes to the 2x64 KD/scratch config); kind: kd | scratch | assistant
VARIANTS = {
    "scratch": ("from scratch (the recipe's)", "scratch", {}),
    "kd": ("KD, the recipe's (T=4, α=0.1, 120 epochs)", "kd", {}),
    "kd_alpha0": ("KD, α=0", "kd", {"alpha": 0.0}),
    "kd_alpha0_300": ("KD, α=0, 300 epochs", "kd", {"alpha": 0.0, "epochs": 300}),
    "kd_300": ("KD, 300 epochs", "kd", {"epochs": 300}),
    "kd_T8_300": ("KD, T=8, 300 epochs", "kd", {"temperature": 8.0, "epochs": 300}),
    "kd_T20_300": ("KD, T=20, 300 epochs", "kd", {"temperature": 20.0, "epochs": 300}),
    "kd_lr1e-3_300": ("KD, lr 1e-3, 300 epochs", "kd", {"lr": 1e-3, "epochs": 300}),
    "assistant_800": ("KD from a distilled 2x800 assistant", "assistant", {}),
    "jitter_scratch": ("from scratch, ±2 px jitter", "scratch", {"shift": 2}),
    "jitter_kd": ("KD, ±2 px jitter", "kd", {"shift": 2}),
    "jitter_kd_a0.5": ("KD, ±2 px jitter, α=0.5", "kd", {"shift": 2, "alpha": 0.5}),
    "jitter_kd_a0.9": ("KD, ±2 px jitter, α=0.9", "kd", {"shift": 2, "alpha": 0.9}),
    "jitter_kd_T2": ("KD, ±2 px jitter, T=2", "kd", {"shift": 2, "temperature": 2.0}),
    "jitter_kd_T2_a0.5": ("KD, ±2 px jitter, T=2, α=0.5", "kd", {"shift": 2, "temperature": 2.0, "alpha": 0.5}),
}


def _apply(cfg, changes: dict):
    update = {k: v for k, v in changes.items() if k in ("alpha", "temperature", "epochs")}
    if "lr" in changes:
        update["optimizer"] = cfg.optimizer.model_copy(update={"lr": changes["lr"]})
    if "shift" in changes:
        update["augment"] = cfg.augment.model_copy(update={"random_shift": changes["shift"]})
    return cfg.model_copy(update=update)


def run_one(job) -> tuple:
    from compress import distill, train

    name, seed = job
    _, kind, changes = VARIANTS[name]
    c, data, teacher, _ = _setup(seed, RECIPE)
    hidden, scratch_cfg = c["scratch"][64]
    model = _student(seed, hidden, data)
    if kind == "scratch":
        train(model, _apply(scratch_cfg, changes), data, seed=seed, name=f"{name} s{seed}")
    else:
        if kind == "assistant":
            assistant = _student(seed, c["scratch"][800][0], data)
            distill(assistant, teacher, c["kd"][800], data, seed=seed, name=f"assistant 800 s{seed}")
            teacher = assistant
        distill(model, teacher, _apply(c["kd"][64], changes), data, seed=seed, name=f"{name} s{seed}")
    return name, seed, _errors(model, data, "val")


@click.command()
@click.option("--seeds", default="0", show_default=True)
@click.option("--only", default="", help="comma-separated variants (default: all): " + ", ".join(VARIANTS))
@click.option("--jobs", default=1, show_default=True, help="parallel processes, 1 torch thread each")
def main(seeds: str, only: str, jobs: int) -> None:
    data_dir()
    names = [n for n in only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; expected {', '.join(VARIANTS)}", param_hint="--only")
    seed_list = [int(s) for s in seeds.split(",")]
    _pool(_setup, 1, seed_list, [RECIPE] * len(seed_list))  # the teachers, once, before the workers share them
    res = _pool(run_one, jobs, [(n, s) for n in names for s in seed_list])
    rows = []
    for n in names:
        errs = [e for n_, _, e in res if n_ == n]
        spread = f" ± {statistics.stdev(errs):.1f}" if len(errs) > 1 else ""
        rows.append([n, VARIANTS[n][0], f"{statistics.mean(errs):.1f}{spread}", ", ".join(map(str, errs))])
    print(markdown_table(["variant", "2x64 student", f"validation errors / 800 (mean, seeds {seed_list})", "per seed"], rows))
    print(machine_line())
    (RESULTS / "hinton_2x64_search.json").write_text(json.dumps({"results": res, "machine": machine_line()}, indent=2))


if __name__ == "__main__":
    main()
