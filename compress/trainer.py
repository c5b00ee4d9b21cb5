"""One training loop for every stage that trains: train, fine-tune, distill, QAT.

Stages never copy this loop; they pass hooks that add loss terms (KD, regularizers) or act after
each optimizer step (pruning masks, quantizer ranges).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from compress import distributed
from compress.config import StrictModel
from compress.errors import CompressError
from compress.data import DataBundle
from compress.data.inputs import to_device
from compress.evaluation import evaluate  # the trainer validates with it; compress.trainer.evaluate stays public
from compress.metrics import LOSSES, MetricAccumulator, default_loss, primary_metric
from compress.hooks import Hook  # noqa: F401  (stages and models import Hook from here too)

# Hooks every Trainer of this process adds after its own, stateless ones only (the workers of
# `compress search --jobs N` pause here while another worker times a trial).
PROCESS_HOOKS: list[Hook] = []
from compress.utils import append_jsonl, atomic_path, check_device, resolve_device

NONFINITE_CHECK_EVERY = 16  # steps between checks of the loss for inf/nan (each check is one device sync)


class OptimizerConfig(StrictModel):
    # lbfgs: full-batch L-BFGS with a strong-Wolfe line search (KernelNet's optimizer); one epoch = one
    # L-BFGS step of max_iter iterations over one batch holding the whole train split (unless batch_size).
    name: Literal["sgd", "adam", "adamw", "lbfgs"] = "adam"
    lr: float = Field(1e-3, gt=0)
    max_iter: int = Field(20, ge=1)  # lbfgs only
    history_size: int = Field(10, ge=1)  # lbfgs only
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    backbone_lr_mult: float = Field(1.0, ge=0)  # LR of every parameter outside the head = lr x this (fine-tuning)


class SchedulerConfig(StrictModel):
    name: Literal["none", "cosine", "step", "onecycle"] = "none"
    step_size: int = Field(10, ge=1)  # epochs, for 'step'
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)  # linear warm-up before cosine


class EarlyStoppingConfig(StrictModel):
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0)


class AugmentConfig(StrictModel):
    """Batch-level augmentation on image tensors (done in the loop so it also runs on a GPU)."""

    random_shift: int = Field(0, ge=0)  # jitter by up to this many pixels (Hinton's MNIST teacher: 2)
    hflip: bool = False


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=0)
    batch_size: Optional[int] = Field(None, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    loss: Literal["auto", "cross_entropy", "mse", "masked_mse", "token_cross_entropy"] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    early_stopping: Optional[EarlyStoppingConfig] = None
    keep: Literal["best", "last"] = "best"  # weights kept at the end: best validation epoch or last
    save_every_epoch: bool = False
    augment: AugmentConfig = AugmentConfig()
    # Fine-tuning a pretrained model: train only the head for the first k epochs (backbone frozen,
    # its BatchNorm statistics too), then everything. The head is the module named ``head``, or with
    # 'auto' the last Linear/Conv2d with one output per class.
    freeze_backbone_epochs: int = Field(0, ge=0)
    head: str = "auto"
    device: str = "auto"
    # Mixed precision: autocast to bf16/fp16 (fp16 adds a grad scaler); weights and optimizer stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: Union[Literal["auto"], bool] = "auto"  # auto: on CUDA for models with Conv2d layers
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    index: Optional[torch.Tensor] = None  # dataset indices when the loader yields them (teacher cache)


def is_main_process() -> bool:
    """Rank 0 logs and writes files when the same recipe runs under torchrun."""
    return distributed.is_main()


def augment_batch(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not (cfg.random_shift or cfg.hflip):
        return x
    n, _, h, w = x.shape
    if cfg.random_shift:
        # Integer pixel shifts per sample via one grid_sample call (border padding keeps the background).
        shift = torch.randint(-cfg.random_shift, cfg.random_shift + 1, (n, 2), device=x.device).float()
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2] = 2 * shift[:, 0] / w
        theta[:, 1, 2] = 2 * shift[:, 1] / h
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)
    if cfg.hflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def unpack(raw, device) -> Batch:
    x, y, *rest = raw
    idx = rest[0] if rest else None
    return Batch(to_device(x, device, non_blocking=True), y.to(device, non_blocking=True), idx)


class Trainer:
    """Fits ``model`` on ``data.train``, validates on ``data.val``, logs every epoch.

    ``state_path`` makes training resumable: the loop's full state is written there after every
    epoch and picked up again if the file exists.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: DataBundle, hooks: Iterable[Hook] = (),
                 *, name: str = "train", seed: int = 0, log_path: Path | None = None,
                 state_path: Path | None = None, epoch_dir: Path | None = None, where: str | None = None):
        self.model, self.cfg, self.data = model, cfg, data
        self.where = where or name  # the recipe key path of the stage, for error messages
        # A model can bring its own loss terms (KernelNet's kernel regularizer): ``model.training_hooks()``.
        self.hooks = list(hooks) + list(getattr(model, "training_hooks", lambda: [])()) + PROCESS_HOOKS
        self.name, self.seed = name, seed
        self.log_path, self.state_path, self.epoch_dir = log_path, state_path, epoch_dir
        self.device = resolve_device(cfg.device)
        self.loss_fn = LOSSES[default_loss(data.task) if cfg.loss == "auto" else cfg.loss]
        if cfg.label_smoothing and data.task == "classification":
            self.loss_fn = lambda out, y: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        self.metric, self.mode = primary_metric(data.task)
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []

    # -- construction of optimizer and schedule -------------------------------------------------
    def _head_name(self) -> str:
        from compress.models.adapter import head_name

        return head_name(self.model, self.cfg.head, f"{self.where}.head", self.data.num_outputs)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        for h in self.hooks:
            params += list(h.parameters())
        self._backbone: list[nn.Parameter] = []
        if o.backbone_lr_mult != 1.0 or self.cfg.freeze_backbone_epochs:
            # Two groups, head first (its LR is the one logged): head and hook params at lr, the rest lower.
            head = self.model.get_submodule(self._head_name())
            in_head = {id(p) for p in head.parameters()}
            self._backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in in_head]
            backbone_ids = {id(p) for p in self._backbone}
            groups = [{"params": [p for p in params if id(p) not in backbone_ids]}]
            if self._backbone:
                groups.append({"params": self._backbone, "lr": o.lr * o.backbone_lr_mult})
            params = groups
        if o.name == "lbfgs":
            if params and isinstance(params[0], dict):
                raise CompressError("optimizer.name: lbfgs takes one parameter group; drop backbone_lr_mult/freeze_backbone_epochs")
            return torch.optim.LBFGS(params, lr=o.lr, max_iter=o.max_iter, history_size=o.history_size,
                                     line_search_fn="strong_wolfe")
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(params, lr=o.lr, weight_decay=o.weight_decay)

    def _scheduler(self, opt, steps_per_epoch: int):
        s, epochs = self.cfg.scheduler, max(self.cfg.epochs, 1)
        total = epochs * steps_per_epoch
        if s.name == "cosine":
            warm = s.warmup_epochs * steps_per_epoch

            def f(step):
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

            return torch.optim.lr_scheduler.LambdaLR(opt, f)
        if s.name == "step":
            return torch.optim.lr_scheduler.StepLR(opt, s.step_size * steps_per_epoch, s.gamma)
        if s.name == "onecycle":
            max_lr = [g["lr"] for g in opt.param_groups]  # keeps the backbone's lower LR
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=total)
        return None

    def _freeze_backbone(self, frozen: bool) -> None:
        """Head-only epochs: backbone params get no gradient (so no update) and its BatchNorms keep their statistics."""
        for p in self._backbone:
            p.requires_grad_(not frozen)
        if frozen:
            head = self._head_name()
            for name, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (name == head or name.startswith(head + ".")):
                    m.eval()

    def _train_loader(self, generator: torch.Generator):
        """Batches of this process. Under torchrun, shuffling goes through a seeded ``DistributedSampler``
        (set_epoch per epoch), so N processes with a per-process batch of B/N see, step by step, the same
        global batches of B as a 1-process torchrun run does. Without torchrun the loader is the one earlier
        releases used (a RandomSampler on the per-epoch generator), so their results reproduce exactly."""
        from torch.utils.data.distributed import DistributedSampler

        world, pin = distributed.world_size(), self.device.type == "cuda"
        if self.cfg.optimizer.name == "lbfgs" and self.cfg.batch_size is None:  # full batch, as L-BFGS expects
            if world > 1:
                raise CompressError(f"{self.where}: optimizer.name: lbfgs is full-batch and its line search is not "
                                    "data-parallel; run this recipe without torchrun")
            return self.data.loader("train", shuffle=False, batch_size=len(self.data.dataset("train")))
        if not distributed.active():  # one process, or a loader the user built (Python API): as given
            return self.data.loader("train", shuffle=True, batch_size=self.cfg.batch_size, generator=generator)
        batch = self.cfg.batch_size or self.data.batch_size  # the global batch: summed over all processes
        if batch % world:
            raise CompressError(f"{self.where}.batch_size: the batch of {batch} (the global batch, all processes "
                                f"together) does not split evenly over {world} processes; use a multiple of {world}")
        self.sampler = DistributedSampler(self.data.dataset("train"), num_replicas=world, rank=distributed.rank(),
                                          shuffle=True, seed=self.seed, drop_last=False)
        return self.data.loader("train", batch_size=batch // world, sampler=self.sampler, pin_memory=pin)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: DDP around the student under torchrun (the teacher is never wrapped)."""
        if not distributed.active() or not any(p.requires_grad for p in model.parameters()):
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   # head-only epochs leave the backbone without gradients
                   find_unused_parameters=bool(self.cfg.freeze_backbone_epochs))

    def _amp(self):
        """Autocast for bf16/fp16 and the grad scaler fp16 needs (None: plain fp32)."""
        p = self.cfg.precision
        if p == "fp32":
            return None, None
        if self.cfg.optimizer.name == "lbfgs":
            raise CompressError(f"{self.where}.precision: lbfgs runs in fp32; use precision: fp32")
        if p == "fp16" and self.device.type != "cuda":
            raise CompressError(f"{self.where}.precision: fp16 needs a CUDA device (this stage runs on "
                                f"{self.device.type}); use bf16 or fp32")
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        scaler = torch.amp.GradScaler(self.device.type) if p == "fp16" else None
        return dtype, scaler

    def _channels_last(self, model: nn.Module) -> bool:
        c = self.cfg.channels_last
        if c == "auto":
            return self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
        return bool(c)

    def _load_state(self) -> Optional[dict]:
        """The saved loop state, read by rank 0 and sent to the others (they need not see its file)."""
        st = None
        if distributed.is_main() and self.state_path is not None and self.state_path.is_file():
            try:
                st = torch.load(self.state_path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for empty, truncated or foreign files
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty or truncated file"
                st = {"error": f"{self.where}: cannot resume from {self.state_path} ({type(exc).__name__}: "
                               f"{detail}); delete that file to restart this stage from its first epoch"}
        st = distributed.broadcast_object(st)
        if st is not None and "error" in st:
            raise CompressError(st["error"])
        return st

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, model = self.cfg, self.model.to(self.device)
        gen = torch.Generator()
        self.sampler = None
        loader = self._train_loader(gen)
        amp_dtype, scaler = self._amp()
        channels_last = self._channels_last(model)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opt = self._optimizer()
        sched = self._scheduler(opt, max(len(loader), 1))
        best_value, best_state, bad_epochs = None, None, 0
        best_hooks = None  # the hooks' state at the best epoch (FitNets adapters): kept with the weights
        has_val = self.data.has("val") and len(self.data.dataset("val")) > 0
        st = self._load_state()
        if st is not None:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            if sched is not None and st.get("scheduler"):
                sched.load_state_dict(st["scheduler"])
            if scaler is not None and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            for h, hs in zip(self.hooks, st.get("hooks", [])):
                h.load_state_dict(hs)
            self.epoch, self.step, self.history = st["epoch"], st["step"], st["history"]
            best_value, best_state, bad_epochs = st["best_value"], st["best_state"], st["bad_epochs"]
            best_hooks = st.get("best_hooks")
        net = self._wrap(model)  # after the resume: DDP starts every rank from the same weights
        in_model = {id(p) for p in model.parameters()}
        outside = [p for g in opt.param_groups for p in g["params"] if id(p) not in in_model]  # hook adapters
        world = distributed.world_size()
        for h in self.hooks:
            h.on_fit_start(self)
        show = cfg.progress and is_main_process()
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            # Seeding per epoch makes shuffling and dropout identical after a resume (dropout and
            # augmentation differ between ranks, which see different samples).
            gen.manual_seed(self.seed * 100_003 + epoch)
            torch.manual_seed(self.seed * 100_003 + epoch + 7_919 * distributed.rank())
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            for h in self.hooks:
                h.on_epoch_start(self, epoch)
            model.train()
            if cfg.freeze_backbone_epochs:
                self._freeze_backbone(epoch < cfg.freeze_backbone_epochs)
            acc = MetricAccumulator(self.data.task)
            nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
            t0, seen = time.perf_counter(), 0
            for raw in tqdm(loader, desc=f"{self.name} {epoch + 1}/{cfg.epochs}", leave=False,
                            disable=None if show else True):  # None: no bar when not a terminal (CI logs)
                b = unpack(raw, self.device)
                x = augment_batch(b.inputs, cfg.augment)
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                last: dict[str, torch.Tensor] = {}

                def closure() -> torch.Tensor:
                    # A closure because L-BFGS re-evaluates the loss several times per step.
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        out = net(x)
                        loss = base = self.loss_fn(out, b.targets)
                        for h in self.hooks:
                            loss = h.loss(self, b, out, loss)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    if world > 1 and outside:  # DDP averages the model's gradients, not the hooks' own
                        distributed.average_grads_(outside)
                    if cfg.grad_clip:  # everything the optimizer updates, hook parameters (adapters) included
                        if scaler is not None:
                            scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
                    last.update(out=out, base=base, loss=loss.detach())
                    return loss

                if isinstance(opt, torch.optim.LBFGS):
                    opt.step(closure)
                elif scaler is not None:
                    closure()
                    scaler.step(opt)  # skips steps whose gradients overflowed fp16
                    scaler.update()
                else:
                    closure()
                    opt.step()
                out, base = last["out"], last["base"]
                nonfinite = nonfinite | ~torch.isfinite(last["loss"])
                if (self.step + 1) % NONFINITE_CHECK_EVERY == 0 and distributed.any_rank(nonfinite):
                    self._diverged(epoch, opt)
                if sched is not None:
                    sched.step()
                for h in self.hooks:
                    h.after_step(self)
                acc.update(out.detach().float(), b.targets, base.detach().float())
                seen += b.inputs.shape[0]
                self.step += 1
            elapsed = time.perf_counter() - t0
            # Before anything of this epoch is logged or saved: a NaN loss or NaN weights stop here, and
            # the run directory keeps the state of the last good epoch.
            for p in model.parameters():
                nonfinite = nonfinite | ~torch.isfinite(p.detach()).all().to(nonfinite.device)
            if distributed.any_rank(nonfinite):  # one sync per epoch
                self._diverged(epoch, opt)
            distributed.sync_buffers_(model)  # BatchNorm statistics: rank 0's, before validating and saving
            row: dict[str, Any] = {"stage": self.name, "epoch": epoch + 1}
            row.update({f"train_{k}": v for k, v in acc.all_reduce().compute().items()})
            if has_val:
                row.update({f"val_{k}": v for k, v in
                            evaluate(model, self.data, "val", self.device, sharded=True).items()})
            row.update(lr=opt.param_groups[0]["lr"], seconds=round(elapsed, 3),
                       samples_per_s=round(seen * world / max(elapsed, 1e-9), 1))
            for h in self.hooks:
                h.on_epoch_end(self, epoch, row)
            self.history.append(row)
            self.epoch = epoch + 1
            # Keep best weights on the validation metric (or the training loss when there is no val split).
            key = f"val_{self.metric}" if has_val else "train_loss"
            value = row[key]
            maximize = has_val and self.mode == "max"
            delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
            better = best_value is None or (value > best_value + delta if maximize else value < best_value - delta)
            better = distributed.broadcast_object(better)  # decided once, by rank 0, for all ranks
            if better:
                best_value, bad_epochs = value, 0
                if cfg.keep == "best":
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    best_hooks = copy.deepcopy([h.state_dict() for h in self.hooks])
            else:
                bad_epochs += 1
            self._log(row)
            stop = cfg.early_stopping is not None and bad_epochs >= cfg.early_stopping.patience
            if self.epoch_dir is not None and cfg.save_every_epoch and is_main_process():
                from compress.checkpoint import save_model

                save_model(model, self.epoch_dir / f"epoch{self.epoch:03d}.pt", meta=row)
            if stop:
                self._log({"stage": self.name, "event": "early_stop", "epoch": self.epoch, "best": best_value})
                self.epoch = cfg.epochs
            if self.state_path is not None and is_main_process():
                self._save_state(opt, sched, best_value, best_state, bad_epochs, best_hooks, scaler)
        if cfg.freeze_backbone_epochs:
            self._freeze_backbone(False)
        if cfg.keep == "best" and best_state is not None:
            model.load_state_dict(best_state)
            for h, hs in zip(self.hooks, best_hooks or []):
                h.load_state_dict(hs)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)  # export and the next stage get the usual layout
        for h in self.hooks:
            h.on_fit_end(self)
        return self.history[-1] if self.history else {}

    def _diverged(self, epoch: int, opt) -> None:
        lr = opt.param_groups[0]["lr"]
        raise CompressError(f"{self.where}: training diverged in epoch {epoch + 1}/{self.cfg.epochs} (the loss or the weights "
                            f"became inf/nan) and was stopped. Lower the learning rate (now {lr:.3g}) or set grad_clip, and check the "
                            "data for extreme values; finished stages and epochs are kept in the run directory")

    def _save_state(self, opt, sched, best_value, best_state, bad_epochs, best_hooks=None, scaler=None) -> None:
        # The unwrapped model's state_dict: never DDP's "module." prefix.
        st = {"model": self.model.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict() if sched is not None else None,
              "scaler": scaler.state_dict() if scaler is not None else None,
              "hooks": [h.state_dict() for h in self.hooks], "epoch": self.epoch, "step": self.step,
              "history": self.history, "best_value": best_value, "best_state": best_state, "bad_epochs": bad_epochs,
              "best_hooks": best_hooks}
        with atomic_path(self.state_path) as tmp:
            torch.save(st, tmp)

    def _log(self, row: dict) -> None:
        if not is_main_process():
            return
        if self.log_path is not None:
            append_jsonl(self.log_path, row)
        if "event" in row:
            tqdm.write(f"[{self.name}] early stop after epoch {row['epoch']} (best {row['best']:.4f})")
            return
        parts = [f"[{self.name}] epoch {row['epoch']}/{self.cfg.epochs}"]
        for k in ("train_loss", f"train_{self.metric}", "val_loss", f"val_{self.metric}"):
            if k in row:
                parts.append(f"{k}={row[k]:.4f}")
        parts.append(f"{row['samples_per_s']:.0f} samples/s")
        tqdm.write("  ".join(parts))


def train(model: nn.Module, config: TrainConfig | None = None, data: DataBundle | None = None, *,
          hooks: Iterable[Hook] = (), seed: int = 0, **kw):
    """Train or fine-tune ``model`` in place; return ``(model, metrics)`` (metrics on the test split when present)."""
    from compress.api import Result, as_data

    data = as_data(data)
    config = config or TrainConfig()
    Trainer(model, config, data, hooks, seed=seed, **kw).fit()
    split = "test" if data.has("test") else "val"
    return Result(model, evaluate(model, data, split, config.device))
