"""The prune stage's schedule inside a training loop you already have: ``pruner.step()`` where you like.

    pruner = Pruner(model, PruneConfig(method="channel", sparsity=0.5, steps=3), example_inputs=x)
    for epoch in range(epochs):
        if epoch % 2 == 0 and not pruner.done:
            pruner.step(optimizer)        # the next step of the schedule; the optimizer follows the new shapes
        for x, y in loader:
            ...                           # your forward, backward, optimizer.step()
            pruner.after_optimizer_step()   # magnitude: pruned weights stay zero
    print(pruner.summary())

The method (magnitude or channel), the schedule's targets, the layers kept and ``round_to`` come from the
``PruneConfig`` exactly as in the prune stage (``resolve_config``, the same registered method pruner). What
belongs to compress's own trainer is not used here: ``finetune`` (your loop fine-tunes), ``kd`` (use
``compress.kd.Distiller``), ``max_drop``, ``budget``, ``regularize``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from compress.measure.size import count_macs, count_params
from compress.pruning import schedules
from compress.pruning.masks import prunable_layers
from compress.pruning.methods import PruneConfig


def _macs(model: nn.Module, example: Any) -> Optional[int]:
    return count_macs(model, example)[0] if example is not None else None


def rebind_optimizer(optimizer, before: dict[str, nn.Parameter], model: nn.Module) -> int:
    """Point ``optimizer`` at ``model``'s parameters after a pruning step replaced them (torch-pruning makes new,
    narrower tensors). A parameter whose shape changed starts with fresh optimizer state (its moments belonged
    to channels partly gone); the others keep theirs. Returns how many parameters were replaced."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's / Lightning's wrappers hold the real one
    after = dict(model.named_parameters())
    new_of = {id(p): after[n] for n, p in before.items() if n in after and after[n] is not p}
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            q = new_of.get(id(p), p)
            if q is not p:
                state = opt.state.pop(p, None)
                if state and all(not torch.is_tensor(v) or v.ndim == 0 or v.shape == q.shape for v in state.values()):
                    opt.state[q] = state
            params.append(q)
        group["params"] = params
    return len(new_of)


class Pruner:
    """Applies a ``PruneConfig``'s schedule one step at a time to ``model`` (in place).

    What it adds to your loop: ``step`` prunes (channel: the layers really shrink; magnitude: a mask of zeros)
    and, given your optimizer, re-points it at the new parameters; ``after_optimizer_step`` re-applies the
    magnitude masks (a no-op for channel pruning). Nothing else runs: no data pass, no fine-tuning.
    ``example_inputs``: one batch the model takes (channel pruning traces the graph on it; MACs are counted
    on it). ``data``: only for gradient importances (``importance: taylor``), which read a few training batches.
    """

    def __init__(self, model: nn.Module, config: Optional[PruneConfig] = None, example_inputs: Any = None, *,
                 data=None, backends: Optional[list[str]] = None, path: str = "prune"):
        from compress.stages.prune import resolve_config

        cfg, self.round_facts = resolve_config(model, config if config is not None else PruneConfig(), path, backends)
        cfg.check_rules(path)
        if example_inputs is None and cfg.method != "magnitude":
            raise ValueError(f"{cfg.method} pruning traces the model: pass example_inputs (one batch it takes)")
        self.model, self.config, self.example = model, cfg, example_inputs
        self.targets = schedules.targets(cfg.schedule, cfg.sparsity, cfg.steps, cfg.initial_sparsity)
        self.steps_done = 0
        self.history: list[dict] = []
        self.hooks: list = []  # the current step's trainer hooks (magnitude: the mask keeper)
        self.unpruned_params = count_params(model)[0]
        self.unpruned_macs = _macs(model, example_inputs)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        layers = prunable_layers(model, cfg.ignored_layers)
        self._method = cfg.pruner(model, layers, example_inputs, data, path, device)

    @property
    def done(self) -> bool:
        """Every step of the schedule has been applied."""
        return self.steps_done >= len(self.targets)

    def step(self, optimizer=None) -> dict:
        """Apply the next step of the schedule; returns its row (target, sparsity or ratio, params, MACs)."""
        if self.done:
            raise RuntimeError(f"the schedule's {len(self.targets)} step(s) are done (check pruner.done)")
        before = dict(self.model.named_parameters())
        t, target = self.steps_done + 1, self.targets[self.steps_done]
        self.hooks = self._method.step(t, target)
        self.steps_done = t
        replaced = rebind_optimizer(optimizer, before, self.model) if optimizer is not None else 0
        row = {"step": t, "target": round(target, 4), **self._method.step_facts(),
               "params": count_params(self.model)[0], "nonzero_params": count_params(self.model)[1],
               "macs": _macs(self.model, self.example), "optimizer_params_replaced": replaced}
        self.history.append(row)
        if self.done:
            self._method.record(self.model, True)  # compress.load_model replays the shapes
        return row

    def after_optimizer_step(self) -> None:
        """Call after each ``optimizer.step()``: pruned weights stay exactly zero (magnitude pruning)."""
        for h in self.hooks:
            h.after_step(None)

    def summary(self) -> dict:
        """The prune stage's summary keys that a loop of your own can have (no gate, no budget); MACs as
        measured after the last step."""
        total, nonzero = count_params(self.model)
        # MACs as measured after the last step: a later prepare() wraps layers the counter does not count
        macs = self.history[-1]["macs"] if self.history else self.unpruned_macs
        out = {"method": self.config.method, "steps_done": self.steps_done, "steps": len(self.targets),
               **self.round_facts, **self._method.summary([r for r in self.history]),
               "unpruned_params": self.unpruned_params, "params": total, "nonzero": nonzero,
               "unpruned_macs": self.unpruned_macs, "macs": macs}
        if macs and self.unpruned_macs:
            out["macs_reduction"] = round(self.unpruned_macs / max(macs, 1), 2)
        return out
