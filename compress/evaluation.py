"""Task metrics of a model on one split: below the trainer and the measures, so both use the same code
(``compress.measure`` does not import the trainer)."""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.data import DataBundle
from compress.data.inputs import to_device
from compress.metrics import LOSSES, MetricAccumulator, default_loss
from compress.utils import resolve_device


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, split: str = "test", device: str | torch.device = "auto",
             loss: str = "auto", sharded: bool = False) -> dict[str, float]:
    """Metrics of ``model`` on one split: accuracy/top5/loss or rmse/mae/loss.

    ``sharded`` (under torchrun): each rank evaluates its share of the split and the sums are reduced, so
    every rank gets the metrics of the whole split for a fraction of the work.
    """
    from compress import distributed

    device = resolve_device(device) if isinstance(device, str) else device
    loss_fn = LOSSES[default_loss(data.task) if loss == "auto" else loss]
    was_training = model.training
    model.eval().to(device)
    acc = MetricAccumulator(data.task)
    pin = device.type == "cuda"
    if sharded and distributed.active():
        ds = data.dataset(split)
        loader = data.loader(split, shuffle=False, pin_memory=pin,
                             sampler=list(distributed.shard_indices(len(ds))))
    else:
        loader = data.loader(split, shuffle=False, pin_memory=pin)
    for raw in loader:
        x, y = to_device(raw[0], device, non_blocking=True), raw[1].to(device, non_blocking=True)
        out = model(x)
        acc.update(out, y, loss_fn(out, y))
    model.train(was_training)
    return (acc.all_reduce() if sharded else acc).compute()
