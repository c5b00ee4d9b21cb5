"""The ``distill`` stage: Hinton KD, FitNets hints, teacher ensembles, assistant chains, early-stopped KD.

Everything trains through the shared Trainer; distillation is one Hook that adds the soft-target term
(and hint terms) to the hard-label loss. Teachers are frozen and in eval mode for the whole stage.
Other stages that fine-tune with KD (prune, quantize) get the same hook from ``kd_hook``.
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
from pydantic import Field, field_validator
from torch.utils.data import Dataset

from compress.api import Result, as_data
from compress.config import StrictModel
from compress.data import DataBundle
from compress.distill_losses import KDLoss, combine, hint_loss, kd_term, teacher_target
from compress.errors import RecipeError
from compress.models.registry import ModelSpec
from compress.stages.base import ModelField, StageResult, check_outputs, register_stage
from compress.registry import did_you_mean
from compress.trainer import Batch, Hook, TrainConfig, Trainer, evaluate
from compress.utils import resolve_device


class HintConfig(StrictModel):
    student: str  # module name in the student, as in model.named_modules()
    teacher: str  # module name in the teacher
    weight: float = Field(1.0, ge=0)

    @field_validator("student", "teacher", mode="before")
    @classmethod
    def _index_names(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # nn.Sequential names: '2' in YAML is 2


class DistillConfig(TrainConfig):
    """Training options (epochs, optimizer, ...) plus how the teacher's knowledge enters the loss."""

    loss: KDLoss = "kl"  # the soft term; the hard-label loss is ``hard_loss``
    hard_loss: Literal["auto", "cross_entropy", "mse", "masked_mse"] = "auto"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.1, ge=0, le=1)  # weight of the hard-label loss (classification)
    beta: float = Field(1.0, ge=0)  # weight of the teacher term (loss: regression)
    hints: list[HintConfig] = []
    # 'recipe' (the recipe's teacher), 'previous' (the model the previous stage produced), a model spec
    # with a checkpoint, or a list of these (an ensemble).
    teacher: ModelField = "recipe"
    teacher_weights: Optional[list[Annotated[float, Field(ge=0)]]] = None
    teacher_epoch: Optional[int] = Field(None, ge=1)  # early-stopped teacher: that epoch's checkpoint
    kd_until_epoch: Optional[int] = Field(None, ge=0)  # KD term for epochs 1..k, hard labels after
    cache_teacher: Union[Literal["auto"], bool] = "auto"
    student: ModelField = None  # build a new student of this spec (teacher-assistant chains)

    def trainer_config(self) -> TrainConfig:
        fields = set(TrainConfig.model_fields) - {"loss"}
        return TrainConfig(**self.model_dump(include=fields), loss=self.hard_loss)


class IndexedDataset(Dataset):
    """Yields (x, y, index) so the trainer's ``Batch.index`` can look cached teacher outputs up."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return x, y, i


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"layer output is {type(out).__name__}, not a tensor")


def _layer(model: nn.Module, name: str, role: str, path: str) -> nn.Module:
    layers = dict(model.named_modules())
    if name in layers and name != "":
        return layers[name]
    names = [n for n in layers if n]
    shown = ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    raise RecipeError(path, f"no layer '{name}' in the {role}; layers are {shown}{did_you_mean(name, names)}")


def _adapter(s_shape: torch.Size, t_shape: torch.Size, path: str) -> nn.Module:
    """A learned map from the student's feature width to the teacher's (FitNets regressor)."""
    if s_shape == t_shape:
        return nn.Identity()
    if len(s_shape) == len(t_shape) == 4 and s_shape[2:] == t_shape[2:]:
        return nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1)
    if len(s_shape) == len(t_shape) and len(s_shape) >= 2 and s_shape[:-1] == t_shape[:-1]:
        return nn.Linear(s_shape[-1], t_shape[-1])
    raise RecipeError(path, f"the student's feature of shape {tuple(s_shape[1:])} cannot be mapped to the teacher's "
                            f"{tuple(t_shape[1:])} (a 1x1 conv needs equal spatial sizes, a linear map equal leading dims)")


class DistillHook(Hook):
    """Adds the KD term and hint terms to the trainer's hard-label loss."""

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], cfg: DistillConfig,
                 weights: Sequence[float], example: torch.Tensor, path: str = "distill"):
        self.teachers, self.cfg, self.weights, self.path = list(teachers), cfg, list(weights), path
        self.active = True
        self.cache: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None
        self._input: Optional[torch.Tensor] = None
        self._s_feats: dict[int, torch.Tensor] = {}
        self._t_feats: dict[int, torch.Tensor] = {}
        self._frozen: Optional[list] = None
        self._handles: list = []
        self._student_handles: list = []
        self.adapters = nn.ModuleList()
        try:  # a bad layer name must not leave hooks behind on either model
            self._bind(student)
            for i, h in enumerate(cfg.hints):
                t_layer = _layer(self.teachers[0], h.teacher, "teacher", f"{path}.hints[{i}].teacher")
                self._handles.append(t_layer.register_forward_hook(self._store(self._t_feats, i)))
            if cfg.hints:
                self._build_adapters(example, path)
        except Exception:
            self.close()
            raise

    def __deepcopy__(self, memo):
        # A deep copy of the student (EMA, snapshots, prune's revert point) reaches this hook through its
        # forward pre-hook; sharing it keeps the teachers and the output cache from being copied with it.
        return self

    def _bind(self, student: nn.Module) -> None:
        """Hook the input and hint layers of ``student``; prune's later fits train a reverted copy."""
        self._unbind()
        self.student = student
        self._student_handles = [student.register_forward_pre_hook(self._grab_input)]
        for i, h in enumerate(self.cfg.hints):
            s_layer = _layer(student, h.student, "student", f"{self.path}.hints[{i}].student")
            self._student_handles.append(s_layer.register_forward_hook(self._store(self._s_feats, i)))

    def _unbind(self) -> None:
        for h in self._student_handles:
            h.remove()
        self._student_handles = []

    # -- forward hooks ---------------------------------------------------------------------------
    def _grab_input(self, module, args):
        # The trainer augments inside the loop; the teacher must see the very input the student saw.
        if module.training:
            self._input = args[0]

    @staticmethod
    def _store(into: dict, i: int):
        def hook(module, args, out):
            into[i] = _first_tensor(out)
        return hook

    def _build_adapters(self, example: torch.Tensor, path: str) -> None:
        was = self.student.training
        self.student.eval()  # eval: a probe batch must not move BatchNorm statistics
        with torch.no_grad():
            self.student(example)
            self.teachers[0](example)
        self.student.train(was)
        for i in range(len(self.cfg.hints)):
            self.adapters.append(_adapter(self._s_feats[i].shape, self._t_feats[i].shape, f"{path}.hints[{i}]"))
        self._s_feats.clear()
        self._t_feats.clear()
        self._input = None

    def close(self) -> None:
        self._release()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._input, self.cache = None, None
        self._s_feats.clear()
        self._t_feats.clear()

    # -- teacher outputs -------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = [t(x) for t in self.teachers]
        target = teacher_target(outs, self.weights, self.cfg.temperature, self.cfg.loss)
        return target, [self._t_feats[i] for i in range(len(self.cfg.hints))]

    @torch.no_grad()
    def build_cache(self, data: DataBundle, device: torch.device) -> None:
        """Teacher targets (and hint features) for every training example, in dataset order."""
        targets, feats = [], [[] for _ in self.cfg.hints]
        for raw in data.loader("train", shuffle=False, batch_size=data.eval_batch_size):
            t, f = self.teacher_outputs(raw[0].to(device))
            targets.append(t)
            for acc, v in zip(feats, f):
                acc.append(v)
        self.cache = (torch.cat(targets), [torch.cat(v) for v in feats])

    # -- Hook API --------------------------------------------------------------------------------
    def parameters(self):
        return self.adapters.parameters()

    def on_fit_start(self, trainer) -> None:
        # Teachers are frozen for each fit only: a later stage may train the recipe's teacher again.
        if trainer.model is not self.student or not self._student_handles:
            self._bind(trainer.model)
        for t in self.teachers:
            t.to(trainer.device)
        self.adapters.to(trainer.device)
        if self._frozen is None:
            self._frozen = freeze(self.teachers)

    def on_fit_end(self, trainer) -> None:
        self._release()

    def _release(self) -> None:
        """Detach from the student (deep copies of it must not carry this hook) and restore the teachers."""
        self._unbind()
        self._input = None
        if self._frozen is not None:
            unfreeze(self.teachers, self._frozen)
            self._frozen = None

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.active = self.cfg.kd_until_epoch is None or epoch < self.cfg.kd_until_epoch

    def loss(self, trainer, batch: Batch, outputs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return loss
        if self.cache is not None and batch.index is not None:
            idx = batch.index.to(self.cache[0].device)
            target, feats = self.cache[0][idx], [f[idx] for f in self.cache[1]]
        else:
            target, feats = self.teacher_outputs(self._input)
        cfg = self.cfg
        total = combine(loss, kd_term(outputs, target, cfg.temperature, cfg.loss), cfg.loss, cfg.alpha, cfg.beta)
        for i, (h, adapter) in enumerate(zip(cfg.hints, self.adapters)):
            total = total + h.weight * hint_loss(adapter(self._s_feats[i]), feats[i])
        return total

    def state_dict(self) -> dict:
        return {"adapters": self.adapters.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("adapters"):
            self.adapters.load_state_dict(state["adapters"])


def freeze(models: Sequence[nn.Module]) -> list:
    """Eval mode and no gradients; returns the previous flags (plain data, so a hook holding them copies)."""
    saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval().requires_grad_(False)
    return saved


def unfreeze(models: Sequence[nn.Module], saved: list) -> None:
    for m, (training, flags) in zip(models, saved):
        m.train(training)
        for p, f in zip(m.parameters(), flags):
            p.requires_grad_(f)


@contextmanager
def frozen(models: Sequence[nn.Module]):
    """Eval mode and no gradients for the teachers; their previous flags come back afterwards."""
    saved = freeze(models)
    try:
        yield
    finally:
        unfreeze(models, saved)


def _teacher_weights(cfg: DistillConfig, n: int, path: str) -> list[float]:
    w = cfg.teacher_weights
    if w is None:
        return [1.0 / n] * n
    if len(w) != n:
        raise RecipeError(f"{path}.teacher_weights", f"has {len(w)} weights for {n} teacher{'s' if n > 1 else ''}")
    if sum(w) <= 0:
        raise RecipeError(f"{path}.teacher_weights", "must not all be zero")
    return [v / sum(w) for v in w]


def _cache_reason(cfg: DistillConfig, data: DataBundle) -> Optional[str]:
    """Why cached teacher outputs would be wrong (None: they are exact)."""
    if cfg.augment.random_shift or cfg.augment.hflip:
        return "the trainer augments the inputs (augment:), so the teacher must see each new batch"
    if not data.deterministic:
        return "the data pipeline is not deterministic (random augmentation)"
    if data.train is None:
        return "the training data comes from a user's DataLoader, not a dataset that can be indexed"
    return None


def _check_models(student, teachers, data: DataBundle, cfg: DistillConfig, path: str, teacher_paths: list[str],
                  device: torch.device, alpha_given: bool = False):
    if cfg.loss == "regression" and alpha_given:
        warnings.warn(f"{path}.alpha: has no effect with the regression loss (hard + beta * teacher term); set beta")
    if cfg.loss == "regression" and data.task != "regression":
        raise RecipeError(f"{path}.loss", f"is 'regression' but the data is a {data.task} task; use kl, soft_ce or mse_logits")
    if cfg.loss in ("kl", "soft_ce") and data.task != "classification":
        raise RecipeError(f"{path}.loss", f"'{cfg.loss}' needs class logits but the data is a {data.task} task; use regression")
    if cfg.hints and len(teachers) > 1:
        raise RecipeError(f"{path}.hints", f"hints need a single teacher; this stage has {len(teachers)}")
    x = data.example_input(2).to(device)
    for m in (student, *teachers):
        m.to(device)
    was = student.training
    student.eval()
    with torch.no_grad():
        want = student(x).shape
        for t, tp in zip(teachers, teacher_paths):
            t_was = t.training
            t.eval()
            try:
                got = t(x).shape
            except Exception as exc:
                raise RecipeError(tp, f"the teacher does not accept the data's inputs: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0]}") from None
            finally:
                t.train(t_was)
            if got != want:
                raise RecipeError(tp, f"the teacher's outputs have shape {tuple(got)[1:]} per example but the "
                                      f"student's have {tuple(want)[1:]}; they must match")
    student.train(was)
    return x


def _fit(student: nn.Module, teachers: Sequence[nn.Module], cfg: DistillConfig, data: DataBundle, *,
         path: str, teacher_paths: Optional[list[str]] = None, hooks: Sequence[Hook] = (), **trainer_kwargs) -> dict:
    """Validate, then train ``student`` against ``teachers``; return facts for the report."""
    teacher_paths = teacher_paths or ([f"{path}.teacher"] if len(teachers) == 1 else
                                      [f"{path}.teacher[{j}]" for j in range(len(teachers))])
    weights = _teacher_weights(cfg, len(teachers), path)
    device = resolve_device(cfg.device)
    x = _check_models(student, teachers, data, cfg, path, teacher_paths, device, "alpha" in cfg.model_fields_set)
    reason = _cache_reason(cfg, data)
    if cfg.cache_teacher is True and reason:
        raise RecipeError(f"{path}.cache_teacher", f"is true but {reason}")
    use_cache = cfg.cache_teacher is not False and reason is None
    with frozen(teachers):
        hook = DistillHook(student, teachers, cfg, weights, x, path)
        try:
            hook.adapters.to(device)
            train_data = data
            if use_cache:
                hook.build_cache(data, device)
                train_data = dataclasses.replace(data, train=IndexedDataset(data.train))
            Trainer(student, cfg.trainer_config(), train_data, [hook, *hooks], **trainer_kwargs).fit()
        finally:
            hook.close()
    return {"kd_loss": cfg.loss, "temperature": cfg.temperature, "alpha": cfg.alpha, "teachers": len(teachers),
            "teacher_cache": use_cache}


class KDOptions(StrictModel):
    """KD while another stage fine-tunes (prune, quantize): one teacher, the distill stage's losses."""

    loss: Literal["auto", "kl", "soft_ce", "mse_logits", "regression"] = "auto"  # auto: kl, regression for regression data
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the hard-label loss (classification)
    beta: float = Field(1.0, ge=0)  # weight of the teacher term (regression: hard + beta * soft)


def kd_hook(student: nn.Module, teacher: nn.Module, options: KDOptions, data: DataBundle, *, path: str,
            teacher_path: Optional[str] = None, device: str = "auto") -> DistillHook:
    """The KD hook every stage but distill adds to its fine-tuning (``path``: the options' key path).

    Checks the loss against the task and the teacher's outputs against the student's before any training.
    The hook freezes the teacher for each fit only, follows the trainer's model, and is closed by the caller.
    """
    kind = options.loss if options.loss != "auto" else ("kl" if data.task == "classification" else "regression")
    cfg = DistillConfig(loss=kind, temperature=options.temperature, alpha=options.alpha, beta=options.beta,
                        cache_teacher=False, device=device)
    x = _check_models(student, [teacher], data, cfg, path, [teacher_path or f"{path}.teacher"], resolve_device(device),
                      alpha_given="alpha" in options.model_fields_set)
    hook = DistillHook(student, [teacher], cfg, [1.0], x, path)
    hook._unbind()  # bound at each fit start: until then deep copies of the student (prune's) stay hook-free
    return hook


def distill(student: nn.Module, teacher: nn.Module | str | Path | Sequence, config: DistillConfig | None = None,
            data=None, *, hooks: Sequence[Hook] = (), path: str = "distill", **trainer_kwargs) -> Result:
    """Train ``student`` to match ``teacher`` (a model, a checkpoint path, or a list of them: an ensemble).

    ``config.teacher``/``student``/``teacher_epoch`` are recipe options and are ignored here.
    Returns the trained student and its metrics on the test split (val if there is none).
    """
    from compress.checkpoint import load_model

    data = as_data(data)
    cfg = config or DistillConfig()
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    teachers = [load_model(t) if isinstance(t, (str, Path)) else t for t in teachers]
    trainer_kwargs.setdefault("name", "distill")
    _fit(student, teachers, cfg, data, path=path, hooks=hooks, **trainer_kwargs)
    split = "test" if data.has("test") else "val"
    return Result(student, evaluate(student, data, split, cfg.device))


# -- the recipe stage ------------------------------------------------------------------------------
def _teacher_items(cfg: DistillConfig, path: str) -> list[tuple[Any, str]]:
    value = cfg.teacher
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{path}.teacher", "is an empty list; give at least one teacher")
        return [(v, f"{path}.teacher[{j}]") for j, v in enumerate(value)]
    return [(value, f"{path}.teacher")]


def _teacher_stage(recipe, index: int):
    """The latest earlier ``train`` stage that trained the teacher."""
    for s in reversed(recipe.stages[:index]):
        if s.name == "train" and getattr(s.config, "target", None) == "teacher":
            return s
    return None


def _check_distill(recipe, index: int, cfg: DistillConfig) -> None:
    path = f"stages[{index}].distill"
    items = _teacher_items(cfg, path)
    for item, ipath in items:
        if isinstance(item, ModelSpec):
            if item.checkpoint is None:
                raise RecipeError(f"{ipath}.checkpoint", "a teacher given as a model spec needs trained weights "
                                                         "(checkpoint: path/to/model.pt)")
        elif item == "recipe":
            if recipe.teacher is None:
                raise RecipeError(ipath, "is 'recipe' but the recipe has no 'teacher:' section")
        elif item == "previous":
            if cfg.student is None:
                raise RecipeError(f"{path}.student", "is required with teacher: previous (the current model becomes "
                                                     "the teacher, so give a model spec for the new student)")
        else:
            raise RecipeError(ipath, f"expected 'recipe', 'previous', a model spec mapping or a list of them, got {item!r}")
    _teacher_weights(cfg, len(items), path)
    if cfg.hints and len(items) > 1:
        raise RecipeError(f"{path}.hints", f"hints need a single teacher; this stage has {len(items)}")
    if cfg.cache_teacher is True and (cfg.augment.random_shift or cfg.augment.hflip):
        raise RecipeError(f"{path}.cache_teacher", "is true but the trainer augments the inputs (augment:); "
                                                   "cached teacher outputs would not match the augmented batches")
    if cfg.teacher_epoch is not None:
        if not any(item == "recipe" for item, _ in items):
            raise RecipeError(f"{path}.teacher_epoch", "picks a checkpoint of the recipe's teacher, but teacher is not 'recipe'")
        src = _teacher_stage(recipe, index)
        if src is None or not src.config.save_every_epoch:
            raise RecipeError(f"{path}.teacher_epoch", "needs an earlier 'train' stage with target: teacher and "
                                                       "save_every_epoch: true")
        if cfg.teacher_epoch > src.config.epochs:
            raise RecipeError(f"{path}.teacher_epoch", f"is {cfg.teacher_epoch} but {src.path} trains the teacher "
                                                       f"for {src.config.epochs} epochs")


def _resolve_teacher(state, item, ipath: str, cfg: DistillConfig) -> nn.Module:
    from compress.checkpoint import load_model
    from compress.models import create_model

    if isinstance(item, ModelSpec):
        return create_model(item, state.data.input_shape, state.data.num_outputs)
    if item == "previous":
        return state.model
    if cfg.teacher_epoch is not None:
        src = _teacher_stage(state.recipe, state.stage.index)
        ckpt = state.stage_dir_of(src, create=False) / f"epoch{cfg.teacher_epoch:03d}.pt"
        if not ckpt.is_file():
            raise RecipeError(f"{state.stage.path}.teacher_epoch", f"no checkpoint {ckpt} (did {src.path} stop early?)")
        return load_model(ckpt)
    if state.teacher is None:
        raise RecipeError(ipath, "is 'recipe' but there is no teacher")
    return state.teacher


@register_stage("distill", DistillConfig, "knowledge distillation from a frozen teacher (or ensemble) through the shared trainer",
                check=_check_distill)
def run_distill(state, cfg: DistillConfig) -> StageResult:
    path = state.stage.path
    items = _teacher_items(cfg, path)
    teachers = [_resolve_teacher(state, item, ipath, cfg) for item, ipath in items]
    student = state.model
    if cfg.student is not None:
        from compress.models import create_model

        student = create_model(cfg.student, state.data.input_shape, state.data.num_outputs)
        check_outputs(student, state.data, f"{path}.student")
    if any(t is student for t in teachers):
        raise RecipeError(f"{path}.teacher", "the teacher is the model being trained; give a new student: spec")
    info = _fit(student, teachers, cfg, state.data, path=path, teacher_paths=[p for _, p in items],
                **state.trainer_kwargs())
    return StageResult(student, facts=dict(info))
