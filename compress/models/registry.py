"""Model registry: every model is a factory ``(spec, input_shape, num_outputs) -> nn.Module``."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn
from pydantic import Field, field_validator

from compress.config import StrictModel, validate
from compress.errors import RecipeError
from compress.registry import Registry
from compress.safety import imports_blocked

MODELS: Registry = Registry("model")


class ModelSpec(StrictModel):
    """Options every model shares; each model's config subclasses this."""

    name: str
    checkpoint: Optional[Path] = None  # a compress checkpoint or a plain state_dict, loaded with weights_only=True

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, p: Optional[Path]) -> Optional[Path]:
        if p is not None and not p.is_file():
            raise ValueError(f"expected an existing checkpoint file, got '{p}' (no such file)")
        return p


class ImportSpec(ModelSpec):
    """A user's own model: ``import: package.module:factory`` and keyword arguments for it."""

    name: str = "import"
    import_: str = Field(alias="import", pattern=r"^[\w.]+:[\w.]+$")
    kwargs: dict[str, Any] = {}


def register_model(name: str, config: type[ModelSpec] = ModelSpec, description: str = ""):
    return MODELS.register(name, config=config, description=description)


def parse_model_spec(raw: Any, path: str = "model") -> ModelSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise RecipeError(path, f"expected a mapping with a 'name' key, got {raw!r}")
    if "import" in raw:
        return validate(ImportSpec, raw, path)
    if "name" not in raw:
        raise RecipeError(f"{path}.name", f"required key is missing; expected one of {', '.join(MODELS.names())}")
    entry = MODELS.get(str(raw["name"]), f"{path}.name")
    return validate(entry.config, raw, path)


def _import_factory(target: str):
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RecipeError("model.import", f"cannot import '{target}': {exc}") from None
    return obj


def create_model(spec: ModelSpec | dict | str, input_shape: tuple = (), num_outputs: int = 0, **kwargs) -> nn.Module:
    """Build a model by registry name: ``create_model('mlp', (1, 28, 28), 10, hidden=[800, 800])``."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = parse_model_spec({**spec, **kwargs})
    if isinstance(spec, ImportSpec):
        if imports_blocked():  # e.g. a stage check building the model while the recipe is parsed
            raise RecipeError("model.import", f"{spec.import_!r} is not imported while a recipe is only checked")
        model = _import_factory(spec.import_)(**spec.kwargs)
    else:
        model = MODELS.get(spec.name, "model.name").obj(spec, tuple(input_shape), int(num_outputs))
    if not isinstance(model, nn.Module):
        raise RecipeError("model", f"the factory for '{spec.name}' returned {type(model).__name__}, expected an nn.Module")
    if spec.checkpoint is not None:
        from compress.checkpoint_io import load_weights_into

        load_weights_into(model, spec.checkpoint)
    model.compress_spec = spec.model_dump(mode="json", by_alias=True)
    model.compress_io = {"input_shape": list(input_shape), "num_outputs": int(num_outputs)}
    return model
