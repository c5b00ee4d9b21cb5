"""Runs a recipe: stages in order over one PipelineState, with a run directory and resume."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import yaml

from compress import distributed
from compress.checkpoint import load_model, save_model
from compress.data import create_data
from compress.errors import CompressError, RecipeError
from compress.measure.machine import machine_info
from compress.models import create_model
from compress.models.registry import ImportSpec
from compress.report import write_html
from compress.recipe import Recipe, StageSpec, load_recipe, parse_recipe
from compress.stages.base import STAGES, PipelineState, StageResult, check_outputs, stage_trains
from compress.rundir import check_output_file, latest_run, open_run_dir
from compress.safety import allowing_imports, import_allowed, import_refused, redacting
from compress.utils import append_jsonl, seed_everything, write_json, write_text


def build_state(recipe: Recipe, build_imports: bool = True) -> PipelineState:
    """Data, model and teacher, with the checks that need them built (shapes must agree).

    ``build_imports=False`` leaves a model whose spec imports user code unbuilt (None): its spec's
    syntax is all that is checked, and nothing runs.
    """
    seed_everything(recipe.seed)
    data = create_data(recipe.data)

    def build(spec):
        if spec is None or (isinstance(spec, ImportSpec) and not build_imports):
            return None
        return create_model(spec, data.input_shape, data.num_outputs, data_task=data.task)

    model, teacher = build(recipe.model), build(recipe.teacher)
    if model is not None:
        check_outputs(model, data, "model")
    if teacher is not None:
        check_outputs(teacher, data, "teacher")
    return PipelineState(model=model, data=data, teacher=teacher, recipe=recipe)


def run_stage(state: PipelineState, spec: StageSpec) -> StageResult:
    """Run one stage on ``state`` with its own seed; the state is not changed (``apply`` does that)."""
    state.stage = spec
    seed_everything(state.seed)
    result = STAGES.get(spec.name).obj(state, spec.config)
    if not isinstance(result, StageResult):
        raise TypeError(f"stage {spec.name!r} returned {type(result).__name__}, expected a StageResult")
    return result


def apply(state: PipelineState, result: StageResult) -> None:
    """Hand a stage's models on to the next one."""
    state.model = result.model
    if result.teacher is not None:
        state.teacher = result.teacher


def measure_stage(state: PipelineState, result: StageResult, model_path: Optional[Path]) -> dict:
    """One report row for the stage that just finished; latency interleaved with the first stage's model."""
    from compress.measure.config import BenchmarkConfig
    from compress.measure.row import measure
    from compress.measure.subject import Subject

    cfg = state.recipe.benchmark if state.recipe and state.recipe.benchmark else BenchmarkConfig()
    model = result.subject if result.subject is not None else result.model
    artifact = Path(result.artifact) if result.artifact else model_path
    onnx = Path(result.onnx) if result.onnx else artifact if artifact is not None and artifact.suffix == ".onnx" else None
    baseline = Subject.from_row(state.results[0]) if state.results and cfg.latency else None
    name = state.stage.name if state.stage else "model"
    row = {
        "name": name,
        "index": state.stage.index if state.stage else 0,
        "artifact": str(artifact) if artifact else None,
        "model_file": str(model_path) if model_path else None,
    }
    row.update(measure(Subject(model, onnx, artifact), state.data, cfg, metrics=result.metrics,
                       baseline=baseline, desc=name))
    row.update(result.facts)
    return row


@dataclasses.dataclass
class ReplicaState(PipelineState):
    """The state of a torchrun process other than rank 0: it trains alongside rank 0 but writes nothing
    (no run directory, so no logs, trainer states or checkpoints); it may read earlier stages' files."""

    read_dir: Optional[Path] = None

    def stage_dir_of(self, spec: StageSpec, create: bool = True) -> Optional[Path]:
        if create or self.read_dir is None:
            return None
        return PipelineState.stage_dir_of(dataclasses.replace(self, run_dir=self.read_dir), spec, create=False)


class Pipeline:
    """A recipe, runnable from code: ``Pipeline.from_yaml('recipe.yaml').run(out='runs/x')``."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Pipeline":
        return cls(load_recipe(path, overrides))

    @classmethod
    def from_dict(cls, doc: dict, overrides: list[str] | tuple[str, ...] = ()) -> "Pipeline":
        return cls(parse_recipe(doc, overrides))

    def validate(self, *, allow_import: bool | None = None) -> PipelineState:
        """Everything a run checks before it writes anything.

        A model spec that imports user code is built only when allowed (``allow_import``, else
        ``compress.safety.import_allowed()``); otherwise it is left None and only its syntax is checked.
        """
        with redacting(self.recipe.secrets):
            return build_state(self.recipe, build_imports=import_allowed(allow_import))

    def validate_search(self):
        """The recipe's ``search:`` section as ``compress search`` reads it (None when there is none): a run
        ignores it, but ``compress validate`` vouches for every section (Optuna is not needed for this)."""
        if self.recipe.raw.get("search") is None:
            return None
        from compress.search.config import parse_search

        with redacting(self.recipe.secrets):
            return parse_search(self.recipe.raw)

    def require_imports(self, allow_import: bool | None = None) -> None:
        """Refuse, naming the key path, a recipe that imports user code without the opt-in."""
        found = self.recipe.imports()
        if found and not import_allowed(allow_import):
            path, target = found[0]
            raise RecipeError(path, import_refused(target))

    def default_dir(self) -> Path:
        return self.recipe.output.dir or Path("runs") / self.recipe.name

    def advance(self, state: PipelineState, until: int) -> PipelineState:
        """Run stages ``0 .. until-1`` in memory (no run directory, nothing written), each with its own
        seed as in ``run``: what sensitivity analysis and searches need before the stage they vary."""
        for spec in self.recipe.stages[:until]:
            apply(state, run_stage(state, spec))
        return state

    def run(self, out: str | Path | None = None, *, resume: bool = False, force: bool = False,
            allow_import: bool | None = None, until: Optional[int] = None) -> dict:
        """Run every stage (``until``: only those before that index); return the report (also written
        to ``<run dir>/report.json``).

        ``allow_import``: the recipe's ``import:`` model specs (and checkpoints naming user code) may be
        imported and called (default: the COMPRESS_ALLOW_IMPORT=1 environment variable).
        """
        self.require_imports(allow_import)
        out = Path(out) if out else None
        with distributed.session(), allowing_imports(allow_import), redacting(self.recipe.secrets):
            state = self.validate()
            if not distributed.is_main():
                return self._replica(state, until)
            try:
                run_dir, lock = self._open(out, resume, force)
            except BaseException as exc:
                distributed.broadcast_object({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
                raise
            distributed.broadcast_object({"run_dir": str(run_dir)})
            try:
                return self._run_stages(state, run_dir, resume, until)
            finally:
                lock.release()

    def _open(self, out: Optional[Path], resume: bool, force: bool):
        """Rank 0 (or the only process): check output files, pick and lock the run directory."""
        guess = out or (latest_run(self.default_dir()) if resume else self.default_dir())
        for spec in self.recipe.stages:  # before --force empties anything
            target = getattr(spec.config, "path", None)
            if isinstance(target, Path):
                check_output_file(target, f"{spec.path}.path", guess, force=force, resume=resume)
        run_dir, lock = open_run_dir(out, self.default_dir(), self.recipe.name, resume=resume, force=force)
        try:
            if resume:
                self._check_resumable(run_dir)
        except BaseException:
            lock.release()
            raise
        return run_dir, lock

    def _trains_later(self, index: int, until: Optional[int]) -> bool:
        """Does a stage after ``index`` train (so the other ranks need this point's models)?"""
        return distributed.active() and any(stage_trains(s) for s in self.recipe.stages[index + 1:until])

    def _replica(self, state: PipelineState, until: Optional[int]) -> dict:
        """Ranks > 0: train in the stages that train, take rank 0's models after those that run once."""
        got = distributed.broadcast_object(None)
        if "error" in got:  # rank 0 could not open the run directory and says why; this rank ends quietly
            raise CompressError(got["error"])
        state = ReplicaState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(PipelineState)},
                             read_dir=Path(got["run_dir"]))
        first = distributed.broadcast_object(None)
        if first > 0 and self._trains_later(first - 1, until):
            state.model, state.teacher = distributed.broadcast_object(None)
        for spec in self.recipe.stages[first:until]:
            state.stage = spec
            if stage_trains(spec):
                apply(state, run_stage(state, spec))
            elif self._trains_later(spec.index, until):
                state.model, state.teacher = distributed.broadcast_object(None)
        return distributed.broadcast_object(None)

    def _run_stages(self, state: PipelineState, run_dir: Path, resume: bool, until: Optional[int] = None) -> dict:
        state.run_dir = run_dir
        write_text(run_dir / "recipe.yaml", self.recipe.to_yaml())
        tok = getattr(state.data, "tokenizer", None)
        if hasattr(tok, "save") and not isinstance(getattr(self.recipe.data, "tokenizer", None), (str, Path)):
            tok.save(str(run_dir / "tokenizer.json"))  # a tokenizer trained on the corpus: `compress generate` reads it
        started = time.time()
        saved_teacher = None
        stages = self.recipe.stages[:until]
        first, last_done = 0, None
        if resume:
            for spec in stages:
                state.stage = spec
                done = state.stage_dir / "done.json"
                if not (done.is_file() and self._restore(state, spec, done)):
                    break
                saved_teacher, last_done, first = id(state.teacher), spec.index, spec.index + 1
            if first < len(stages):  # the first stage that runs: what a killed run left of it goes
                state.stage = stages[first]
                trim_metrics(run_dir / "metrics.jsonl", last_done, state.stage_dir)
        self._log_start(run_dir, resume)
        distributed.broadcast_object(first)
        if first > 0 and self._trains_later(first - 1, until):
            distributed.broadcast_object((state.model, state.teacher))
        for spec in stages[first:]:
            state.stage = spec
            done = state.stage_dir / "done.json"
            t0 = time.time()
            if stage_trains(spec):
                result = run_stage(state, spec)
            else:
                with distributed.solo():  # runs once, here
                    result = run_stage(state, spec)
            apply(state, result)
            model_path = save_model(state.model, state.stage_dir / "model.pt", meta={"stage": spec.name})
            # The teacher is written only when it changed (trained here, or a new one), not after every stage.
            if state.teacher is not None and (result.subject is state.teacher or id(state.teacher) != saved_teacher):
                teacher_path = save_model(state.teacher, state.stage_dir / "teacher.pt", meta={"stage": spec.name})
                saved_teacher = id(state.teacher)
                if result.subject is state.teacher:
                    model_path = teacher_path
            row = measure_stage(state, result, model_path)
            row["seconds"] = round(time.time() - t0, 2)
            state.results.append(row)
            append_jsonl(run_dir / "metrics.jsonl", {"stage": spec.name, "event": "stage_done", **row})
            write_json(done, row)
            (state.stage_dir / "trainer_state.pt").unlink(missing_ok=True)  # only needed mid-stage
            self._write_report(state, started, until)
            if not stage_trains(spec) and self._trains_later(spec.index, until):
                distributed.broadcast_object((state.model, state.teacher))
        return distributed.broadcast_object(self._write_report(state, started, until))

    @staticmethod
    def _log_start(run_dir: Path, resume: bool) -> None:
        """The log's first line (and the console's): how this run runs (processes, backend, devices)."""
        how = distributed.info()
        append_jsonl(run_dir / "metrics.jsonl", {"event": "run_start", "resume": resume, **how})
        print(f"[run] {how['world_size']} process{'es' if how['world_size'] > 1 else ''}"
              f"{' (' + how['backend'] + ')' if how['backend'] else ''} on {', '.join(how['devices'])}")

    def _check_resumable(self, out: Path) -> None:
        """Same recipe as the run being resumed; no half-written files left by a killed one."""
        try:
            saved = yaml.safe_load((out / "recipe.yaml").read_text())
        except yaml.YAMLError:
            saved = None
        if not isinstance(saved, dict):
            raise CompressError(f"{out / 'recipe.yaml'}: not a readable recipe; start a new run")
        if saved != self.recipe.raw:
            diff = sorted(k for k in set(saved) | set(self.recipe.raw) if saved.get(k) != self.recipe.raw.get(k))
            raise RecipeError(diff[0] if diff else "", f"differs from the recipe of the run being resumed in {out}; "
                              "resume with the same recipe and --set options, or start a new run")
        for tmp in out.rglob(".*.tmp"):  # utils.atomic_path's temporary files: a write that never finished
            if tmp.is_file():
                tmp.unlink()

    def _restore(self, state: PipelineState, spec: StageSpec, done: Path) -> bool:
        """Take a finished stage's outputs; False (stage and later ones run again) if they do not load."""
        d = done.parent
        try:
            row = json.loads(done.read_text())
            if not isinstance(row, dict):
                raise CompressError(f"{done}: expected a JSON object")
            model = load_model(d / "model.pt")
            teacher = load_model(d / "teacher.pt") if (d / "teacher.pt").is_file() else state.teacher
        except (CompressError, ValueError, OSError) as exc:
            print(f"[{spec.name}] cannot resume from {d}: {str(exc).splitlines()[0]}; running this stage again")
            for later in self.recipe.stages[spec.index:]:  # their inputs come from this stage: none is finished
                ld = state.stage_dir_of(later)
                for f in [ld / "done.json", *ld.glob("trainer_state*.pt")]:
                    f.unlink(missing_ok=True)
            return False
        # The row's files are this stage's own, wherever done.json says they are (it is data, not a pointer).
        if row.get("model_file"):
            old = Path(row["model_file"]).parent  # the stage folder when done.json was written
            if row.get("artifact") and Path(row["artifact"]).parent == old:  # a file of this stage's own (.onnx)
                row["artifact"] = str(d / Path(row["artifact"]).name)
            row["model_file"] = str(d / ("teacher.pt" if Path(row["model_file"]).name == "teacher.pt" else "model.pt"))
        state.model, state.teacher = model, teacher
        state.results.append(row)
        print(f"[{spec.name}] already finished; resumed from {d}")
        return True

    def _write_report(self, state: PipelineState, started: float, until: Optional[int] = None) -> dict:
        report = {"recipe": self.recipe.name, "seed": self.recipe.seed, "run_dir": str(state.run_dir),
                  "seconds": round(time.time() - started, 2), "stages": state.results,
                  "machine": {**machine_info(), **distributed.info()}}
        if getattr(state.data, "description", None):  # the corpus an lm run measured on (Python version, tokens)
            report["data"] = state.data.description
        write_json(state.run_dir / "report.json", report)
        if len(state.results) == len(self.recipe.stages[:until]):  # plots once, when every stage has its row
            write_html(report, state.run_dir / "report.html")
        return report


def trim_metrics(log: Path, last_done: Optional[int], stage_dir: Path) -> None:
    """Before a resumed run goes on, drop the log rows a killed run wrote past what it saved.

    Kept: the rows up to the finished stages' last ``stage_done`` row, then the epochs the next
    stage's saved trainer state holds (the trainer resumes after them); everything else is logged again,
    so no epoch appears twice. An unreadable trainer state is removed: that stage starts over.
    """
    import torch

    saved: set = set()
    for st in sorted(stage_dir.glob("trainer_state*.pt")):
        try:
            history = torch.load(st, map_location="cpu", weights_only=True)["history"]
            saved |= {(r.get("stage"), r.get("epoch")) for r in history}
        except Exception as exc:  # torch raises several types for corrupt files
            print(f"[resume] {st}: unreadable ({type(exc).__name__}); that stage starts over")
            st.unlink()
    if not log.is_file():
        return
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by the kill
            continue
    cut = 0
    if last_done is not None:
        cut = max((i + 1 for i, r in enumerate(rows) if r.get("event") == "stage_done" and r.get("index") == last_done),
                  default=0)
    tail: dict = {}
    for r in rows[cut:]:
        if r.get("event") == "run_start" or (r.get("stage"), r.get("epoch")) in saved and r.get("event") != "stage_done":
            tail.pop((r.get("stage"), r.get("epoch"), r.get("event")), None)
            tail[(r.get("stage"), r.get("epoch"), r.get("event"))] = r  # the last one written is the saved one
    write_text(log, "".join(json.dumps(r) + "\n" for r in rows[:cut] + list(tail.values())))
