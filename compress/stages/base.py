"""The contract between the pipeline and its stages: the stage registry, model kinds, the state a stage
reads and the typed ``StageResult`` it returns.

Stages import this module, never ``compress.recipe`` or ``compress.pipeline``: the pipeline owns the run
directory's layout (``PipelineState.stage_dir_of``) and applies a stage's result; a stage only reports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import torch
import torch.nn as nn

from compress.config import StrictModel
from compress.errors import RecipeError
from compress.registry import Registry

if TYPE_CHECKING:  # annotations only
    from compress.data import DataBundle
    from compress.recipe import Recipe, StageSpec

# Mark a stage option as a model spec: ``student: ModelField = None``. The mapping given in the recipe is
# parsed by the model registry (with the full key path in errors) right after the stage's own options.
# ``ModelsField`` also takes a list of them (a teacher ensemble); a list given to a ``ModelField`` is an error.
MODEL_SPEC = "compress:model_spec"
MODEL_LIST = "compress:model_spec_list"
ModelField = Annotated[Optional[Any], MODEL_SPEC]
ModelsField = Annotated[Optional[Any], MODEL_SPEC, MODEL_LIST]

# name -> run(state, config) -> StageResult; each entry's config is its options' pydantic class.
STAGES: Registry = Registry("stage")

# What a stage's output model is, for stage-to-stage contracts checked before anything runs:
#   "torch": a trainable float PyTorch model (train, distill, prune take and give this);
#   "fakequant": a PyTorch model with quantizers in it (QAT): trainable, exportable with Q/DQ nodes;
#   "packed": a PyTorch model whose weights are stored packed (weight-only k-bit, binary): runs, not trainable;
#   "onnx": a deployment file (int8 ONNX): only measured or exported from here on.
MODEL_KINDS = ("torch", "fakequant", "packed", "onnx")
KIND_WORDS = {"torch": "a float PyTorch model", "fakequant": "a QAT (fake-quantized) PyTorch model",
              "packed": "a packed low-bit PyTorch model", "onnx": "an ONNX deployment file"}


def register_stage(name: str, config: type[StrictModel], description: str = "", check=None,
                   accepts: tuple[str, ...] = ("torch", "fakequant"), produces=None, trains=None):
    """Register a stage: ``run(state, config) -> StageResult``.

    ``trains(config) -> bool`` says whether it runs the trainer (under torchrun every process runs such a
    stage, data-parallel; others run once); default: it has a TrainConfig with epochs (see ``stage_trains``).

    ``check(recipe, index, config)`` runs at validation time for cross-key rules. ``accepts`` lists the
    model kinds the stage can take; ``produces(config, kind_in) -> kind`` (or a fixed kind; default:
    unchanged) says what it hands on.
    """
    return STAGES.register(name, config=config, description=description, check=check,
                           accepts=tuple(accepts), produces=produces, trains=trains)


def _kinds(stages: list["StageSpec"]):
    """(stage, the model kind it gets, the stage that made that kind or None) along the chain."""
    kind, made_by = "torch", None
    for s in stages:
        yield s, kind, made_by
        produces = STAGES.get(s.name).extra.get("produces")
        new = produces(s.config, kind) if callable(produces) else (produces or kind)
        if new != kind:
            kind, made_by = new, s.path


def kind_before(stages: list["StageSpec"], index: int) -> str:
    """The model kind stage ``index`` of ``stages`` receives (e.g. "onnx" after int8 PTQ)."""
    return next((k for s, k, _ in _kinds(stages) if s.index == index), "torch")


def check_chain(stages: list["StageSpec"]) -> None:
    """Refuse stage orders that cannot work (pruning after an int8 export, say), before any training."""
    for s, kind, made_by in _kinds(stages):
        accepts = STAGES.get(s.name).extra.get("accepts", ("torch",))
        if kind not in accepts:
            source = f" made by {made_by}" if made_by else ""
            raise RecipeError(s.path, f"needs {' or '.join(KIND_WORDS[k] for k in accepts)}, but gets {KIND_WORDS[kind]}"
                                      f"{source}; move this stage before it")


def stage_trains(spec: "StageSpec") -> bool:
    """True if the stage runs the trainer: its ``trains`` rule, else any TrainConfig in its options with epochs."""
    from compress.trainer import TrainConfig

    rule = STAGES.get(spec.name).extra.get("trains")
    if rule is not None:
        return bool(rule(spec.config))

    def scan(cfg) -> bool:
        if isinstance(cfg, TrainConfig):
            return cfg.epochs > 0
        if isinstance(cfg, StrictModel):
            return any(scan(getattr(cfg, k)) for k in type(cfg).model_fields)
        return False

    return scan(spec.config)


@dataclass
class StageResult:
    """What a stage hands back; the pipeline applies it to the state and writes the stage's report row."""

    model: nn.Module  # the model handed to the next stage
    teacher: Optional[nn.Module] = None  # a new or retrained teacher handed on (None: the teacher is unchanged)
    subject: Optional[nn.Module] = None  # the model this row describes, when not ``model`` (a trained teacher)
    artifact: Optional[Path] = None  # the deployable file, when it is not the PyTorch model (an ONNX file)
    onnx: Optional[Path] = None  # the ONNX file that runs this row when the artifact is another file (a packed .cpk)
    metrics: Optional[dict] = None  # task metrics the stage measured itself (e.g. in ONNX Runtime)
    facts: dict = field(default_factory=dict)  # per-stage facts for the report row (sparsity, bits, ...)


@dataclass
class PipelineState:
    """What a stage reads: the current models, the data, the recipe, and where its files go."""

    model: nn.Module
    data: "DataBundle"
    teacher: Optional[nn.Module] = None
    recipe: Optional["Recipe"] = None
    run_dir: Optional[Path] = None
    results: list[dict] = field(default_factory=list)  # one report row per finished stage
    stage: Optional["StageSpec"] = None

    def stage_dir_of(self, spec: "StageSpec", create: bool = True) -> Optional[Path]:
        """The run directory's folder of one stage (the one place that knows the layout)."""
        if self.run_dir is None:
            return None
        d = self.run_dir / "stages" / f"{spec.index:02d}_{spec.name}"
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def stage_dir(self) -> Optional[Path]:
        return self.stage_dir_of(self.stage) if self.stage is not None else None

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


def check_outputs(model: nn.Module, data: "DataBundle", path: str) -> None:
    """Run one real batch: the model must accept the data and give one output per class/target."""
    from compress.data.text import vocab_mismatch

    problem = vocab_mismatch(model, data, path)  # before the forward: an unknown token id is an IndexError there
    if problem is not None:
        raise problem
    x = data.example_input(2)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        what = f"named inputs ({', '.join(x)})" if isinstance(x, dict) else f"inputs of shape {tuple(x.shape[1:])}"
        hint = ("; for image models set model.in_chans or model.adapt_input: {channels: ..., size: [h, w]}"
                if "channels" in str(exc) and not isinstance(x, dict) else
                f"; name the inputs the model takes in {path}.inputs: [{', '.join(x)}]"
                if isinstance(x, dict) and "unknown input" in str(exc) else "")
        raise RecipeError(path, f"the model does not accept the data's {what}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") from None
    finally:
        model.train(was)
    want = data.num_outputs
    if data.task == "lm":  # next-token logits per position; a model may embed more tokens than the tokenizer has
        if out.ndim != 3 or out.shape[:2] != x["input_ids"].shape or out.shape[2] < want:
            raise RecipeError(path, f"expected next-token logits of shape (batch, tokens, >= {want}) for language-model "
                                    f"data, got {tuple(out.shape)}; an hf model needs task: causal_lm (or auto)")
        return
    if out.ndim != 2 or out.shape[1] != want:
        raise RecipeError(path, f"expected outputs of shape (batch, {want}) for the data's "
                                f"{want} {'classes' if data.task == 'classification' else 'targets'}, got {tuple(out.shape)}")
