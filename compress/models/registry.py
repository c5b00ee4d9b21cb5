"""Model registry: every model is a factory ``(spec, input_shape, num_outputs) -> nn.Module``."""
from __future__ import annotations

import importlib
import inspect
import os
import sys
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
    adapt_input: Optional["InputAdaptation"] = None  # e.g. {channels: 3, size: [224, 224]} for 1-channel 28 px data

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, p: Optional[Path]) -> Optional[Path]:
        if p is not None and not p.is_file():
            raise ValueError(f"expected an existing checkpoint file, got '{p}' (no such file)")
        return p


class AdapterOptions(StrictModel):
    """How compress talks to a user's model (``compress.models.adapter``); everything else is guessed."""

    inputs: Optional[list[str]] = Field(None, min_length=1)  # named inputs (a dict batch); default one tensor
    logits: bool = False  # the output is not a tensor (ModelOutput, tuple): take .logits / ['logits'] / [0]
    head: Optional[str] = None  # module name of the classifier (default: the last Linear/Conv)
    first_layer: Optional[str] = None  # module name of the input layer (default: the first Linear/Conv)
    num_heads: dict[str, int] = {}  # attention q/k/v projection module -> heads, for head pruning


class InputAdaptation(StrictModel):
    """Change the data's images before the model sees them (inside the model: export includes it)."""

    channels: Optional[int] = Field(None, ge=1, le=64)  # 1 -> n repeats the channel, n -> 1 averages
    size: Optional[list[int]] = Field(None, min_length=2, max_length=2)  # bilinear resize to [height, width]


ModelSpec.model_rebuild()


class ImportSpec(ModelSpec):
    """A user's own model: ``import: package.module:factory`` and keyword arguments for it.

    The module is looked up in ``search_path`` (a recipe file's folder is added by ``load_recipe``), the
    working directory, then ``sys.path``. The factory gets ``input_shape`` and ``num_outputs`` too when
    its signature names them (or takes ``**kwargs``) and ``kwargs`` does not set them.
    """

    name: str = "import"
    import_: str = Field(alias="import", pattern=r"^[\w.]+:[\w.]+$")
    kwargs: dict[str, Any] = {}
    search_path: list[str] = []
    adapter: AdapterOptions = AdapterOptions()


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


def _import_factory(target: str, search_path: list[str] = ()):
    module, _, attr = target.partition(":")
    folders = [str(Path(p)) for p in (*search_path, os.getcwd())]
    added = [p for p in folders if p not in sys.path]
    sys.path[:0] = added  # only while importing: the recipe's folder must not shadow modules afterwards
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RecipeError("model.import", f"cannot import '{target}': {exc} (looked in {', '.join(folders)} "
                                          "and sys.path)") from None
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    return obj


def _call_factory(factory, kwargs: dict, input_shape: tuple, num_outputs: int):
    """Call a user's factory, adding ``input_shape``/``num_outputs`` where its signature takes them."""
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("input_shape", tuple(input_shape)), ("num_outputs", int(num_outputs))):
        if key not in kwargs and (key in params or var_kw):
            kwargs[key] = value
    return factory(**kwargs)


def _import_model(spec: ImportSpec, input_shape: tuple, num_outputs: int) -> nn.Module:
    from compress.models.adapter import declare, wrap_io

    model = _call_factory(_import_factory(spec.import_, spec.search_path), spec.kwargs, input_shape, num_outputs)
    if not isinstance(model, nn.Module):
        return model  # refused by the caller
    a = spec.adapter
    facts = {k: v for k, v in (("head", a.head), ("first_layer", a.first_layer), ("num_heads", a.num_heads)) if v}
    names = dict(model.named_modules())
    for key in ("head", "first_layer"):
        if facts.get(key) and facts[key] not in names:
            raise RecipeError(f"model.adapter.{key}", f"no module '{facts[key]}' in the model")
    if a.inputs or a.logits:
        return wrap_io(model, a.inputs, family="import", **facts)
    return declare(model, family="import", **facts) if facts else model


def create_model(spec: ModelSpec | dict | str, input_shape: tuple = (), num_outputs: int = 0, *,
                 data_task: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a model by registry name: ``create_model('mlp', (1, 28, 28), 10, hidden=[800, 800])``.

    ``data_task``: the data's task (``DataBundle.task``); ``lm`` data turns a spec's ``task: auto`` into
    ``causal_lm`` (saved so: a checkpoint reloads the same model without its data)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = parse_model_spec({**spec, **kwargs})
    if data_task == "lm" and getattr(spec, "task", None) == "auto":
        spec = spec.model_copy(update={"task": "causal_lm"})
    if isinstance(spec, ImportSpec):
        if imports_blocked():  # e.g. a stage check building the model while the recipe is parsed
            raise RecipeError("model.import", f"{spec.import_!r} is not imported while a recipe is only checked")
        model = _import_model(spec, tuple(input_shape), int(num_outputs))
    else:
        model = MODELS.get(spec.name, "model.name").obj(spec, tuple(input_shape), int(num_outputs))
    if not isinstance(model, nn.Module):
        raise RecipeError("model", f"the factory for '{spec.name}' returned {type(model).__name__}, expected an nn.Module")
    if spec.adapt_input is not None:
        from compress.models.adapter import adapt_input

        adapt_input(model, spec.adapt_input.channels, spec.adapt_input.size)
    if spec.checkpoint is not None:
        from compress.checkpoint_io import load_weights_into

        load_weights_into(model, spec.checkpoint)
    model.compress_spec = spec.model_dump(mode="json", by_alias=True)
    model.compress_io = {"input_shape": list(input_shape), "num_outputs": int(num_outputs)}
    return model
