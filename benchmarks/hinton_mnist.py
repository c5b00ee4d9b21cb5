"""Hinton et al. (2015)'s MNIST distillation table on the 10k MNIST set (seeded 8,000/2,000 split).

    .venv/bin/python -m benchmarks.hinton_mnist [--seeds 0,1,2] [--jobs 2]      # the table (test split)
    .venv/bin/python -m benchmarks.hinton_mnist --select --seeds 0 --widths 64,16             # lr/T grid,
    .venv/bin/python -m benchmarks.hinton_mnist --select --seeds 0 --widths 800 --temps 4,8   # validation

Every setting comes from recipes/mnist_kd.yaml, whose stages are found by role: the ``train`` stage
with ``target: teacher``; per student width a from-scratch ``train`` stage and a ``distill`` stage with
``teacher: recipe``; the early-stopped-KD stage (``kd_until_epoch``), the early-stopped-teacher stage
(``teacher_epoch``) and the assistant stage (``teacher: previous``, taught by the distill stage before it).
Scratch and distilled students of a width start from the same weights. ``--select`` trains the grid
below on the VALIDATION split (800 images); the recipe's lr and T are the ones it picked (alpha 0.1).
Errors in the table are counted on the 2,000 held-out test images, which no choice looked at.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
# --select grid: Adam learning rates for every student (scratch and distilled alike), and KD temperatures.
GRID_LR = (1e-3, 3e-3)
GRID_T = (2.0, 4.0, 8.0)


def _roles(recipe_path: str) -> dict:
    """The recipe's stages by role (see the module docstring)."""
    from compress.recipe import load_recipe
    from compress.trainer import TrainConfig

    r = load_recipe(recipe_path)
    roles: dict = {"recipe": r, "scratch": {}, "kd": {}, "jitter_scratch": {}, "jitter_kd": {}}
    prev_width = None
    for s in r.stages:
        cfg = s.config
        jitter = cfg.augment.random_shift > 0
        if s.name == "train":
            tc = TrainConfig(**cfg.model_dump(exclude={"target", "model"}))
            if cfg.target == "teacher":
                roles["teacher_train"] = tc
            else:
                roles["jitter_scratch" if jitter else "scratch"][cfg.model.hidden[0]] = (list(cfg.model.hidden), tc)
        elif s.name == "distill":
            width, plain = cfg.student.hidden[0], cfg.model_copy(update={"student": None, "teacher": "recipe"})
            if jitter:
                roles["jitter_kd"][width] = plain
            elif cfg.teacher == "previous":
                roles["ta"] = (width, prev_width, plain)
            elif cfg.kd_until_epoch is not None:
                roles["es_kd"] = (width, plain)
            elif cfg.teacher_epoch is not None:
                roles["es_teacher"] = (width, plain.model_copy(update={"teacher_epoch": None}), cfg.teacher_epoch)
            else:
                roles["kd"][width] = plain
            prev_width = width
    return roles


def teacher_dir(recipe, train_cfg, seed: int) -> Path:
    """Saved teachers are keyed by what made them, so --reuse never picks up a teacher of other settings."""
    key = json.dumps([recipe.data.model_dump(mode="json"), recipe.teacher.model_dump(mode="json"),
                      train_cfg.model_dump(mode="json", exclude={"progress", "device"})], sort_keys=True)
    return RESULTS / f"hinton_teacher_{hashlib.sha1(key.encode()).hexdigest()[:8]}_seed{seed}"


def _setup(seed: int, recipe_path: str, reuse: bool = True):
    """Data, roles and the seed's teacher (trained and saved unless a saved one of the same settings exists)."""
    import torch

    from compress import create_data, create_model, load_model, save_model, train
    from compress.utils import seed_everything

    torch.set_num_threads(1)
    c = _roles(recipe_path)
    r = c["recipe"]
    data = create_data(r.data)
    tdir = teacher_dir(r, c["teacher_train"], seed)
    if reuse and (tdir / "teacher.pt").is_file():
        teacher = load_model(tdir / "teacher.pt")
    else:
        seed_everything(seed)
        teacher = create_model(r.teacher, data.input_shape, data.num_outputs)
        train(teacher, c["teacher_train"], data, seed=seed, epoch_dir=tdir, name=f"teacher s{seed}")
        save_model(teacher, tdir / "teacher.pt")
    return c, data, teacher, tdir


def _errors(model, data, split: str) -> int:
    from compress.trainer import evaluate

    n = len(data.test if split == "test" else data.val)
    return round((1 - evaluate(model, data, split)["accuracy"]) * n)


def _student(seed: int, hidden, data):
    from compress import create_model
    from compress.utils import seed_everything

    seed_everything(seed * 1000 + hidden[0])  # scratch and distilled students start from the same weights
    return create_model({"name": "mlp", "hidden": list(hidden)}, data.input_shape, data.num_outputs)


def train_teacher(seed: int, recipe_path: str) -> int:
    """Only the teacher of one seed (saved for --reuse); returns its validation errors."""
    _, data, teacher, _ = _setup(seed, recipe_path, reuse=False)
    return _errors(teacher, data, "val")


def run_part(seed: int, recipe_path: str, reuse: bool, part: str) -> dict:
    """Rows of one seed on the test split; part 'widest' is the widest student, 'jitter' the students
    trained on jittered images, 'rest' everything else (parts so that two workers share the work evenly)."""
    from compress import distill, load_model, train

    c, data, teacher, tdir = _setup(seed, recipe_path, reuse)
    widest = max(c["scratch"])
    out: dict[str, int] = {"teacher": _errors(teacher, data, "test")}
    if part == "jitter":  # the teacher labels the very jittered image the student sees (function matching)
        for w, (hidden, scratch_cfg) in c["jitter_scratch"].items():
            m = _student(seed, hidden, data)
            train(m, scratch_cfg, data, seed=seed, name=f"scratch+jitter {w} s{seed}")
            out[f"jitter_scratch_{w}"] = _errors(m, data, "test")
            if w in c["jitter_kd"]:
                m = _student(seed, hidden, data)
                distill(m, teacher, c["jitter_kd"][w], data, seed=seed, name=f"kd+jitter {w} s{seed}")
                out[f"jitter_kd_{w}"] = _errors(m, data, "test")
        return out
    kd_models = {}
    for w, (hidden, scratch_cfg) in c["scratch"].items():
        if (w == widest) != (part == "widest"):
            continue
        m = _student(seed, hidden, data)
        train(m, scratch_cfg, data, seed=seed, name=f"scratch {w} s{seed}")
        out[f"scratch_{w}"] = _errors(m, data, "test")
        m = _student(seed, hidden, data)
        distill(m, teacher, c["kd"][w], data, seed=seed, name=f"kd {w} s{seed}")
        out[f"kd_{w}"] = _errors(m, data, "test")
        kd_models[w] = m
    if part == "widest":
        return out
    if "ta" in c:  # teacher assistant: the distilled middle student teaches the small one
        w, ta_w, cfg = c["ta"]
        m = _student(seed, [w, w], data)
        distill(m, kd_models[ta_w], cfg, data, seed=seed, name=f"ta {w} s{seed}")
        out["ta"] = _errors(m, data, "test")
    if "es_kd" in c:
        w, cfg = c["es_kd"]
        m = _student(seed, [w, w], data)
        distill(m, teacher, cfg, data, seed=seed, name=f"es-kd {w} s{seed}")
        out["es_kd"] = _errors(m, data, "test")
    if "es_teacher" in c:
        w, cfg, epoch = c["es_teacher"]
        early = load_model(tdir / f"epoch{epoch:03d}.pt")
        out["early_teacher"] = _errors(early, data, "test")
        m = _student(seed, [w, w], data)
        distill(m, early, cfg, data, seed=seed, name=f"es-teacher {w} s{seed}")
        out["es_teacher"] = _errors(m, data, "test")
    return out


PARTS = ("rest", "widest", "jitter")


def run_seeds(seeds, recipe_path: str, reuse: bool, jobs: int, only: tuple = PARTS) -> list[dict]:
    """Every part of every seed; with ``only`` a subset, the other rows come from the saved per-seed results."""
    c = _roles(recipe_path)
    missing = [s for s in seeds if not reuse or not (teacher_dir(c["recipe"], c["teacher_train"], s) / "teacher.pt").is_file()]
    if missing:  # train each teacher once, before the parts that share it
        _pool(train_teacher, jobs, missing, [recipe_path] * len(missing))
    parts = [(s, p) for p in only for s in seeds]
    res = _pool(run_part, jobs, [s for s, _ in parts], [recipe_path] * len(parts), [True] * len(parts),
                [p for _, p in parts])
    runs = []
    for s in seeds:
        saved = RESULTS / f"hinton_seed{s}.json"
        # Rows of other parts are merged only if the same recipe and teacher made them.
        made_by = {"recipe": hashlib.sha1(Path(recipe_path).read_bytes()).hexdigest()[:12],
                   "teacher": teacher_dir(c["recipe"], c["teacher_train"], s).name}
        out = {}
        if set(only) != set(PARTS):
            old = json.loads(saved.read_text()) if saved.is_file() else {}
            if old.get("made_by") != made_by:
                raise click.UsageError(f"{saved} was made by another recipe or teacher (or by an older script): "
                                       f"rerun every part (--parts {','.join(PARTS)})")
            out = old
        out["made_by"] = made_by
        for (s_, _), r in zip(parts, res):
            if s_ == s:
                out.update(r)
        (RESULTS / f"hinton_seed{s}.json").write_text(json.dumps(out, indent=2))
        runs.append(out)
    return runs


def select_one(job) -> tuple:
    """One grid point on the validation split: (seed, width, 'scratch' | T, lr) -> validation errors."""
    from compress import distill, train

    seed, recipe_path, w, kind, lr = job
    c, data, teacher, _ = _setup(seed, recipe_path)
    hidden, scratch_cfg = c["scratch"][w]
    opt = scratch_cfg.optimizer.model_copy(update={"lr": lr})
    m = _student(seed, hidden, data)
    if kind == "scratch":
        train(m, scratch_cfg.model_copy(update={"optimizer": opt}), data, seed=seed, name=f"sel scratch {w}")
    else:
        cfg = c["kd"][w].model_copy(update={"optimizer": opt, "temperature": kind})
        distill(m, teacher, cfg, data, seed=seed, name=f"sel kd {w} T={kind}")
    return (seed, w, kind, lr, _errors(m, data, "val"))


def _gap(scratch, student, teacher: float) -> float:
    """Share of the scratch-to-teacher error gap the student closes, on the means (percent)."""
    sc, st = statistics.mean(scratch), statistics.mean(student)
    return 100 * (sc - st) / (sc - teacher) if sc != teacher else float("nan")


def ms(values) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"


def _pool(fn, jobs: int, *iters):
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            return list(ex.map(fn, *iters))
    return list(map(fn, *iters))


@click.command()
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--jobs", default=1, show_default=True, help="parallel processes (1 torch thread each)")
@click.option("--recipe", "recipe_path", default=str(ROOT / "recipes" / "mnist_kd.yaml"), show_default=True)
@click.option("--reuse/--no-reuse", default=True, show_default=True, help="reuse teachers saved with the same settings")
@click.option("--parts", default=",".join(PARTS), show_default=True,
              help="rerun only these parts (rest: small students, widest, jitter); other rows from saved results")
@click.option("--table-only", is_flag=True, help="print the table from saved per-seed results")
@click.option("--teachers-only", is_flag=True, help="train and save the teachers only (validation errors printed)")
@click.option("--select", is_flag=True, help="the lr/T grid on the validation split (needs saved teachers or trains them)")
@click.option("--widths", default="", help="--select: only these student widths, e.g. 64,16")
@click.option("--lrs", default=",".join(f"{v:g}" for v in GRID_LR), show_default=True, help="--select: Adam lrs")
@click.option("--temps", default=",".join(f"{v:g}" for v in GRID_T), show_default=True, help="--select: KD temperatures")
def main(seeds, jobs, recipe_path, reuse, parts, table_only, teachers_only, select, widths, lrs, temps):
    import torch

    torch.set_num_threads(1)  # as in every worker, so the machine line tells the truth
    data_dir()
    RESULTS.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in seeds.split(",")]
    c = _roles(recipe_path)
    if teachers_only:
        val = _pool(train_teacher, jobs, seeds, [recipe_path] * len(seeds))
        print(f"teacher validation errors / 800 (seeds {seeds}): {val}")
        return
    if select:
        ws = [int(w) for w in widths.split(",")] if widths else list(c["scratch"])
        lrs, temps = [float(v) for v in lrs.split(",")], [float(v) for v in temps.split(",")]
        grid = [(s, recipe_path, w, k, lr) for s in seeds for w in ws for k in ("scratch", *temps) for lr in lrs]
        grid.sort(key=lambda j: -j[2])  # the widest (slowest) first, for an even split over workers
        res = _pool(select_one, jobs, grid)
        rows = []
        for w, k, lr in itertools.product(ws, ("scratch", *temps), lrs):
            v = [e for s_, w_, k_, lr_, e in res if (w_, k_, lr_) == (w, k, lr)]
            rows.append([f"2x{w}", k if k == "scratch" else f"KD T={k:g}", f"{lr:g}", ms(v)])
        table = markdown_table(["student", "training", "Adam lr", f"validation errors / 800 (seeds {seeds})"], rows)
        print(table)
        print(machine_line())
        (RESULTS / f"hinton_mnist_select_{'_'.join(map(str, ws))}.json").write_text(json.dumps({"results": res, "table": table}, indent=2))
        return
    if table_only:
        runs = [json.loads((RESULTS / f"hinton_seed{s}.json").read_text()) for s in seeds]
    else:
        chosen = tuple(p for p in parts.split(",") if p)
        if not chosen or set(chosen) - set(PARTS):
            raise click.BadParameter(f"expected parts among {', '.join(PARTS)}, got '{parts}'", param_hint="--parts")
        runs = run_seeds(seeds, recipe_path, reuse, jobs, chosen)
    col = lambda k: [r[k] for r in runs]  # noqa: E731
    teacher = statistics.mean(col("teacher"))
    tt = c["teacher_train"]
    rows = [[f"teacher 2x{c['recipe'].teacher.hidden[0]} (dropout, ±{tt.augment.random_shift} px jitter, "
             f"{tt.optimizer.name}, {tt.epochs} epochs)", ms(col("teacher")), "", ""]]

    def row(label, key, scratch_key, wins_against=None):
        gap = _gap(col(scratch_key), col(key), teacher)
        wins = sum(d <= s for d, s in zip(col(key), col(wins_against or scratch_key)))
        rows.append([label, ms(col(key)), f"{gap:.0f}%", f"{wins}/{len(runs)}"])

    def kd_label(cfg):
        return f"T={cfg.temperature:g}, α={cfg.alpha:g}, lr {cfg.optimizer.lr:g}, {cfg.epochs} epochs"

    for w, (_, sc) in c["scratch"].items():
        rows.append([f"2x{w} from scratch (lr {sc.optimizer.lr:g}, {sc.epochs} epochs)", ms(col(f"scratch_{w}")), "", ""])
        row(f"2x{w} distilled ({kd_label(c['kd'][w])})", f"kd_{w}", f"scratch_{w}")
    if "ta" in c:
        w, ta_w, cfg = c["ta"]
        row(f"2x{w} via assistant 2x{ta_w} ({kd_label(cfg)})", "ta", f"scratch_{w}")
    if "es_kd" in c:
        w, cfg = c["es_kd"]
        row(f"2x{w} early-stopped KD (KD for epochs 1-{cfg.kd_until_epoch}, then labels; {kd_label(cfg)})",
            "es_kd", f"scratch_{w}")
    if "es_teacher" in c:
        w, cfg, epoch = c["es_teacher"]
        row(f"2x{w} from early-stopped teacher (epoch {epoch}: {ms(col('early_teacher'))} errors)",
            "es_teacher", f"scratch_{w}")
    notes = []
    for w, (_, sc) in c["jitter_scratch"].items():
        if f"jitter_scratch_{w}" not in runs[0]:
            continue
        shift = sc.augment.random_shift
        rows.append([f"2x{w} from scratch, ±{shift} px jitter (lr {sc.optimizer.lr:g}, {sc.epochs} epochs)",
                     ms(col(f"jitter_scratch_{w}")), f"{_gap(col(f'scratch_{w}'), col(f'jitter_scratch_{w}'), teacher):.0f}%", ""])
        if w in c["jitter_kd"]:
            row(f"2x{w} distilled, ±{shift} px jitter, teacher labels the jittered image ({kd_label(c['jitter_kd'][w])})",
                f"jitter_kd_{w}", f"scratch_{w}", f"jitter_scratch_{w}")
            js, jk = statistics.mean(col(f"jitter_scratch_{w}")), statistics.mean(col(f"jitter_kd_{w}"))
            notes.append(f"2x{w} with jitter: distilled {jk:.1f} vs scratch {js:.1f} errors "
                         f"(KD <= scratch on {sum(k <= j for k, j in zip(col(f'jitter_kd_{w}'), col(f'jitter_scratch_{w}')))}"
                         f"/{len(runs)} seeds); gap closed is against the plain (unjittered) scratch student, KD <= scratch against the jittered one")
    table = markdown_table(["model", "test errors / 2,000 (mean ± std)", "gap closed", "KD <= scratch (seeds)"], rows)
    print(table)
    print(f"\nseeds {seeds}; scratch and distilled students of a width share initial weights, epochs and schedule "
          f"(each one's Adam lr and T picked on validation by --select); 'gap closed' = (scratch - distilled) / (scratch - teacher), on the means.")
    for n in notes:
        print(n)
    print(machine_line())
    (RESULTS / "hinton_mnist.json").write_text(json.dumps({"runs": runs, "seeds": seeds, "table": table,
                                                          "machine": machine_line()}, indent=2))


if __name__ == "__main__":
    main()
