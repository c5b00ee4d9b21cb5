"""Self-describing checkpoints: the model's spec, the transforms applied to it, and its weights.

A checkpoint reloads by itself (``load_model(path)``) without pickled code: the architecture is rebuilt
from the registry spec, then each recorded transform (a structural prune, quantization wrappers, ...)
is replayed from the TRANSFORMS registry, then the weights are loaded. Everything loads with
``weights_only=True``. A spec that names user code (``import: pkg.module:factory``) is plain data that
``weights_only`` lets through, so it is resolved only with an explicit opt-in (``compress.safety``).
The file format itself lives in ``compress.checkpoint_io``.

A file's spec, io and recorded transforms are data from the file, not from us: before anything real is
built they are replayed on the meta device (no memory behind the tensors), the file's tensors loaded into
that model by shape, and what the build would allocate counted against the file's unpack limit
(``compress.packfile.unpack_limit``). A spec that does not build, a transform that does not apply, weights
that do not fit, or a model bigger than the file can honestly hold is a one-line error naming the file.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from compress.checkpoint_io import (FORMAT, TRANSFORMS, _load, load_weights_into, model_state,  # noqa: F401
                                    record_transform, restore, save_model)
from compress.errors import CompressError, RecipeError, RecipeErrors, error_line
from compress.models import create_model
from compress.packfile import ONNX_FORMAT, is_packed, open_packed, over_limit, read_packed, unpack_limit  # noqa: F401
from compress.safety import allowing_imports, import_allowed, import_refused, offline, redacting, scrub

# Python objects a build makes: charged per module, parameter and buffer registered (an nn.Linear with its
# weight and bias, registered in its parent: 3 events, about 6 KiB measured), so that a spec of 100,000 tiny
# layers is stopped as surely as one of a few huge ones.
REGISTRATION_BYTES = 4096


def _budget_mode():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Budget(TorchDispatchMode):
        """What a build on the meta device would allocate for real: the bytes of every tensor an op makes
        (views and in-place results are not new memory) and REGISTRATION_BYTES per module, parameter and
        buffer registered. Past ``limit`` it stops the build with a one-line error."""

        def __init__(self, limit: tuple[int, str], path):
            super().__init__()
            self.limit, self.path, self.used, self.hooks = limit, path, 0, []

        def charge(self, n: int) -> None:
            self.used += n
            if self.used > self.limit[0]:
                raise over_limit(self.path, "the model it describes (spec, io, transforms)", None, self.limit)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            schema = getattr(func, "_schema", None)
            if schema is None or not any(r.alias_info is not None for r in schema.returns):
                self.charge(sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
            return out

        def __enter__(self):
            m = nn.modules.module
            self.hooks = [register(lambda *_: self.charge(REGISTRATION_BYTES)) for register in (
                m.register_module_module_registration_hook, m.register_module_parameter_registration_hook,
                m.register_module_buffer_registration_hook)]
            return super().__enter__()

        def __exit__(self, *exc):
            for h in self.hooks:
                h.remove()
            return super().__exit__(*exc)

    return Budget


def _io(io, path) -> tuple[tuple[int, ...], int]:
    io = {} if io is None else io
    shape = io.get("input_shape", ()) if isinstance(io, dict) else None
    n = io.get("num_outputs", 0) if isinstance(io, dict) else None
    if not isinstance(shape, (list, tuple)) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape) \
            or type(n) is not int or n < 0:
        raise CompressError(f"{path}: corrupt checkpoint (its io is not an input_shape and num_outputs)")
    return tuple(shape), n


def _build(spec: dict, io: tuple[tuple[int, ...], int], path) -> nn.Module:
    try:
        return create_model(spec, *io)
    except (RecipeError, RecipeErrors) as exc:  # the spec's values: name the file they came from, on one line
        raise CompressError(f"{path}: its model spec: {'; '.join(str(exc).splitlines())}") from None
    except CompressError:
        raise
    except Exception as exc:  # a factory's own error on values from the file (TypeError, RuntimeError, ...)
        raise CompressError(f"{path}: its model spec does not build ({error_line(exc)})") from None


def _dry_run(spec: dict, io, ckpt: dict, meta_sd: dict, path, limit: tuple[int, str]) -> None:
    """Build, replay and load by shape on the meta device, counting what the real build would allocate."""
    budget = _budget_mode()(limit, path)
    try:
        with torch.device("meta"), budget:
            model = _build(spec, io, path)
            restore(model, {**ckpt, "state_dict": meta_sd}, str(path))
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"{path}: its model does not build ({error_line(exc)})") from None


def load_model(path: str | Path, *, allow_import: bool | None = None, max_bytes: int | None = None) -> nn.Module:
    """Rebuild a model saved by ``save_model`` or ``compress.packfile.pack_model``: architecture, transforms, weights.
    A packed ONNX model (``compress.packfile.pack_onnx``, e.g. int8 PTQ) comes back as ``OrtModel``: ONNX
    Runtime running exactly the packed graph.

    A checkpoint whose spec imports user code (``import: pkg.module:factory``) is refused unless
    ``allow_import`` is true (default: ``compress.safety.import_allowed()``, i.e. COMPRESS_ALLOW_IMPORT=1
    or a run that was allowed to import).

    ``max_bytes``: what the file may unpack to (its tensors, and the model its spec builds); default
    ``COMPRESS_MAX_UNPACK_BYTES``, else 64 MiB + 256x the file's size (``compress.packfile.unpack_limit``).
    A file over it is a one-line error before anything is decoded or allocated.
    """
    path = Path(path)
    packed = open_packed(path, max_bytes) if is_packed(path) else None
    if packed is not None and packed.is_onnx:  # a packed int8 (PTQ) ONNX model
        from compress.runtime.onnx import OrtModel

        return OrtModel(packed.onnx_bytes())
    if packed is not None:
        h = packed.header
        ckpt = {"format": FORMAT, "spec": h.get("spec"), "io": h.get("io"), "transforms": h.get("transforms") or [],
                "meta": h.get("meta") or {}}
        limit = packed.limit
    else:
        ckpt = _load(path)
        limit = unpack_limit(path.stat().st_size, max_bytes)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not isinstance(ckpt.get("spec"), dict) \
            or not ckpt["spec"]:
        raise CompressError(f"{path}: not a compress checkpoint (a plain state_dict needs a model spec: "
                            "give it as model.checkpoint in a recipe)")
    if "import" in ckpt["spec"] and not import_allowed(allow_import):
        raise CompressError(f"{path}: its model spec {import_refused(ckpt['spec']['import'])}")
    # The saved weights replace whatever a checkpoint or pretrained file would load: skip reading those.
    used: dict[str, str] = {}
    spec = _environment(path, {k: v for k, v in ckpt["spec"].items() if k not in ("checkpoint", "weights")}, used)
    if "pretrained" in spec or str(spec.get("name", "")).startswith("hf"):
        spec["pretrained"] = False  # nor download them (timm's pretrained, a hub id's weights)
    io = _io(ckpt.get("io"), path)
    # A hub id's config comes from the cache (its weights from the file); a folder's own code needs the opt-in.
    with offline(f"while {path} is loaded"), allowing_imports(allow_import):
        if "import" not in spec:  # user code the user allowed runs as it is: it could allocate anything anyway
            sd = packed.meta_state_dict() if packed is not None else \
                {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in (ckpt.get("state_dict") or {}).items()} \
                if isinstance(ckpt.get("state_dict"), dict) else ckpt.get("state_dict")
            _dry_run(spec, io, ckpt, sd, path, limit)
        if packed is not None:
            ckpt["state_dict"] = packed.state_dict()
        model = _build(spec, io, path)
    with redacting(used):  # the model keeps its spec as written: saving it again writes ${VAR}, not the value
        model.compress_spec = scrub(model.compress_spec)
    return restore(model, ckpt, str(path))


def _environment(path: str | Path, spec: dict, used: dict) -> dict:
    """Resolve the ``${VAR}``s a run kept in the saved spec (its values never go into files) from this
    process's environment."""
    from compress.variables import interpolate

    try:
        return interpolate(spec, path="spec", used=used)
    except RecipeError as exc:
        raise CompressError(f"{path}: {exc}") from None
