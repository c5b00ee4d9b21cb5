"""Data-parallel runs under torchrun, on PyTorch's own engine (torch.distributed + DistributedDataParallel).

``torchrun --nproc-per-node N -m compress run recipe.yaml`` starts N processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; ``session()`` starts the process group from them (gloo on CPU,
nccl for CUDA tensors). Without torchrun (WORLD_SIZE unset or 1) every helper here is a no-op, so the
trainer and the pipeline call them unconditionally.

Roles: every rank trains (the trainer wraps the student in DDP and shards the data); rank 0 alone writes
the run directory and runs the stages that do not train; the others get its models by broadcast.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

# Rank 0 measures (latency, ONNX Runtime) while the others wait at their next collective: allow long waits.
TIMEOUT = datetime.timedelta(minutes=60)
_INFO: dict = {}
_SOLO = [False]  # inside ``solo()``: this process works alone (a stage that runs once, on rank 0)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return not _SOLO[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def solo() -> Iterator[None]:
    """Rank 0 alone (export, PTQ, benchmarks): collectives are off, so a trainer inside trains on one process."""
    was, _SOLO[0] = _SOLO[0], True
    try:
        yield
    finally:
        _SOLO[0] = was


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 logs and writes files (also true outside torchrun)."""
    return rank() == 0


def _backend() -> str:
    if os.environ.get("COMPRESS_DIST_BACKEND"):
        return os.environ["COMPRESS_DIST_BACKEND"]
    # CPU tensors over gloo, CUDA tensors over nccl: a stage with ``device: cpu`` still works on a GPU machine.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda:{local_rank()} ({torch.cuda.get_device_name(local_rank())})"
    return "cpu"


def setup() -> bool:
    """Start the process group from torchrun's environment; False when there is nothing to start."""
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(_backend(), timeout=TIMEOUT)
    devices = [None] * world_size()
    dist.all_gather_object(devices, _device_name())
    _INFO.update(world_size=world_size(), backend=_backend().replace("cpu:gloo,cuda:nccl", "nccl"), devices=devices)
    # torchrun sends SIGTERM to the survivors when one process fails: end with one line, not a traceback.
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum, frame) -> None:
    raise PeerFailure("stopped by torchrun because another process of this run failed")


class PeerFailure(RuntimeError):
    """Another process of the run died or stopped; this one ends too."""


def info() -> dict:
    """How the run runs, for the log's first line and report.json's machine block."""
    if _INFO:
        return dict(_INFO)
    return {"world_size": 1, "backend": None, "devices": [_device_name()]}


@contextmanager
def session() -> Iterator[bool]:
    """The process group for the duration of a run (started here only if torchrun asked for one)."""
    started = setup()
    try:
        yield started
    finally:
        if started:
            dist.destroy_process_group()
            _INFO.clear()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for decisions, paths, small states, whole models)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``tensor`` in place over all ranks."""
    if active():
        dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: torch.Tensor) -> bool:
    """True on every rank if ``flag`` is true on any (one sync): all ranks stop together."""
    if not active():
        return bool(flag)
    t = flag.detach().to(torch.int32).reshape(1)
    return bool(all_reduce_(t, "max").item())


def average_grads_(params) -> None:
    """Average gradients over ranks for parameters outside the DDP module (hook adapters)."""
    if not active():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def sync_buffers_(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: each rank updated its own on its own shard."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, 0)


def shard_indices(n: int) -> range:
    """This rank's share of ``range(n)`` for evaluation: every sample exactly once over all ranks (no padding)."""
    return range(rank(), n, world_size())


def is_peer_failure(exc: BaseException) -> bool:
    """An error raised because another rank went away (gloo/nccl connection errors, torchrun's SIGTERM)."""
    if isinstance(exc, PeerFailure) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                                      "Gloo", "NCCL", "Broken pipe"))


def peer_failure_line(exc: BaseException) -> str:
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, PeerFailure):
        why = f"another process of this run stopped ({why[:160]})"
    return (f"rank {rank()}/{world_size() if active() else env_world_size()}: {why}; the run ended; finished "
            "stages and epochs are kept (continue with --resume)")


def quiet_non_main() -> None:
    """Only rank 0 prints progress; the others keep stderr for errors."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")
