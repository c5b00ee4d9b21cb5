"""Self-describing checkpoints: the model's spec, the transforms applied to it, and its weights.

A checkpoint reloads by itself (``load_model(path)``) without pickled code: the architecture is rebuilt
from the registry spec, then each recorded transform (a structural prune, quantization wrappers, ...)
is replayed from the TRANSFORMS registry, then the weights are loaded. Everything loads with
``weights_only=True``. A spec that names user code (``import: pkg.module:factory``) is plain data that
``weights_only`` lets through, so it is resolved only with an explicit opt-in (``compress.safety``).
The file format itself lives in ``compress.checkpoint_io``.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from compress.checkpoint_io import (FORMAT, TRANSFORMS, _load, load_weights_into, model_state,  # noqa: F401
                                    record_transform, restore, save_model)
from compress.errors import CompressError
from compress.models import create_model
from compress.packfile import ONNX_FORMAT, is_packed, read_packed  # packed files (.cpk): a checkpoint's contents, Deep Compression storage
from compress.safety import allowing_imports, import_allowed, import_refused, offline


def load_model(path: str | Path, *, allow_import: bool | None = None) -> nn.Module:
    """Rebuild a model saved by ``save_model`` or ``compress.packfile.pack_model``: architecture, transforms, weights.
    A packed ONNX model (``compress.packfile.pack_onnx``, e.g. int8 PTQ) comes back as ``OrtModel``: ONNX
    Runtime running exactly the packed graph.

    A checkpoint whose spec imports user code (``import: pkg.module:factory``) is refused unless
    ``allow_import`` is true (default: ``compress.safety.import_allowed()``, i.e. COMPRESS_ALLOW_IMPORT=1
    or a run that was allowed to import).
    """
    ckpt = read_packed(path) if is_packed(path) else _load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == ONNX_FORMAT:  # a packed int8 (PTQ) ONNX model
        from compress.runtime.onnx import OrtModel

        return OrtModel(ckpt["onnx"])
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not isinstance(ckpt.get("spec"), dict) \
            or not ckpt["spec"]:
        raise CompressError(f"{path}: not a compress checkpoint (a plain state_dict needs a model spec: "
                            "give it as model.checkpoint in a recipe)")
    if "import" in ckpt["spec"] and not import_allowed(allow_import):
        raise CompressError(f"{path}: its model spec {import_refused(ckpt['spec']['import'])}")
    # The saved weights replace whatever a checkpoint or pretrained file would load: skip reading those.
    spec = _environment(path, {k: v for k, v in ckpt["spec"].items() if k not in ("checkpoint", "weights")})
    if "pretrained" in spec or str(spec.get("name", "")).startswith("hf"):
        spec["pretrained"] = False  # nor download them (timm's pretrained, a hub id's weights)
    io = ckpt.get("io") or {}
    # A hub id's config comes from the cache (its weights from the file); a folder's own code needs the opt-in.
    with offline(f"while {path} is loaded"), allowing_imports(allow_import):
        model = create_model(spec, tuple(io.get("input_shape", ())), io.get("num_outputs", 0))
    return restore(model, ckpt, str(path))


def _environment(path: str | Path, spec: dict) -> dict:
    """Resolve the ``${VAR}``s a run kept in the saved spec (its values never go into files) from this
    process's environment."""
    from compress.errors import RecipeError
    from compress.variables import interpolate

    try:
        return interpolate(spec, path="spec")
    except RecipeError as exc:
        raise CompressError(f"{path}: {exc}") from None
