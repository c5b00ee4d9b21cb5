"""Small shared helpers: seeding, atomic writes, devices."""
from __future__ import annotations

import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import CompressError
from compress.safety import scrub


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically, and without the environment values of the run (``compress.safety.scrub``)."""
    _write(path, scrub(text))


def _write(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    # Scrubbed as data, not as text: a value replaced inside the JSON text could break its quoting.
    _write(path, json.dumps(scrub(obj), indent=2, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    # Appending one line is atomic enough for a log: a crash loses at most the line being written.
    with open(path, "a") as f:
        f.write(json.dumps(scrub(obj), default=_json_default) + "\n")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_device(name: str) -> str:
    """``name`` if this machine has that device ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'); ValueError saying what it has."""
    if name == "auto":
        return name
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name!r} needs a CUDA GPU and this machine has none; use 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name!r}: Apple's MPS is not available on this machine; use 'auto' or 'cpu'")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """The device of this process; under torchrun 'auto'/'cuda' mean the GPU of its LOCAL_RANK."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(name)
    except ValueError as exc:
        raise CompressError(f"device: {exc}") from None
    dev = torch.device(name)
    if dev.type == "cuda" and ranks > 1:
        if dev.index is not None:
            raise CompressError(f"device: {name!r} pins every process of this torchrun to one GPU; use 'cuda' or "
                                "'auto' (each process takes the GPU of its LOCAL_RANK)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev
