"""The KD training hook, the ``kd:`` options block, and the checks that run before any KD training.

Everything distils through the shared Trainer: one Hook adds the soft-target term (and FitNets hint
terms) to the hard-label loss. The distill stage builds it directly; stages that fine-tune with KD
(prune, quantize) get it from ``kd_hook`` with their ``kd:`` block.
"""
from __future__ import annotations

import functools
import warnings
from typing import Annotated, Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import AfterValidator, Field, field_validator

from compress.config import StrictModel
from compress.data import DataBundle
from compress.data.inputs import Inputs, to_device
from compress.errors import RecipeError
from compress.kd.losses import combine, hint_loss, kd_loss, kd_term, known_loss, task_problem, teacher_target
from compress.kd.teachers import freeze, unfreeze
from compress.models.adapter import logits_of
from compress.registry import did_you_mean
from compress.trainer import Batch, Hook
from compress.utils import resolve_device

AUTO_LOSS = {"classification": "kl", "lm": "token_kl"}  # loss: auto, by the data's task (else regression)
KDLossName = Annotated[str, AfterValidator(known_loss)]  # a registered KD loss (compress.kd.losses.KD_LOSSES)


class KDConfig(StrictModel):
    """KD while a stage fine-tunes (the ``kd:`` block of prune and quantize): one teacher, any KD loss."""

    # auto: kl for class labels, regression for real-valued outputs
    loss: Annotated[str, AfterValidator(functools.partial(known_loss, allow_auto=True))] = "auto"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the hard-label loss (classification)
    beta: float = Field(1.0, ge=0)  # weight of the teacher term (regression: hard + beta * soft)

    def resolved(self, task: str) -> "KDConfig":
        """A copy whose ``loss`` is a registered name (``auto`` picked for the data's task)."""
        if self.loss != "auto":
            return self
        return self.model_copy(update={"loss": AUTO_LOSS.get(task, "regression")})


class HintConfig(StrictModel):
    student: str  # module name in the student, as in model.named_modules()
    teacher: str  # module name in the teacher
    weight: float = Field(1.0, ge=0)

    @field_validator("student", "teacher", mode="before")
    @classmethod
    def _index_names(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # nn.Sequential names: '2' in YAML is 2


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"layer output is {type(out).__name__}, not a tensor")


def _is_mapping(x: Any) -> bool:
    """Keyword inputs (a tokenizer's batch); compress's own models take ``Inputs`` as one argument."""
    return isinstance(x, Mapping) and not isinstance(x, Inputs)


def _layer(model: nn.Module, name: str, role: str, path: str) -> nn.Module:
    layers = dict(model.named_modules())
    if name in layers and name != "":
        return layers[name]
    from compress.models.decoder import decoder_layout

    layout = decoder_layout(model)
    if layout is not None and name.isdecimal():  # a decoder LM: hint layer maps name decoder layers by index
        blocks = layout.decoder_layers(model)
        if int(name) < len(blocks):
            return blocks[int(name)]
        raise RecipeError(path, f"the {role} has {len(blocks)} decoder layers (0-{len(blocks) - 1}), not {name}")
    names = [n for n in layers if n]
    shown = ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    raise RecipeError(path, f"no layer '{name}' in the {role}; layers are {shown}{did_you_mean(name, names)}")


class Pooled(nn.Module):
    """A feature pooled to one vector per example: ``[B, C, H, W]`` averaged over space, ``[B, T, D]``
    over tokens (the class token too), anything else flattened after the batch axis."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim == 4:
            return f.mean((2, 3))
        if f.ndim == 3:
            return f.mean(1)
        return f.flatten(1)


def _width(shape: torch.Size) -> int:
    return shape[1] if len(shape) == 4 else shape[-1] if len(shape) == 3 else int(torch.Size(shape[1:]).numel())


def _adapter(s_shape: torch.Size, t_shape: torch.Size, path: str) -> tuple[nn.Module, nn.Module]:
    """(student map, teacher map): a learned map from the student's feature to the teacher's (FitNets
    regressor), and what is done to the teacher's feature before the two are compared.

    Features of one layout keep it: a 1x1 conv between feature maps of one spatial size, a linear map on
    the last axis when the leading axes agree (``[B, T, D]`` tokens, ``[B, D]`` vectors). Anything else
    (a CNN teacher's ``[B, C, H, W]`` map for a ViT student's ``[B, T, D]`` tokens, maps or token counts
    that differ) is compared pooled: both sides averaged to ``[B, width]`` (``Pooled``), then a linear map
    -- the one layout every pair of families shares, with no guess about which token sits where.
    """
    if s_shape == t_shape:
        return nn.Identity(), nn.Identity()
    if len(s_shape) == len(t_shape) == 4 and s_shape[2:] == t_shape[2:]:
        return nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1), nn.Identity()
    if len(s_shape) == len(t_shape) and len(s_shape) in (2, 3) and s_shape[:-1] == t_shape[:-1]:
        return nn.Linear(s_shape[-1], t_shape[-1]), nn.Identity()
    if len(s_shape) < 2 or len(t_shape) < 2:
        raise RecipeError(path, f"the student's feature of shape {tuple(s_shape[1:])} cannot be mapped to the teacher's "
                                f"{tuple(t_shape[1:])}: hints need a batch axis and a feature axis")
    s_w, t_w = _width(s_shape), _width(t_shape)
    return nn.Sequential(Pooled(), nn.Identity() if s_w == t_w else nn.Linear(s_w, t_w)), Pooled()


class DistillHook(Hook):
    """Adds the KD term and hint terms to the trainer's hard-label loss.

    ``cfg`` gives ``loss`` (a registered name), ``temperature``, ``alpha`` and ``beta`` (a KDConfig or a
    DistillConfig); ``hints`` and ``kd_until_epoch`` default to the ones ``cfg`` has, if any.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], cfg, weights: Sequence[float],
                 example: torch.Tensor, path: str = "distill", *, hints: Optional[Sequence[HintConfig]] = None,
                 kd_until_epoch: Optional[int] = None):
        self.teachers, self.cfg, self.weights, self.path = list(teachers), cfg, list(weights), path
        self.hints = list(getattr(cfg, "hints", []) if hints is None else hints)
        self.kd_until_epoch = kd_until_epoch if kd_until_epoch is not None else getattr(cfg, "kd_until_epoch", None)
        kd_loss(cfg.loss, f"{path}.loss")
        self.active = True
        self.cache: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None
        self._input: Optional[torch.Tensor] = None
        self._s_feats: dict[int, torch.Tensor] = {}
        self._t_feats: dict[int, torch.Tensor] = {}
        self._frozen: Optional[list] = None
        self._handles: list = []
        self._student_handles: list = []
        self.adapters = nn.ModuleList()
        self.teacher_maps = nn.ModuleList()  # per hint: the teacher feature as compared (pooled or as is)
        try:  # a bad layer name must not leave hooks behind on either model
            if student is not None:  # compress.kd.Distiller without hints is handed the student's outputs only
                self._bind(student)
            for i, h in enumerate(self.hints):
                t_layer = _layer(self.teachers[0], h.teacher, "teacher", f"{path}.hints[{i}].teacher")
                self._handles.append(t_layer.register_forward_hook(self._store(self._t_feats, i)))
            if self.hints:
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
        for i, h in enumerate(self.hints):
            s_layer = _layer(student, h.student, "student", f"{self.path}.hints[{i}].student")
            self._student_handles.append(s_layer.register_forward_hook(self._store(self._s_feats, i)))

    def _unbind(self) -> None:
        for h in self._student_handles:
            h.remove()
        self._student_handles = []

    # -- forward hooks ---------------------------------------------------------------------------
    def _grab_input(self, module, args):
        # The trainer augments inside the loop; the teacher must see the very input the student saw.
        if module.training and args:  # keyword-only calls (transformers) give Distiller.loss their batch
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
        for i in range(len(self.hints)):
            s_map, t_map = _adapter(self._s_feats[i].shape, self._t_feats[i].shape, f"{path}.hints[{i}]")
            self.adapters.append(s_map)
            self.teacher_maps.append(t_map)
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
        outs = [logits_of(t(**x) if _is_mapping(x) else t(x)) for t in self.teachers]
        target = teacher_target(outs, self.weights, self.cfg.temperature, self.cfg.loss)
        return target, [self.teacher_maps[i](self._t_feats[i]) for i in range(len(self.hints))]

    @torch.no_grad()
    def build_cache(self, data: DataBundle, device: torch.device) -> None:
        """Teacher targets (and hint features) for every training example, in dataset order."""
        targets, feats = [], [[] for _ in self.hints]
        for raw in data.loader("train", shuffle=False, batch_size=data.eval_batch_size):
            t, f = self.teacher_outputs(to_device(raw[0], device))
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
        self.active = self.kd_until_epoch is None or epoch < self.kd_until_epoch

    def loss(self, trainer, batch: Batch, outputs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return loss
        if self.cache is not None and batch.index is not None:
            idx = batch.index.to(self.cache[0].device)
            target, feats = self.cache[0][idx], [f[idx] for f in self.cache[1]]
        else:
            target, feats = self.teacher_outputs(self._input)
        return self.combined(outputs, loss, target, feats, keep=token_mask(outputs, batch.targets))

    def combined(self, outputs: torch.Tensor, hard: torch.Tensor, target: torch.Tensor,
                 feats: Sequence[torch.Tensor], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The hard-label loss mixed with the KD term, plus the hint terms: the one formula of the distill
        stage, the ``kd:`` blocks and ``compress.kd.Distiller``. ``keep``: the token positions the KD term
        averages over (padding left out), one flag per row of ``outputs`` flattened to ``[-1, V]``."""
        cfg = self.cfg
        if keep is not None and keep.numel() * outputs.shape[-1] == outputs.numel():
            vocab, keep = outputs.shape[-1], keep.reshape(-1).to(outputs.device)
            outputs, target = outputs.reshape(-1, vocab)[keep], target.reshape(-1, target.shape[-1])[keep]
        total = combine(hard, kd_term(outputs, target, cfg.temperature, cfg.loss), cfg.loss, cfg.alpha, cfg.beta)
        for i, (h, adapter) in enumerate(zip(self.hints, self.adapters)):
            total = total + h.weight * hint_loss(adapter(self._s_feats[i]), feats[i])
        return total

    def state_dict(self) -> dict:
        return {"adapters": self.adapters.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("adapters"):
            self.adapters.load_state_dict(state["adapters"])


def token_mask(outputs: torch.Tensor, targets: Any) -> Optional[torch.Tensor]:
    """Next-token logits ``[B, T, V]`` with targets ``[B, T]``: the positions whose target is not ignored (-100,
    padding), or None when nothing is ignored or the outputs are not per token."""
    if not (torch.is_tensor(targets) and outputs.ndim >= 3 and tuple(targets.shape) == tuple(outputs.shape[:-1])
            and not targets.is_floating_point()):
        return None
    keep = targets != -100
    return None if bool(keep.all()) else keep


def check_kd(student: nn.Module, teachers: Sequence[nn.Module], data: DataBundle, loss: str, path: str,
             teacher_paths: list[str], device: torch.device, alpha_given: bool = False) -> torch.Tensor:
    """Before any training: the loss fits the task and every teacher takes the data and matches the
    student's outputs. Returns an example batch (on ``device``) for probing hint layers."""
    if alpha_given and kd_loss(loss).extra["mix"] == "beta":
        warnings.warn(f"{path}.alpha: has no effect with the {loss} loss (hard + beta * teacher term); set beta")
    problem = task_problem(loss, data.task)
    if problem:
        raise RecipeError(f"{path}.loss", problem)
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
            if got != want and data.task == "lm" and got[-1] != want[-1]:
                raise RecipeError(tp, f"the teacher predicts {got[-1]} tokens but the student {want[-1]}: teacher and "
                                      "student must share the tokenizer (and vocab_size)")
            if got != want:
                raise RecipeError(tp, f"the teacher's outputs have shape {tuple(got)[1:]} per example but the "
                                      f"student's have {tuple(want)[1:]}; they must match")
    student.train(was)
    return x


def kd_hook(student: nn.Module, teacher: nn.Module, options: KDConfig, data: DataBundle, *, path: str,
            teacher_path: Optional[str] = None, device: str = "auto") -> DistillHook:
    """The KD hook every stage but distill adds to its fine-tuning (``path``: the ``kd:`` block's key path).

    Checks the loss against the task and the teacher's outputs against the student's before any training.
    The hook freezes the teacher for each fit only, follows the trainer's model, and is closed by the caller.
    """
    cfg = options.resolved(data.task)
    x = check_kd(student, [teacher], data, cfg.loss, path, [teacher_path or f"{path}.teacher"], resolve_device(device),
                 alpha_given="alpha" in options.model_fields_set)
    hook = DistillHook(student, [teacher], cfg, [1.0], x, path, hints=[])
    hook._unbind()  # bound at each fit start: until then deep copies of the student (prune's) stay hook-free
    return hook
