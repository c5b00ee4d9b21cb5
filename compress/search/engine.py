"""The joint search: Optuna proposes recipe values, each trial runs the recipe (cached prefixes reused),
is measured on the validation split, and the Pareto front and the constrained choice come out.

Multi-fidelity (why not an Optuna pruner): Optuna's pruners only work for single-objective studies, and
a scalarized objective would hide the front. So every trial first trains its varied stages at
``fidelity.low`` x their epochs; it gets the full budget only when its optimistic point (low-fidelity
accuracy + the largest low->full gain seen so far) is not dominated by the full-budget front. The others
are told to Optuna as PRUNED, so the sampler learns from full-budget values only.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import ConfigDict, Field

from compress.config import StrictModel, validate
from compress.errors import CompressError, RecipeError, RecipeErrors
from compress.rundir import check_inside, open_run_dir
from compress.search.cache import StageCache, run_cached
from compress.search.config import SearchConfig, first_stage, parse_search, range_spec, strip_search, trial_doc
from compress.safety import redacting
from compress.utils import write_json, write_text

INSTALL = "pip install compress[search]"
SAVED = "search.yaml"  # the recipe of the search, beside its study: what --resume needs
# What a search writes at the top of its folder: each must resolve inside it (a link out is refused).
OWN = ("study.db", SAVED, "trials.jsonl", "front.json", "result.json", "search.html",
       "baseline", "cache", "trials", "chosen", "compare", ".ask.lock", ".measure.lock")


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise CompressError(f"compress search needs Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class SearchResult:
    out: Path
    rows: list[dict]  # every trial's measured rows (low and full fidelity), as in trials.jsonl
    front: list[dict]  # full-budget Pareto front
    chosen: Optional[dict]  # the best row meeting the constraints (None: none met them)
    closest: list[dict]  # when none met them: the nearest rows, with their misses
    test: Optional[dict]  # the chosen (or closest) model on the test split, measured once at the end
    compare: Optional[dict] = None
    baseline: dict = field(default_factory=dict)
    reuse: dict = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    explain: dict = field(default_factory=dict)  # per objective the keys that mattered; the keys that moved none


# -- rows read back from study.db ---------------------------------------------------------------------
_STORED = ConfigDict(**{**StrictModel.model_config, "extra": "allow", "strict": True})  # JSON types as written


class _Row(StrictModel):
    """A measured trial row as the search stores it in the study's user attributes (finite numbers)."""

    model_config = _STORED
    trial: int
    fidelity: Literal["low", "full"]
    params: dict[str, Any]
    accuracy: float
    size: float
    n_params: Optional[int] = None
    macs: Optional[float] = None
    latency: Optional[float] = None
    speedup: Optional[float] = None
    seconds: float = 0.0
    file: str
    onnx: Optional[str] = None  # the ONNX file that runs a packed .cpk
    dir: str
    misses: dict[Literal["max_drop", "speedup", "max_size", "max_latency_ms"], float]
    feasible: bool


class _TrialAttrs(StrictModel):
    model_config = _STORED
    rows: list[_Row] = Field(default_factory=list, max_length=2)
    violation: list[float] = Field(default_factory=lambda: [0.0], min_length=1, max_length=1)


def open_study(optuna, db: Path, out: Path, cfg: SearchConfig):
    """The study in ``db``, every stored trial checked: a database is input (a resumed folder may come from
    anywhere), so a corrupt file, a row that is not a measured trial, or a path that leaves the search
    directory is one line naming the file, before anything trains."""
    directions = ["maximize" if d == "max" else "minimize" for d in cfg.objectives.values()]
    try:
        study = optuna.create_study(storage=_storage(optuna, db), study_name="search", directions=directions,
                                    load_if_exists=True)
        stored = study.get_trials(deepcopy=False)
    except Exception as exc:  # SQLAlchemy, sqlite3 and Optuna raise many types for a file that is not their database
        detail = (str(exc).splitlines() or [""])[0]
        raise CompressError(f"{db}: not a readable Optuna study database ({type(exc).__name__}: {detail})") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise CompressError(f"{db}: the study's objectives differ from search.objectives ({list(cfg.objectives)})")
    for t in stored:
        where = f"{db}: trial {t.number}"
        try:
            attrs = validate(_TrialAttrs, t.user_attrs, "user_attrs")
        except RecipeErrors as exc:
            raise CompressError(f"{where}: {exc.errors[0]}") from None
        for i, row in enumerate(attrs.rows):
            missing = [k for k in cfg.objectives if getattr(row, k, None) is None]
            if missing:
                raise CompressError(f"{where}: user_attrs.rows[{i}] has no {missing[0]} (an objective)")
            check_inside(out, Path(row.file), f"{where}: user_attrs.rows[{i}].file")
            if row.onnx is not None:
                check_inside(out, Path(row.onnx), f"{where}: user_attrs.rows[{i}].onnx")
            check_inside(out, Path(row.dir) / "recipe.yaml", f"{where}: user_attrs.rows[{i}].dir")
    return study


# -- objectives and constraints ------------------------------------------------------------------------
def dominates(a: dict, b: dict, directions: dict) -> bool:
    better = False
    for k, d in directions.items():
        x, y = a[k], b[k]
        if (x < y if d == "max" else x > y):
            return False
        better = better or x != y
    return better


def pareto(rows: list[dict], directions: dict) -> list[dict]:
    return [r for r in rows if not any(dominates(o, r, directions) for o in rows if o is not r)]


def misses(row: dict, base: dict, cfg: SearchConfig) -> dict:
    """How far a row is from each constraint (positive: missed by that much; empty: all met)."""
    c, out = cfg.constraints, {}
    sign = 1 if base["higher_better"] else -1
    if c.max_drop is not None:
        drop = sign * (base["accuracy"] - row["accuracy"])
        if drop > c.max_drop + 1e-12:
            out["max_drop"] = round(drop - c.max_drop, 5)
    if c.speedup is not None and row.get("speedup") is not None and row["speedup"] < c.speedup:
        out["speedup"] = round(c.speedup - row["speedup"], 3)
    if c.max_size is not None and row["size"] > c.max_size:
        out["max_size"] = row["size"] - c.max_size
    if c.max_latency_ms is not None and row.get("latency") is not None and row["latency"] > c.max_latency_ms:
        out["max_latency_ms"] = round(row["latency"] - c.max_latency_ms, 4)
    return out


def _shortfall(m: dict, cfg: SearchConfig) -> float:
    """Misses relative to their limits, summed: how 'close' an infeasible trial is."""
    c = cfg.constraints
    scale = {"max_drop": max(c.max_drop or 0, 0.01), "speedup": c.speedup or 1, "max_size": c.max_size or 1,
             "max_latency_ms": c.max_latency_ms or 1}
    return sum(v / scale[k] for k, v in m.items())


# -- one trial ------------------------------------------------------------------------------------------
def scale_epochs(doc: dict, first: int, factor: float) -> dict:
    """Low fidelity: every ``epochs`` inside stages ``first..`` times ``factor`` (at least 1)."""
    def walk(node):
        if isinstance(node, dict):
            return {k: (max(1, round(v * factor)) if k == "epochs" and isinstance(v, int) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    doc = dict(doc)
    doc["stages"] = doc["stages"][:first] + [walk(s) for s in doc["stages"][first:]]
    return doc


def bench_config(cfg: SearchConfig):
    from compress.measure.config import BenchmarkConfig

    need_latency = "latency" in cfg.objectives or cfg.constraints.speedup or cfg.constraints.max_latency_ms
    b = cfg.backend
    return BenchmarkConfig(split="val", latency=bool(need_latency), backends=[b.name], batch_sizes=[b.batch_size],
                           runs=b.runs, warmup=5, threads=b.threads, max_seconds=b.max_seconds, gpu=False,
                           macs="macs" in cfg.objectives, zipped=False, progress=False)


def deployable(state, result, run_dir: Path):
    """The trial's model as a Subject sized by the file the chain ends with: the ONNX file a stage wrote (int8
    PTQ), a packed ``.cpk`` (run by the ONNX file read back from it, or by the model read back), else the
    PyTorch model saved to disk."""
    from compress.checkpoint import save_model
    from compress.measure.subject import Subject

    art = Path(result.artifact) if result is not None and result.artifact else None
    if art is not None and art.suffix == ".onnx":
        return Subject(None, art, art)
    if art is not None and result.onnx:
        return Subject(None, Path(result.onnx), art)
    if art is not None:
        return Subject(state.model, None, art)
    return Subject(state.model, None, save_model(state.model, Path(run_dir) / "model.pt"))


def subject_of(row: dict):
    """A measured row's model again (the chosen one, at the end): its ONNX file when one runs it."""
    from compress.measure.subject import Subject

    if row.get("onnx"):
        return Subject(None, Path(row["onnx"]), Path(row["file"]))
    if Path(row["file"]).suffix == ".cpk":
        from compress.checkpoint import load_model

        return Subject(load_model(row["file"]), None, Path(row["file"]))
    return Subject.load(row["file"])


def evaluate_subject(subject, data, split: str) -> dict:
    from compress.evaluation import evaluate
    from compress.runtime.onnx import evaluate_onnx

    return evaluate_onnx(subject.onnx, data, split) if subject.onnx is not None else evaluate(subject.model, data, split)


def measure_subject(subject, data, cfg: SearchConfig, baseline, metric: str, split: str = "val") -> dict:
    from compress.measure.row import measure

    metrics = evaluate_subject(subject, data, split)
    row = measure(subject, data, bench_config(cfg), metrics=metrics, baseline=baseline, desc="trial")
    out = {"accuracy": metrics[metric], "size": row["size_bytes"], "n_params": row["params"], "macs": row.get("macs"),
           "file": str(subject.file)}
    if subject.onnx is not None and subject.onnx != subject.file:
        out["onnx"] = str(subject.onnx)
    lat = row.get("latency", {}).get(cfg.backend.name, {}).get(cfg.backend.batch_size)
    if lat is None:  # JSON-loaded rows key batch sizes as strings
        lat = row.get("latency", {}).get(cfg.backend.name, {}).get(str(cfg.backend.batch_size))
    if lat:
        out.update(latency=lat["median_ms"], speedup=lat.get("speedup"), baseline_latency=lat.get("baseline_median_ms"))
    return out


# -- the search -----------------------------------------------------------------------------------------
class Search:
    def __init__(self, doc: dict, cfg: SearchConfig, out: Path, compare: Optional[dict] = None, log=print):
        self.doc, self.cfg, self.out, self.log = doc, cfg, Path(out), log
        self.base_doc = own_files(strip_search(doc), log)
        self.compare_doc = own_files(strip_search(compare), log) if compare is not None else None
        self.base_doc.setdefault("benchmark", {})
        self.base_doc["benchmark"] = {**(self.base_doc["benchmark"] or {}), "split": "val", "progress": False}
        self.first_varied = min(first_stage(self.base_doc, k) for k in cfg.space)
        self.cache = StageCache(self.out / "cache")
        self.seed = cfg.seed if cfg.seed is not None else int(doc.get("seed", 0) or 0)

    # baseline: the first stage's model (the teacher), measured once
    def baseline(self):
        from compress.checkpoint import save_model
        from compress.measure.subject import Subject
        from compress.metrics import primary_metric

        doc = dict(self.base_doc, stages=self.base_doc["stages"][:1])
        state, _ = run_cached(doc, self.out / "baseline", self.cache)
        first = next(iter(doc["stages"][0].values())) or {}
        model = state.teacher if isinstance(first, dict) and first.get("target") == "teacher" else state.model
        path = self.out / "baseline" / "model.pt"
        tmp = save_model(model, path.with_name(f"model.{os.getpid()}.pt"))
        os.replace(tmp, path)  # atomic: a --jobs worker rewrites it while others may read its size
        self.metric, direction = primary_metric(state.data.task)
        self.subject = Subject(model, None, path)
        m = evaluate_subject(self.subject, state.data, "val")
        self.base = {"accuracy": m[self.metric], "metric": self.metric, "higher_better": direction == "max",
                     "size": path.stat().st_size, "file": str(path)}
        return self.base

    @contextmanager
    def measuring(self):
        """One trial measured at a time across ``--jobs`` workers: their timings do not overlap."""
        if self.cfg.jobs == 1:
            yield
        else:
            with file_lock(self.out / ".measure.lock"):
                yield

    def run_one(self, params: dict, fidelity: str, number: int) -> dict:
        doc, low = trial_doc(self.base_doc, params), None
        if fidelity == "low":
            doc = scale_epochs(doc, self.first_varied, self.cfg.fidelity.low)
            low = (self.first_varied, self.cfg.fidelity.data)
        d = check_inside(self.out, self.out / "trials" / f"{number:04d}" / fidelity, "trial folder")
        shutil.rmtree(d, ignore_errors=True)  # what a killed attempt of this trial left
        t0, c0 = time.time(), time.process_time()
        state, result = run_cached(doc, d, self.cache, low)
        subject = deployable(state, result, d)
        with self.measuring():
            measured = measure_subject(subject, state.data, self.cfg, self.subject, self.metric)
        row = {"trial": number, "fidelity": fidelity, "params": params, **measured}
        row["seconds"] = round(time.time() - t0, 2)
        row["cpu_seconds"] = round(time.process_time() - c0, 2)  # this process's own: steadier on a shared machine
        row["dir"] = str(d)
        row["misses"] = misses(row, self.base, self.cfg)
        row["feasible"] = not row["misses"]
        write_text(d / "recipe.yaml", yaml.safe_dump(doc, sort_keys=False))
        return row

    def promote(self, low: dict, full_rows: list[dict], gains: list[float]) -> bool:
        """Full budget only for a trial whose optimistic point the full-budget front does not dominate."""
        if not self.cfg.fidelity.enabled or (self.cfg.fidelity.low >= 1 and self.cfg.fidelity.data >= 1):
            return True
        gain = max(gains) if gains else self.cfg.fidelity.optimism
        sign = 1 if self.base["higher_better"] else -1
        hopeful = dict(low, accuracy=low["accuracy"] + sign * max(gain, 0.0))
        dirs = self.cfg.objectives
        if any(dominates(f, hopeful, dirs) for f in pareto(full_rows, dirs)):
            return False
        # The speedup does not depend on the epochs: once some trial is feasible, a clear miss stays one.
        if any(r["feasible"] for r in full_rows) and "speedup" in low["misses"] \
                and low["speedup"] is not None and low["speedup"] < 0.9 * self.cfg.constraints.speedup:
            return False
        return True


def own_files(doc: dict, log) -> dict:
    """Without the stages' ``path`` options (``export.path``): every trial would write that one file outside
    the search directory; a trial's file stays in its trial folder (chosen/ gets the chosen one)."""
    for i, stage in enumerate(doc["stages"]):
        for name, options in stage.items() if isinstance(stage, dict) else ():
            if isinstance(options, dict) and "path" in options:
                stage[name] = {k: v for k, v in options.items() if k != "path"}
                log(f"[search] stages.{i}.{name}.path is not written by a search: each trial's file stays in "
                    "its trial folder, the chosen one in chosen/")
    return doc


def _sampler(optuna, name: str, seed: int, constraints):
    if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna 5: constraints travel with the trial
        constraints = None
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8, constraints_func=constraints)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constraints_func=constraints)


def _suggest(trial, space: dict) -> dict:
    params = {}
    for key, spec in space.items():
        r = range_spec(spec)
        if r is None:  # categorical: Optuna stores primitives, so each choice goes in as its JSON text
            params[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in spec]))
        elif r.int:
            params[key] = trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            params[key] = trial.suggest_float(key, r.low, r.high, step=r.step, log=r.log)
    return params


def _rows(study) -> list[dict]:
    return [r for t in study.trials for r in t.user_attrs.get("rows", [])]


def search(recipe_or_doc: Any, config: Optional[SearchConfig] = None, *, out: Optional[str | Path] = None,
           resume: bool = False, force: bool = False, trials: Optional[int] = None,
           time_limit: Optional[float] = None, compare: Any = None, jobs: Optional[int] = None,
           log=print) -> SearchResult:
    """Search the recipe's ``search.space`` for the best model meeting ``search.constraints``.

    ``recipe_or_doc``: a recipe path or document with a ``search:`` section (``config`` replaces that
    section). Writes ``trials.jsonl``, ``front.json``, ``result.json``, ``chosen/`` and ``search.html`` to ``out``
    (default: ``runs/<name>-search``, made unique), a folder with the rules of a run directory: marked as
    compress's, locked while the search lives, replaced by ``force`` only if compress made it.
    """
    optuna = require_optuna()
    from compress.recipe import read_yaml

    doc = read_yaml(recipe_or_doc) if isinstance(recipe_or_doc, (str, Path)) else dict(recipe_or_doc)
    if config is not None:
        doc["search"] = config.model_dump(exclude_none=True)
    cfg = parse_search(doc)
    if trials is not None:
        cfg.trials = trials
    if jobs is not None:
        cfg.jobs = jobs
    limit = time_limit if time_limit is not None else cfg.time_limit
    cmp_doc = None
    if compare is not None:
        cmp_doc = read_yaml(compare) if isinstance(compare, (str, Path)) else dict(compare)
        trial_doc(strip_search(cmp_doc), {}, where="--compare")
    name = str(doc.get("name", "search"))
    out, lock = open_run_dir(Path(out) if out is not None else None, Path("runs") / f"{name}-search", name,
                             resume=resume, force=force, saved=SAVED)
    try:
        with redacting(_environment_values(doc, cmp_doc)):  # baseline/, cache/, trials/ keep ${VAR}
            return _search(optuna, doc, cfg, out, resume, limit, cmp_doc, log)
    finally:
        lock.release()


def _environment_values(*docs: Optional[dict]) -> dict[str, str]:
    """value -> variable for the ``${VAR}``s the recipes read (what no saved file may hold)."""
    from compress.variables import interpolate

    used: dict[str, str] = {}
    for d in docs:
        if d is not None:
            interpolate(d, used=used)
    return used


def _search(optuna, doc: dict, cfg: SearchConfig, out: Path, resume: bool, limit: Optional[float],
            cmp_doc: Optional[dict], log) -> SearchResult:
    """The search in ``out``, which this process has locked."""
    from compress.recipe import read_yaml

    for name in OWN:
        check_inside(out, out / name, f"{out}: {name}")
    db = out / "study.db"
    if resume:
        if not db.is_file():
            raise CompressError(f"{out}: no search to resume (no study.db)")
        if read_yaml(out / SAVED) != doc:
            raise RecipeError("search", f"the recipe differs from the one of the search being resumed in {out}")
    write_text(out / SAVED, yaml.safe_dump(doc, sort_keys=False))
    study = open_study(optuna, db, out, cfg)

    started = time.time()
    s = Search(doc, cfg, out, cmp_doc, log)
    base = s.baseline()
    log(f"[search] baseline (stage 0's model): val {base['metric']} {base['accuracy']:.4f}, {base['size']} bytes")
    TS = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING, TS.WAITING)):  # killed mid-trial
        study.tell(t.number, state=TS.FAIL)
        log(f"[search] trial {t.number} was cut short by a kill; it runs again")
    if cfg.jobs == 1:
        stopped = work(optuna, study, s, started, limit)
    else:
        stopped = _parallel(optuna, study, s, doc, started, limit)
    return _finish(optuna, s, study, started, stopped)


def _parallel(optuna, study, s: "Search", doc: dict, started: float, limit: Optional[float]) -> str:
    """``jobs - 1`` worker processes beside this one, on the same study.db and stage cache (processes, not
    threads: training is Python-bound at these model sizes, so threads would share one core)."""
    import multiprocessing
    import pickle

    import torch

    try:
        pickle.dumps(s.log)
        quiet = False
    except Exception:  # a lambda: the workers stay quiet
        quiet = True
    threads = torch.get_num_threads()
    per_job = max(1, (os.cpu_count() or 1) // s.cfg.jobs)
    ctx = multiprocessing.get_context("spawn")  # fork after torch and SQLite are initialised is unsafe
    stats = ctx.Queue()  # each worker's stage-reuse counts, merged into the search's
    procs = [ctx.Process(target=_worker, args=(doc, s.cfg.model_dump(), str(s.out), started, limit,
                                               None if quiet else s.log, per_job, stats))
             # not daemonic: a worker may start DataLoader processes (data.num_workers); joined below
             for _ in range(s.cfg.jobs - 1)]
    for p in procs:
        p.start()
    torch.set_num_threads(per_job)
    try:
        stopped = work(optuna, study, s, started, limit)
    finally:
        torch.set_num_threads(threads)
        for p in procs:
            p.join()
    while not stats.empty():
        s.cache.merge(stats.get())
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise CompressError(f"{len(failed)} search worker(s) failed (exit status {failed[0]}); "
                            "their trials run again with --resume")
    return stopped


def _worker(doc: dict, cfg: dict, out: str, started: float, limit: Optional[float], log, threads: int,
            stats) -> None:
    """One ``--jobs`` worker process: the baseline from the cache (never trained here), then trials."""
    import torch

    torch.set_num_threads(threads)
    optuna = require_optuna()
    s = Search(doc, SearchConfig(**cfg), Path(out), None, log or (lambda *_: None))
    with redacting(_environment_values(doc)):
        s.baseline()
        work(optuna, optuna.load_study(study_name="search", storage=_storage(optuna, Path(out) / "study.db")),
             s, started, limit)
    stats.put(s.cache.stats())


def _storage(optuna, db: Path):
    """SQLite shared by worker processes: a writer waits for the others rather than failing at once."""
    return optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 120}})


@contextmanager
def file_lock(path: Path):
    """An exclusive lock between the processes of one search (fcntl; released when the process dies)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pause_while_measuring(path: Path):
    """A trainer hook for ``--jobs`` workers: after every optimizer step, wait while another worker holds the
    measurement lock, so a trial's latency is timed with no training running beside it."""
    import fcntl

    from compress.hooks import Hook

    class Pause(Hook):
        def __init__(self):
            self.f = open(path, "a")

        def after_step(self, trainer) -> None:
            fcntl.flock(self.f, fcntl.LOCK_SH)  # blocks only while a measurement holds LOCK_EX
            fcntl.flock(self.f, fcntl.LOCK_UN)

    return Pause()


def work(optuna, study, s: "Search", started: float, limit: Optional[float]) -> str:
    """Ask, run and tell trials until the study holds ``trials`` (finished or running); return why it stopped
    early ('' when it did not). Every worker of a search runs this loop on the same study."""
    if s.cfg.jobs == 1:
        return _trials(optuna, study, s, started, limit)
    from compress.trainer import PROCESS_HOOKS

    PROCESS_HOOKS[:] = [pause_while_measuring(s.out / ".measure.lock")]
    try:
        return _trials(optuna, study, s, started, limit)
    finally:
        PROCESS_HOOKS.pop().f.close()


def _trials(optuna, study, s: "Search", started: float, limit: Optional[float]) -> str:
    cfg = s.cfg
    TS = optuna.trial.TrialState
    def constraints(t):  # Optuna's feasibility-aware sampling: <= 0 means met
        return t.user_attrs.get("violation", [0.0])

    def finished():
        return study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED))

    low_fi = cfg.fidelity.enabled and (cfg.fidelity.low < 1 or cfg.fidelity.data < 1)
    while True:
        with file_lock(s.out / ".ask.lock"):  # counting and asking as one step: no worker overshoots `trials`
            ordinal = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED, TS.RUNNING)))
            if ordinal >= cfg.trials:
                return ""
            if limit and time.time() - started > limit:
                return f"time limit reached after {len(finished())} trials"
            # A fresh sampler seeded by how many trials came before this one: a resumed search samples what an
            # uninterrupted one would have (the sampler's random state is not in the storage), and with --jobs
            # the k-th trial asked gets the k-th seed whatever the other workers are doing.
            study.sampler = _sampler(optuna, cfg.sampler, s.seed * 100003 + ordinal, constraints)
            trial = study.ask()
            params = _suggest(trial, cfg.space)
        rows = []
        if low_fi:
            rows.append(s.run_one(params, "low", trial.number))
        done = [t.user_attrs.get("rows", []) for t in finished()]
        full_rows = [r for rs in done for r in rs if r["fidelity"] == "full"]
        gains = [rs[1]["accuracy"] - rs[0]["accuracy"] for rs in done if len(rs) == 2]
        if not low_fi or s.promote(rows[0], full_rows, gains):
            rows.append(s.run_one(params, "full", trial.number))
        last = rows[-1]
        trial.set_user_attr("rows", rows)
        violation = _shortfall(last["misses"], cfg) if last["misses"] else -1.0
        trial.set_user_attr("violation", [violation])
        if hasattr(trial, "set_constraint"):
            trial.set_constraint("constraints", violation)
        if last["fidelity"] == "full":
            study.tell(trial, [last[k] for k in cfg.objectives])
        else:
            study.tell(trial, state=TS.PRUNED)
        with file_lock(s.out / ".ask.lock"):
            _write_rows(s.out, _rows(study))
        s.log(f"[search] trial {trial.number} ({last['fidelity']}): {_describe(last, cfg)} {json.dumps(params)}")


def _describe(r: dict, cfg: SearchConfig) -> str:
    bits = [f"acc {r['accuracy']:.4f}", f"{r['size']} B"]
    if r.get("latency") is not None:
        bits.append(f"{r['latency']:.3f} ms ({r.get('speedup') or 0:.1f}x)")
    bits.append("meets constraints" if r["feasible"] else "misses " + ", ".join(f"{k} by {v}" for k, v in r["misses"].items()))
    return ", ".join(bits)


def _write_rows(out: Path, rows: list[dict]) -> None:
    write_text(out / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _finish(optuna, s: Search, study, started: float, stopped: str) -> SearchResult:
    from compress.search.explain import explain

    cfg, out = s.cfg, s.out
    rows = _rows(study)
    full = [r for r in rows if r["fidelity"] == "full"]
    front = pareto(full, cfg.objectives)
    feasible = [r for r in full if r["feasible"]]
    order = list(cfg.objectives.items())

    def key(r):  # the first objective decides, the next ones break ties
        return tuple(-r[k] if d == "max" else r[k] for k, d in order)

    chosen = min(feasible, key=key) if feasible else None
    closest = [] if chosen else sorted(full, key=lambda r: (_shortfall(r["misses"], cfg), key(r)))[:3]
    picked = [dict(r) for r in ([chosen] if chosen else closest)]  # copies: the trial rows stay as measured
    if chosen:
        chosen = picked[0]
    else:
        closest = picked
    # The test split, once, at the end, for the chosen model (or the closest ones).
    from compress.data import create_data
    from compress.recipe import parse_recipe

    data = create_data(parse_recipe(s.base_doc).data)
    split = "test" if data.has("test") else "val"
    test, cmp_row = None, None
    chosen_dir = out / "chosen"
    shutil.rmtree(chosen_dir, ignore_errors=True)
    for i, r in enumerate(picked):
        src = Path(r["file"])
        if not src.is_file():
            raise CompressError(f"{src}: trial {r['trial']}'s model file is missing; run the search again with --force")
        dest = chosen_dir if chosen else chosen_dir / f"closest_{i}"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)
        shutil.copy2(Path(r["dir"]) / "recipe.yaml", dest / "recipe.yaml")
        r["chosen_file"] = str(dest / src.name)
        if r.get("onnx"):  # the ONNX file read back from the packed one: what ONNX Runtime runs
            shutil.copy2(r["onnx"], dest / Path(r["onnx"]).name)
            r["chosen_onnx"] = str(dest / Path(r["onnx"]).name)
    if picked:
        subj = subject_of({"file": picked[0]["chosen_file"], "onnx": picked[0].get("chosen_onnx")})
        test = {"split": split, **measure_subject(subj, data, cfg, s.subject, s.metric, split)}
        test["baseline_accuracy"] = evaluate_subject(s.subject, data, split)[s.metric]
        if s.compare_doc is not None:
            cmp_row = _compare(s, subj, data, split)
    if chosen:
        message = (f"chosen: trial {chosen['trial']} ({_describe(chosen, cfg)}); "
                   f"test {s.metric} {test['accuracy']:.4f}")
    else:
        message = ("no trial meets the constraints; the closest: " +
                   "; ".join(f"trial {r['trial']} misses " + ", ".join(f"{k} by {v}" for k, v in r["misses"].items())
                             for r in closest)) if closest else "no trial finished at the full budget"
    if stopped:
        message += f" ({stopped})"
    reuse = s.cache.stats()
    res = SearchResult(out, rows, front, chosen, closest, test, cmp_row, s.base, reuse, round(time.time() - started, 1),
                       message, explain(optuna, study, rows, cfg, s.seed))
    write_json(out / "front.json", front)
    write_json(out / "result.json", {k: (str(v) if isinstance(v, Path) else v) for k, v in res.__dict__.items() if k != "rows"})
    from compress.search.page import write_page

    write_page(res, cfg, out / "search.html")
    return res


def _compare(s: Search, chosen, data, split: str) -> dict:
    """The hand-written recipe, run here (cached prefixes reused) and measured side by side with the choice."""
    doc = strip_search(s.compare_doc)
    doc["benchmark"] = {**(doc.get("benchmark") or {}), "split": "val", "progress": False}
    d = s.out / "compare"
    shutil.rmtree(d, ignore_errors=True)
    state, result = run_cached(doc, d, s.cache)
    subj = deployable(state, result, d)
    val = measure_subject(subj, state.data, s.cfg, s.subject, s.metric, "val")
    test = measure_subject(subj, data, s.cfg, s.subject, s.metric, split)
    # chosen vs hand-written in one interleaved timing: speedup > 1 means the chosen model is faster
    head = measure_subject(chosen, data, s.cfg, subj, s.metric, split)
    return {"val": val, "test": test, "chosen_vs_compare_speedup": head.get("speedup"), "file": str(subj.file)}
