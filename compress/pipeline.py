"""Runs a recipe: stages in order over one PipelineState, with a run directory and resume."""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn
import yaml

from compress.checkpoint import load_model, save_model
from compress.data import DataBundle, create_data
from compress.errors import CompressError, RecipeError
from compress.measure import machine_info
from compress.models import create_model
from compress.report import write_html
from compress.recipe import STAGES, Recipe, StageSpec, load_recipe, parse_recipe
from compress.utils import append_jsonl, seed_everything, write_json, write_text


@dataclass
class PipelineState:
    """What flows from stage to stage. A stage takes it and returns it (changed)."""

    model: nn.Module
    data: DataBundle
    teacher: Optional[nn.Module] = None
    recipe: Optional[Recipe] = None
    run_dir: Optional[Path] = None
    results: list[dict] = field(default_factory=list)  # one report row per finished stage
    stage: Optional[StageSpec] = None
    # Set by a stage whose deployable output is not the PyTorch model (an ONNX file, say):
    artifact: Optional[Path] = None
    stage_metrics: Optional[dict] = None  # metrics the stage measured itself (e.g. in ONNX Runtime)
    extra: dict = field(default_factory=dict)  # per-stage facts for the report (sparsity, bits, ...)
    subject: Optional[nn.Module] = None  # the model this stage's row describes, when not ``model``

    @property
    def stage_dir(self) -> Optional[Path]:
        if self.run_dir is None or self.stage is None:
            return None
        d = self.run_dir / "stages" / f"{self.stage.index:02d}_{self.stage.name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def seed(self) -> int:
        base = self.recipe.seed if self.recipe else 0
        return base * 1000 + (self.stage.index if self.stage else 0)

    def trainer_kwargs(self, name: str | None = None) -> dict:
        """Where a stage's trainer logs and keeps its resumable state."""
        d = self.stage_dir
        return {
            "name": name or (self.stage.name if self.stage else "train"),
            "seed": self.seed,
            "log_path": self.run_dir / "metrics.jsonl" if self.run_dir else None,
            "state_path": d / "trainer_state.pt" if d else None,
            "epoch_dir": d,
            "where": self.stage.path if self.stage else None,  # key path in one-line training errors
        }


def build_state(recipe: Recipe) -> PipelineState:
    """Data, model and teacher, with the checks that need them built (shapes must agree)."""
    seed_everything(recipe.seed)
    data = create_data(recipe.data)
    model = create_model(recipe.model, data.input_shape, data.num_outputs)
    teacher = None
    if recipe.teacher is not None:
        teacher = create_model(recipe.teacher, data.input_shape, data.num_outputs)
    check_outputs(model, data, "model")
    if teacher is not None:
        check_outputs(teacher, data, "teacher")
    return PipelineState(model=model, data=data, teacher=teacher, recipe=recipe)


def check_outputs(model: nn.Module, data: DataBundle, path: str) -> None:
    """Run one real batch: the model must accept the data and give one output per class/target."""
    x = data.example_input(2)
    was = model.training
    model.eval()
    try:
        import torch

        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise RecipeError(path, f"the model does not accept the data's inputs of shape {tuple(x.shape[1:])}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        model.train(was)
    want = data.num_outputs
    if out.ndim != 2 or out.shape[1] != want:
        raise RecipeError(path, f"expected outputs of shape (batch, {want}) for the data's "
                                f"{want} {'classes' if data.task == 'classification' else 'targets'}, got {tuple(out.shape)}")


def measure_stage(state: PipelineState, model_path: Optional[Path]) -> dict:
    """One report row for the stage that just finished; latency interleaved with the first stage's model."""
    from compress.measure import BenchmarkConfig, Subject, measure

    cfg = state.recipe.benchmark if state.recipe and state.recipe.benchmark else BenchmarkConfig()
    model = state.subject if state.subject is not None else state.model
    artifact = Path(state.artifact) if state.artifact else model_path
    onnx = artifact if artifact is not None and artifact.suffix == ".onnx" else None
    baseline = Subject.from_row(state.results[0]) if state.results and cfg.latency else None
    name = state.stage.name if state.stage else "model"
    row = {
        "name": name,
        "index": state.stage.index if state.stage else 0,
        "artifact": str(artifact) if artifact else None,
        "model_file": str(model_path) if model_path else None,
    }
    row.update(measure(Subject(model, onnx, artifact), state.data, cfg, metrics=state.stage_metrics,
                       baseline=baseline, desc=name))
    row.update(state.extra)
    return row


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

    def validate(self) -> PipelineState:
        """Everything a run checks before it writes anything."""
        return build_state(self.recipe)

    def default_dir(self) -> Path:
        return self.recipe.output.dir or Path("runs") / self.recipe.name

    def run(self, out: str | Path | None = None, *, resume: bool = False, force: bool = False) -> dict:
        """Run every stage; return the report (also written to ``<run dir>/report.json``)."""
        state = self.validate()
        run_dir = self._prepare_dir(Path(out) if out else None, resume, force)
        state.run_dir = run_dir
        write_text(run_dir / "recipe.yaml", self.recipe.to_yaml())
        started = time.time()
        saved_teacher = None
        for spec in self.recipe.stages:
            state.stage = spec
            done = state.stage_dir / "done.json"
            if resume and done.is_file():
                self._restore(state, spec, json.loads(done.read_text()))
                saved_teacher = id(state.teacher)
                continue
            state.artifact, state.stage_metrics, state.extra, state.subject = None, None, {}, None
            seed_everything(state.seed)
            entry = STAGES.get(spec.name)
            t0 = time.time()
            state = entry.obj(state, spec.config) or state
            model_path = save_model(state.model, state.stage_dir / "model.pt", meta={"stage": spec.name})
            # The teacher is written only when it changed (trained here, or a new one), not after every stage.
            if state.teacher is not None and (state.subject is state.teacher or id(state.teacher) != saved_teacher):
                teacher_path = save_model(state.teacher, state.stage_dir / "teacher.pt", meta={"stage": spec.name})
                saved_teacher = id(state.teacher)
                if state.subject is state.teacher:
                    model_path = teacher_path
            row = measure_stage(state, model_path)
            row["seconds"] = round(time.time() - t0, 2)
            state.results.append(row)
            append_jsonl(run_dir / "metrics.jsonl", {"stage": spec.name, "event": "stage_done", **row})
            write_json(done, row)
            (state.stage_dir / "trainer_state.pt").unlink(missing_ok=True)  # only needed mid-stage
            self._write_report(state, started)
        return self._write_report(state, started)

    def _prepare_dir(self, out: Optional[Path], resume: bool, force: bool) -> Path:
        if resume and force:
            raise CompressError("--resume and --force exclude each other")
        if out is None:
            out = self.default_dir()
            if resume:
                # Only this recipe's directories: runs/<name> and runs/<name>-<n>, not runs/<name>_other.
                candidates = sorted((p for p in out.parent.glob(f"{out.name}*")
                                     if p.name == out.name or re.fullmatch(rf"{re.escape(out.name)}-\d+", p.name)),
                                    key=lambda p: p.stat().st_mtime)
                out = candidates[-1] if candidates else out
            elif out.exists() and not force:
                n = 2
                while out.with_name(f"{out.name}-{n}").exists():
                    n += 1
                out = out.with_name(f"{out.name}-{n}")
        if resume:
            if not (out / "recipe.yaml").is_file():
                raise CompressError(f"{out}: nothing to resume (no recipe.yaml from an earlier run)")
            saved = yaml.safe_load((out / "recipe.yaml").read_text())
            if saved != self.recipe.raw:
                diff = sorted(k for k in set(saved) | set(self.recipe.raw) if saved.get(k) != self.recipe.raw.get(k))
                raise RecipeError(diff[0] if diff else "", f"differs from the recipe of the run being resumed in {out}; "
                                  "resume with the same recipe and --set options, or start a new run")
            return out
        if out.exists() and any(out.iterdir()):
            if not force:
                raise CompressError(f"{out}: run directory exists; use --resume to continue it, --force to replace it, "
                                    "or --out for another one")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _restore(self, state: PipelineState, spec: StageSpec, row: dict) -> None:
        d = state.stage_dir
        state.model = load_model(d / "model.pt")
        if (d / "teacher.pt").is_file():
            state.teacher = load_model(d / "teacher.pt")
        state.results.append(row)
        print(f"[{spec.name}] already finished; resumed from {d}")

    def _write_report(self, state: PipelineState, started: float) -> dict:
        report = {"recipe": self.recipe.name, "seed": self.recipe.seed, "run_dir": str(state.run_dir),
                  "seconds": round(time.time() - started, 2), "stages": state.results, "machine": machine_info()}
        write_json(state.run_dir / "report.json", report)
        if len(state.results) == len(self.recipe.stages):  # plots once, when every stage has its row
            write_html(report, state.run_dir / "report.html")
        return report
