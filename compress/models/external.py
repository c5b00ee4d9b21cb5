"""Models from other libraries by registry prefix: ``torchvision:<name>``, ``timm:<name>``, ``hf:<folder>``
(or ``hf`` with an inline ``config:``). timm and transformers are optional extras: a recipe naming one that
is not installed gets one line with the install command. Models are built from their configs (random
init); weights come from local files or folders, or, only while a recipe is run, a hub id's or timm's own
download (``compress.safety.offline_reason``). A folder's own Python runs only with the import opt-in.
"""
from __future__ import annotations

import importlib.util
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional
from unittest import mock

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from compress.errors import RecipeError
from compress.models.adapter import declare, wrap_io
from compress.models.registry import MODELS, ModelSpec
from compress.registry import Entry
from compress.safety import code_refused, offline_reason, trust_remote_code

EXTRAS = {"timm": ("timm", "timm"), "hf": ("transformers", "hf")}
TIMM_LOADING = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")  # timm's own weight loading


def require(prefix: str, path: str = "model.name") -> None:
    """One-line error naming the install command when an optional extra is missing."""
    module, extra = EXTRAS[prefix]
    if importlib.util.find_spec(module) is None:
        raise RecipeError(path, f"'{prefix}:' models need the optional package {module}: pip install 'compress[{extra}]'")


# -- timm ----------------------------------------------------------------------------------------------
class TimmSpec(ModelSpec):
    """A ``timm`` model built from its config (``pretrained=False``); ``kwargs`` go to ``timm.create_model``
    (``img_size``, ``patch_size``, ``in_chans``...; ``in_chans`` defaults to the data's channels)."""

    kwargs: dict[str, Any] = {}
    weights: Optional[Path] = None  # a local state_dict / compress checkpoint for everything but a resized head
    pretrained: bool = False  # timm's own download (needs internet, or its cache); a resized head is re-initialised

    @field_validator("kwargs")
    @classmethod
    def _no_loading(cls, v: dict[str, Any]) -> dict[str, Any]:
        # timm would read (checkpoint_path) or fetch (pretrained_cfg*) weights by its own rules: bypassing
        # weights:'s one-line errors, and loading checkpoints and checking recipes never downloads.
        taken = sorted(k for k in v if k in TIMM_LOADING)
        if taken:
            raise ValueError(f"{', '.join(taken)} is not passed to timm: give weights: (a local file) or "
                             "pretrained: true")
        return v


def _attention_heads(model: nn.Module, attr: str, proj: tuple[str, ...]) -> dict[str, int]:
    """q/k/v projection name -> heads, for every attention module that has ``attr`` and those projections."""
    out = {}
    for name, m in model.named_modules():
        heads = getattr(m, attr, None)
        if isinstance(heads, int):
            for p in proj:
                if isinstance(getattr(m, p, None), nn.Linear):
                    out[f"{name}.{p}" if name else p] = heads
    return out


def _timm_model(spec: TimmSpec, input_shape, num_outputs) -> nn.Module:
    require("timm")
    import timm

    name = spec.name.partition(":")[2]
    kwargs = dict(spec.kwargs)
    if len(input_shape) == 3:
        kwargs.setdefault("in_chans", int(input_shape[0]))
    if spec.pretrained and spec.weights is not None:
        raise RecipeError("model.pretrained", "give either pretrained: true (timm's download) or a local weights file")
    pretrained = spec.pretrained and not offline_reason()  # checked or reloaded: the architecture is what counts
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_outputs, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise RecipeError("model", f"timm cannot build '{name}' with {kwargs}: {_first_line(exc)}") from None
    except Exception as exc:  # no network, no cached file: huggingface_hub / urllib errors of many types
        if not pretrained:
            raise
        raise RecipeError("model.pretrained", f"timm could not fetch the weights of '{name}' ({type(exc).__name__}: "
                          f"{_first_line(exc)}); give a local file as weights: instead") from None
    if spec.weights is not None:
        from compress.models.builtin import load_pretrained, read_weights_file

        load_pretrained(model, read_weights_file(spec.weights), num_outputs, str(spec.weights))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier")
    modules = dict(model.named_modules())
    first = cfg.get("first_conv")
    return declare(model, family="timm", head=head if head in modules else None,
                   first_layer=first if first in modules else None,
                   num_heads=_attention_heads(model, "num_heads", ("qkv", "q", "k", "v")))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _timm_names(name: str) -> bool:
    import timm

    return bool(timm.list_models(name)) or name in timm.list_models()


# -- Hugging Face transformers ------------------------------------------------------------------------
TEXT_INPUTS = ["input_ids", "attention_mask"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as on the Hugging Face hub


@contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """huggingface_hub's own offline switch (it reads HF_HUB_OFFLINE once, at import), set for the block:
    local_files_only alone still lets it make requests (it fetches an agent registry for its headers)."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    with mock.patch.object(constants, "HF_HUB_OFFLINE", True):  # every request through its session then raises
        yield


def _from_hub(cls, name: str, **kwargs: Any):
    """``cls.from_pretrained(name)`` through the library's download and cache (HF_HUB_OFFLINE=1: cache only);
    only the cache while nothing may be downloaded (a checkpoint loaded, a recipe checked)."""
    why = offline_reason()
    try:
        with _hub_offline(bool(why)):
            return cls.from_pretrained(name, local_files_only=bool(why), **kwargs)
    except Exception as exc:  # OSError, huggingface_hub's HTTP/offline errors, ...: one line either way
        if "trust_remote_code" in str(exc):  # transformers' refusal of a config naming code it has no class for
            raise RecipeError("model.name", code_refused(name, "its config")) from None
        if why:
            raise RecipeError("model.name", f"'{name}' is not in the local Hugging Face cache, and nothing is "
                              f"downloaded {why} ({type(exc).__name__}: {_first_line(exc)})") from None
        raise RecipeError("model.name", f"'{name}' is no local folder, and transformers could not fetch it from "
                          f"the Hugging Face hub ({type(exc).__name__}: {_first_line(exc)})") from None


class HFSpec(ModelSpec):
    """A ``transformers`` classifier: ``hf:<local folder>`` (config.json, weights if present), ``hf:<hub id>``
    (``org/name``: the library's own download, or its cache; a local folder of that name wins) or ``hf``
    with an inline ``config`` (``model_type`` plus its sizes), built with the Auto classes; num_labels =
    the data's classes. ``task``: sequence (text; inputs input_ids + attention_mask), image (pixel_values)
    or causal_lm (``AutoModelForCausalLM``: next-token logits over the vocabulary; inputs input_ids)."""

    config: Optional[dict[str, Any]] = None
    # auto: causal_lm for language-model data (the ``lm`` dataset), else image or sequence by the input shape
    task: Literal["auto", "sequence", "image", "causal_lm"] = "auto"
    inputs: Optional[list[str]] = Field(None, min_length=1)  # text models: default input_ids, attention_mask
    pretrained: bool = True  # a folder's or hub id's weights; false: its architecture only (a checkpoint reload)


def _hf_model(spec: HFSpec, input_shape, num_outputs) -> nn.Module:
    require("hf")
    import transformers
    from transformers import AutoConfig

    folder = spec.name.partition(":")[2]
    if folder and spec.config:
        raise RecipeError("model.config", "give either hf:<folder> or an inline config, not both")
    if not folder and not spec.config:
        raise RecipeError("model", "'hf' needs a local folder (hf:path/to/model) or an inline config: {model_type: ...}")
    hub = bool(folder) and not Path(folder).exists() and HUB_ID.fullmatch(folder) is not None
    key = "model.config" if spec.config else "model.name"
    code = trust_remote_code(None if hub else folder, key)  # passed on every call: transformers never asks
    try:
        if hub:
            cfg = _from_hub(AutoConfig, folder, trust_remote_code=code)
        elif folder:
            if not (Path(folder) / "config.json").is_file():
                raise RecipeError("model.name", f"'{folder}' is not a Hugging Face model folder (no config.json in it)")
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=code)
        else:
            raw = dict(spec.config)
            cfg = AutoConfig.for_model(raw.pop("model_type", ""), **raw)
    except RecipeError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise RecipeError(key, f"transformers cannot read this config: {str(exc).splitlines()[0]}") from None
    if getattr(cfg, "auto_map", None) and not code:  # a hub id's or inline: transformers would use its own class
        raise RecipeError(key, code_refused(folder or "model.config", "its config"))
    task = spec.task
    if task == "auto":
        task = "image" if len(input_shape) == 3 else "sequence"
    if task == "causal_lm":
        return _causal_lm(spec, folder, hub, cfg, code)
    cfg.num_labels = int(num_outputs)
    auto = transformers.AutoModelForImageClassification if task == "image" else transformers.AutoModelForSequenceClassification
    model = _instantiate(auto, spec, folder, hub, cfg, code, f"{task} classifier", ignore_mismatched_sizes=True)
    from compress.models.adapter import infer_head

    heads = _attention_heads(model, "num_attention_heads", ("query", "key", "value", "q_proj", "k_proj", "v_proj"))
    inputs = None if task == "image" else (spec.inputs or TEXT_INPUTS)
    return wrap_io(model, inputs, family="hf", head=infer_head(model, num_outputs), num_heads=heads)


def _instantiate(auto, spec: HFSpec, folder: str, hub: bool, cfg, code: bool, what: str, **hub_kwargs: Any) -> nn.Module:
    """``auto``'s model: a hub id's weights (while a recipe runs), a folder's own weights, or random init.
    The key-value cache is off: training, perplexity and classification only pay memory for it."""
    try:
        if hub and spec.pretrained and not offline_reason():  # checked or reloaded: the architecture is what counts
            model = _from_hub(auto, folder, config=cfg, trust_remote_code=code, **hub_kwargs)
        elif folder and not hub and spec.pretrained and _weights_file(folder):
            model = _local_weights(auto, folder, cfg, code)
        else:
            model = auto.from_config(cfg, trust_remote_code=code)
    except ValueError as exc:
        raise RecipeError("model", f"no {what} for this config: {str(exc).splitlines()[0]}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


LM_INPUTS = ["input_ids"]  # packed blocks: every position is a real token, so no attention mask


def _causal_lm(spec: HFSpec, folder: str, hub: bool, cfg, code: bool) -> nn.Module:
    """``AutoModelForCausalLM`` of a decoder family compress declares (``compress.models.decoder``), wrapped
    so it takes ``{'input_ids'}`` and returns ``[batch, tokens, vocab]`` logits; the LM head is the head and
    the token embedding the first layer (both kept in float by weight-only quantization and QAT)."""
    import transformers

    from compress.models.decoder import families, layout_for

    layout = layout_for(getattr(cfg, "model_type", ""))
    key = "model.config" if spec.config else "model.name"
    if layout is None:
        raise RecipeError(key, f"model_type {getattr(cfg, 'model_type', '')!r} is no decoder family compress declares; "
                               f"causal_lm takes {', '.join(families())}")
    model = _instantiate(transformers.AutoModelForCausalLM, spec, folder, hub, cfg, code, "causal language model")
    sizes = layout.sizes(model.config)
    heads = {}  # query heads for q (and a fused qkv), key-value groups for k and v
    for i in range(sizes["layers"]):
        for part, n in ((layout.q, sizes["heads"]), (layout.k, sizes["kv_heads"]), (layout.v, sizes["kv_heads"]),
                        (layout.qkv, sizes["heads"])):
            if part is not None:
                heads[f"{layout.layers}.{i}.{layout.attn}.{part}"] = n
    return wrap_io(model, spec.inputs or LM_INPUTS, family="hf", head=layout.lm_head, first_layer=layout.embed,
                   num_heads=heads, decoder=layout)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # safetensors first: it holds no pickle at all


def _weights_file(folder: str) -> Optional[Path]:
    return next((Path(folder) / f for f in WEIGHT_FILES if (Path(folder) / f).is_file()), None)


def _local_weights(auto, folder: str, cfg, code: bool) -> nn.Module:
    """A folder's own weights; one line naming the file for one torch or safetensors cannot load."""
    from compress.models.builtin import weights_error

    path = _weights_file(folder)
    try:
        return auto.from_pretrained(folder, config=cfg, local_files_only=True, ignore_mismatched_sizes=True,
                                    use_safetensors=path.suffix == ".safetensors",
                                    trust_remote_code=code)
    except ValueError:
        raise
    except Exception as exc:  # UnpicklingError (weights_only=True), a truncated file, safetensors' own errors
        raise RecipeError("model.name", str(weights_error(path, exc))) from None


# -- the prefix fallback ---------------------------------------------------------------------------------
SOURCES = {"timm": (_timm_model, TimmSpec, "timm model"), "hf": (_hf_model, HFSpec, "transformers classifier")}


def _prefixed(previous):
    def fallback(name: str) -> Optional[Entry]:
        prefix, sep, rest = name.partition(":")
        if prefix == "hf" and (sep or not rest):
            require("hf")
            return Entry(name, _hf_model, HFSpec, SOURCES["hf"][2])
        if prefix == "timm" and sep:
            require("timm")
            if not _timm_names(rest):
                raise RecipeError("model.name", f"timm has no model '{rest}'")
            return Entry(name, _timm_model, TimmSpec, SOURCES["timm"][2])
        if prefix == "torchvision" and sep:
            entry = previous(rest)
            if entry is None:
                raise RecipeError("model.name", f"torchvision has no classifier '{rest}'")
            return Entry(name, lambda spec, s, n: entry.obj(spec.model_copy(update={"name": rest}), s, n),
                         entry.config, entry.description)
        return previous(name) if previous else None

    return fallback


def install() -> None:
    MODELS.set_fallback(_prefixed(MODELS._fallback))


install()
