"""The checkpoint file format: save, read (``weights_only=True``), replay transforms, load weights.

Kept apart from ``compress.checkpoint.load_model`` (which rebuilds the architecture through the model
registry) so that models, which record and replay transforms, need not import the registry's user.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from compress.errors import CompressError, error_line
from compress.registry import Registry
from compress.safety import scrub
from compress.utils import atomic_path

FORMAT = "compress.checkpoint/1"
# kind -> fn(model, params: dict, state_dict) -> nn.Module, replayed in order on load.
TRANSFORMS: Registry[Callable[..., nn.Module]] = Registry("model transform")


def record_transform(model: nn.Module, kind: str, **params: Any) -> None:
    """Note on ``model`` that it was changed by ``kind`` so that a reload can rebuild it."""
    TRANSFORMS.get(kind)
    model.compress_transforms = [*getattr(model, "compress_transforms", []), {"kind": kind, "params": params}]


def model_state(model: nn.Module, meta: dict | None = None) -> dict:
    """What a checkpoint or packed file holds; the spec keeps a recipe's ``${VAR}`` as written (``scrub``):
    ``load_model`` resolves it from the environment of the process that loads."""
    return {
        "format": FORMAT,
        "spec": scrub(getattr(model, "compress_spec", None)),
        "io": getattr(model, "compress_io", None),
        "transforms": scrub(copy.deepcopy(getattr(model, "compress_transforms", []))),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": scrub(meta or {}),
    }


def save_model(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write atomically; a model built outside the registry is saved as a plain state_dict."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(model_state(model, meta), tmp)
    return path


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files (EOFError('') when empty)
        detail = (str(exc).splitlines() or [""])[0]
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise CompressError(f"{path}: not a loadable checkpoint{empty} ({type(exc).__name__}"
                            f"{': ' + detail if detail else ''})") from None


def restore(model: nn.Module, ckpt: dict, where: str = "checkpoint") -> nn.Module:
    """Replay recorded transforms on a freshly built model and load its weights. The transforms and weights
    are the file's data: one that is malformed or does not apply is a one-line error naming ``where``."""
    transforms, sd = ckpt.get("transforms", []), ckpt.get("state_dict")
    if not isinstance(transforms, list):
        raise CompressError(f"{where}: corrupt checkpoint (its recorded transforms are not a list)")
    if not isinstance(sd, dict):
        raise CompressError(f"{where}: corrupt checkpoint (its state_dict is not a mapping)")
    for i, t in enumerate(transforms):
        kind, params = (t.get("kind"), t.get("params", {})) if isinstance(t, dict) else (None, None)
        if not isinstance(kind, str) or not isinstance(params, dict):
            raise CompressError(f"{where}: corrupt checkpoint (recorded transform {i} is not a kind and params)")
        if kind not in TRANSFORMS:
            raise CompressError(f"{where}: recorded transform {i}: unknown kind {kind[:60]!r}; this compress "
                                f"replays {', '.join(TRANSFORMS.names())}")
        try:
            model = TRANSFORMS.get(kind).obj(model, params, sd) or model
        except CompressError:
            raise
        except Exception as exc:  # KeyError, AttributeError, TypeError, RuntimeError ... on crafted params
            raise CompressError(f"{where}: recorded transform {i} ({kind}) does not apply to its model "
                                f"({error_line(exc)})") from None
    try:
        model.compress_transforms = copy.deepcopy(transforms)
    except RecursionError:
        raise CompressError(f"{where}: corrupt checkpoint (its recorded transforms nest too deep)") from None
    _load_state(model, sd, where)
    return model


def _load_state(model: nn.Module, sd: dict, where: str) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        raise CompressError(f"{where}: weights do not fit the model: {' '.join(lines[1:3]) or lines[0]}") from None
    except Exception as exc:  # a crafted state_dict (values that are not tensors, ...)
        raise CompressError(f"{where}: weights do not fit the model ({error_line(exc)})") from None


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Load a compress checkpoint or a plain state_dict into an already built model."""
    ckpt = _load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        # Transforms change the model in place; one that built a new module could not be handed back here.
        if restore(model, ckpt, str(path)) is not model:
            raise CompressError(f"{path}: this checkpoint changes the architecture; load it with compress.load_model")
        return
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CompressError(f"{path}: expected a state_dict, got {type(ckpt).__name__}")
    _load_state(model, sd, str(path))
