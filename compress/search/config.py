"""The recipe's ``search:`` section, and the space's key paths checked against the recipe before anything trains.

A space entry maps a recipe key path (``stages.2.prune.sparsity``, the ``--set`` syntax) to a list of
choices or a ``{low, high}`` range. The string ``none`` as a choice of a ``stages.N...`` path removes
stage N from that trial's recipe (e.g. no quantization).
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from compress.config import StrictModel, validate
from compress.errors import RecipeError, RecipeErrors
from compress.recipe import apply_override, parse_recipe

SKIP = "none"  # a choice that drops the stage its key path is in
OBJECTIVES = ("accuracy", "latency", "size", "macs")


class RangeSpec(StrictModel):
    low: float
    high: float
    step: Optional[float] = Field(None, gt=0)
    log: bool = False
    int: bool = False  # suggest integers (widths, epochs)

    @model_validator(mode="after")
    def _order(self):
        if self.low > self.high:
            raise ValueError(f"expected low <= high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self


class ConstraintsConfig(StrictModel):
    """Measured against the recipe's first stage's model (the teacher), on the validation split."""

    max_drop: Optional[float] = Field(None, ge=0)  # accuracy points lost (0.005 = 0.5 points); for RMSE: rise
    speedup: Optional[float] = Field(None, gt=0)  # at least this many times faster (backend, batch_size below)
    max_size: Optional[float] = Field(None, gt=0)  # bytes of the deployable file
    max_latency_ms: Optional[float] = Field(None, gt=0)


class BackendConfig(StrictModel):
    name: Literal["onnxruntime", "pytorch"] = "onnxruntime"
    batch_size: int = Field(32, ge=1)
    runs: int = Field(30, ge=5)  # interleaved samples with the teacher per trial
    max_seconds: float = Field(3.0, gt=0)
    threads: int = Field(1, ge=1)


class FidelityConfig(StrictModel):
    """Cheap first: every trial trains the stages the space varies at ``low`` x their epochs on a seeded ``data``
    fraction of the training split; only trials whose optimistic low-fidelity point is not dominated by the
    full-budget front get the full budget."""

    enabled: bool = True
    low: float = Field(0.34, gt=0, le=1)
    data: float = Field(0.5, gt=0, le=1)  # share of the training split at low fidelity (val is always whole)
    optimism: float = Field(0.02, ge=0)  # accuracy a full fine-tune may add, until promoted trials measure it


class SearchConfig(StrictModel):
    objectives: dict[Literal["accuracy", "latency", "size", "macs"], Literal["max", "min"]] = Field(
        default_factory=lambda: {"accuracy": "max", "latency": "min"}, min_length=1)
    constraints: ConstraintsConfig = ConstraintsConfig()
    backend: BackendConfig = BackendConfig()
    trials: int = Field(40, ge=1)
    time_limit: Optional[float] = None  # seconds, or '45m', '2h' (read as seconds)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: Optional[int] = None  # default: the recipe's seed
    jobs: int = Field(1, ge=1)  # worker processes on the shared study (latency measured one trial at a time)
    fidelity: FidelityConfig = FidelityConfig()
    space: dict[str, Any] = Field(min_length=1)

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Optional[float]:
        return None if v is None else parse_duration(v)  # a ValueError names search.time_limit


def parse_duration(v: Union[float, str]) -> float:
    """'45m', '90s', '1.5h' or a number of seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not v > 0:  # nan too
            raise ValueError(f"expected a positive duration, got {v}")
        return float(v)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(v))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a duration like 45m, 90s or 2h, got {v!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_search(doc: dict, path: str = "search") -> SearchConfig:
    """Validate the ``search:`` section and every value of its space against the recipe (one error per line)."""
    if not isinstance(doc.get("search"), dict):
        raise RecipeError(path, "expected a 'search:' section with at least 'space:' (recipe key paths -> choices)")
    cfg = validate(SearchConfig, doc["search"], path)
    base = strip_search(doc)
    errors: list[RecipeError] = []
    for key, spec in cfg.space.items():
        where = f"{path}.space.{key}"
        try:
            values = _values(spec, where)
            _lookup(base, key, where)
            _not_the_reference(base, key, where)
            for v in values:
                trial_doc(base, {key: v}, where=where)
        except RecipeErrors as exc:
            errors.extend(exc.errors)
        except RecipeError as exc:
            errors.append(exc)
    if errors:
        raise RecipeErrors(errors)
    return cfg


def _values(spec: Any, where: str) -> list:
    """The values to check: every choice, or a range's ends."""
    if isinstance(spec, list):
        if not spec:
            raise RecipeError(where, "expected at least one choice")
        return spec
    if isinstance(spec, dict):
        r = validate(RangeSpec, spec, where)
        cast = int if r.int else float
        return [cast(r.low), cast(r.high)]
    raise RecipeError(where, f"expected a list of choices or a {{low, high}} range, got {spec!r}")


def teacher_only(stage) -> bool:
    """A stage that trains the teacher and leaves the student as built (the reference stage of a search)."""
    return isinstance(stage, dict) and list(stage) == ["train"] and isinstance(stage["train"], dict) \
        and stage["train"].get("target") == "teacher"


def first_stage(base: dict, key: str) -> int:
    """The first stage whose result a space key can change (a student's ``model`` key: the first stage
    after the teacher-only ones)."""
    k = stage_of(key)
    if k is not None:
        return k
    if key.split(".")[0] == "model":
        return next((i for i, s in enumerate(base["stages"]) if not teacher_only(s)), len(base["stages"]))
    if key.split(".")[0] in ("seed", "data", "teacher"):
        return 0
    return len(base["stages"])  # name, benchmark, output: no stage's models depend on them


def _not_the_reference(base: dict, key: str, where: str) -> None:
    """The first stage's model is the reference every trial is measured against and distils from: one per
    search, trained once, so no searched key may change it."""
    if first_stage(base, key) == 0:
        raise RecipeError(where, "changes the first stage's model, the reference every trial is measured against "
                                 "(and distils from): a search trains it once; search the stages after it")


def range_spec(spec: Any) -> Optional[RangeSpec]:
    return RangeSpec(**spec) if isinstance(spec, dict) else None


def strip_search(doc: dict) -> dict:
    """The recipe without its search section: what every trial runs (with the sampled values set)."""
    return {k: copy.deepcopy(v) for k, v in doc.items() if k != "search"}


def _lookup(doc: dict, key: str, where: str) -> Any:
    node: Any = doc
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise RecipeError(where, f"the recipe has no key '{part}' here (a key path must name an existing recipe value)")
    return node


def stage_of(key: str) -> Optional[int]:
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit() else None


def trial_doc(base: dict, params: dict[str, Any], where: Optional[str] = None) -> dict:
    """``base`` with the sampled values set, stages chosen as ``none`` removed; validated (RecipeError naming
    ``where`` or the search.space key when a value is rejected)."""
    doc = copy.deepcopy(base)
    drop = set()
    for key, value in params.items():
        if value == SKIP and stage_of(key) is not None:
            drop.add(stage_of(key))
            continue
        apply_override(doc, f"{key}={json.dumps(value)}")  # JSON is YAML: the value arrives as given
    doc["stages"] = [s for i, s in enumerate(doc["stages"]) if i not in drop]
    try:
        parse_recipe(doc)
    except (RecipeErrors, RecipeError) as exc:
        lines = [str(e) for e in getattr(exc, "errors", [exc])]
        label = where or "search.space"
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
        raise RecipeError(label, f"{shown} is rejected by the recipe: {lines[0]}") from None
    return doc
