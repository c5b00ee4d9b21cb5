"""Recipes: YAML in, typed objects out. Parsed and validated once, at the door.

A recipe is plain data (``yaml.safe_load``: no tags that run code). ``${VAR}`` and ``${VAR:-default}``
read the environment; ``--set a.b.0.c=value`` overrides any key. Every problem is reported as
``<key path>: <what was expected>``. Values read from the environment stay in memory: the recipe saved
beside a run keeps ``${VAR}`` as written, and error messages show ``${VAR}`` instead of the value.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, field_validator

from compress import yamlsafe
from compress.config import OutputDir, Seed, StrictModel, validate
from compress.data.bundle import DataSpec, parse_data_spec
from compress.errors import RecipeError, RecipeErrors
from compress.models.registry import ImportSpec, ModelSpec, parse_model_spec
from compress.rundir import check_run_name
from compress.stages.base import MODEL_LIST, MODEL_SPEC, STAGES, check_chain
from compress.safety import checking_only, redacting
from compress.variables import interpolate  # noqa: F401  (re-exported: recipe users resolve ${VAR}s here)

class OutputConfig(StrictModel):
    dir: Optional[OutputDir] = None  # default: runs/<recipe name>


class _RecipeTop(StrictModel):
    name: str
    seed: Seed = 0
    data: Any
    model: Any
    teacher: Any = None
    stages: list[Any] = Field(min_length=1)
    benchmark: Any = None
    output: OutputConfig = OutputConfig()
    search: Any = None  # read by `compress search` (compress.search.config); a run ignores it

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)  # the name becomes a folder under runs/: no '..', no separators


@dataclass
class StageSpec:
    name: str
    config: Any
    index: int

    @property
    def path(self) -> str:
        return f"stages[{self.index}].{self.name}"


@dataclass
class Recipe:
    name: str
    seed: int
    data: DataSpec
    model: ModelSpec
    teacher: Optional[ModelSpec]
    stages: list[StageSpec]
    benchmark: Any
    output: OutputConfig
    raw: dict = field(default_factory=dict)  # the document as written (+ --set), ${VAR}s unresolved: saved beside the run
    secrets: dict = field(default_factory=dict)  # environment value -> variable name, kept out of files and errors

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)

    def import_specs(self) -> list[tuple[str, ImportSpec]]:
        """``(key path, spec)`` for every model spec that imports user code."""
        return [(path, spec) for path, spec in [("model", self.model), ("teacher", self.teacher)] + [
                (f"{s.path}.{p}", v) for s in self.stages for p, v in model_fields(s.config)]
                if isinstance(spec, ImportSpec)]

    def imports(self) -> list[tuple[str, str]]:
        """``(key path, 'pkg.module:factory')`` for every model spec that imports user code."""
        return [(f"{path}.import", spec.import_) for path, spec in self.import_specs()]


def apply_override(doc: dict, assignment: str) -> None:
    """Apply ``a.b.0.c=value`` (value parsed as YAML) to ``doc`` in place."""
    if "=" not in assignment:
        raise RecipeError("--set", f"expected KEY.PATH=VALUE, got '{assignment}'")
    key, _, text = assignment.partition("=")
    try:
        value = yamlsafe.loads(text)
    except yamlsafe.Refused as exc:
        raise RecipeError(f"--set {key}", exc.problem) from None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = doc
    shown = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}", f"{shown or 'root'} is a list of {len(node)}; expected an index below {len(node)}, got '{part}'")
            shown += f"[{part}]"
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            shown = f"{shown}.{part}" if shown else part
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"--set {key}", f"{shown} is {node!r}, not a mapping or list")


def read_yaml(path: str | Path) -> dict:
    doc = yamlsafe.load_file(path)  # bounded: duplicate keys, alias bombs, deep nesting, odd tags refused
    if not isinstance(doc, dict):
        raise RecipeError("", f"{path}: expected a mapping of recipe keys at the top level, got {type(doc).__name__}")
    return doc


def parse_recipe(doc: dict, overrides: tuple[str, ...] | list[str] = (), env: dict | None = None) -> Recipe:
    """Turn a raw document into a typed Recipe, or raise RecipeError(s) naming the key path."""
    doc = copy.deepcopy(doc)
    for o in overrides:
        apply_override(doc, o)
    secrets: dict[str, str] = {}
    resolved = interpolate(doc, env, used=secrets)
    with redacting(secrets), checking_only():
        recipe = _parse_resolved(resolved, raw=doc)
    recipe.secrets = secrets
    return recipe


def _parse_resolved(doc: dict, raw: dict) -> Recipe:
    import compress.stages  # noqa: F401  (registers every stage)
    from compress.measure.config import BenchmarkConfig

    top = validate(_RecipeTop, doc)
    errors: list[RecipeError] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except RecipeErrors as exc:
            errors.extend(exc.errors)
        except RecipeError as exc:
            errors.append(exc)
        return None

    data = attempt(parse_data_spec, top.data, "data")
    model = attempt(parse_model_spec, top.model, "model")
    teacher = attempt(parse_model_spec, top.teacher, "teacher") if top.teacher is not None else None
    bench = attempt(validate, BenchmarkConfig, top.benchmark or {}, "benchmark")
    stages: list[StageSpec] = []
    for i, item in enumerate(top.stages):
        spec = attempt(_parse_stage, item, i)
        if spec is not None:
            stages.append(spec)
    if errors:
        raise RecipeErrors(errors)
    attempt(check_chain, stages)
    if errors:
        raise RecipeErrors(errors)
    recipe = Recipe(top.name, top.seed, data, model, teacher, stages, bench, top.output, raw=raw)
    for s in stages:
        check = STAGES.get(s.name).extra.get("check")
        if check is not None:
            attempt(check, recipe, s.index, s.config)
    if errors:
        raise RecipeErrors(errors)
    return recipe


def _parse_stage(item: Any, i: int) -> StageSpec:
    path = f"stages[{i}]"
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(path, f"expected one stage name mapping to its options (like 'train: {{epochs: 5}}'), got {item!r}")
    (name, options), = item.items()
    entry = STAGES.get(str(name), path)
    cfg = validate(entry.config, options or {}, f"{path}.{name}")
    resolve_model_fields(cfg, f"{path}.{name}")
    return StageSpec(str(name), cfg, i)


def model_fields(cfg: StrictModel) -> list[tuple[str, Any]]:
    """``(option path, model spec)`` for the model specs among a stage's options (lists flattened)."""
    out = []
    for fname, info in type(cfg).model_fields.items():
        if MODEL_SPEC in info.metadata:
            value = getattr(cfg, fname)
            out.extend([(f"{fname}[{j}]", v) for j, v in enumerate(value)] if isinstance(value, list) else [(fname, value)])
    return out


def resolve_model_fields(cfg: StrictModel, path: str) -> None:
    """Replace raw mappings in ModelField options by typed ModelSpecs (lists of them too)."""
    for fname, info in type(cfg).model_fields.items():
        if MODEL_SPEC not in info.metadata:
            continue
        value = getattr(cfg, fname)
        if isinstance(value, dict):
            value = parse_model_spec(value, f"{path}.{fname}")
        elif isinstance(value, list):
            if MODEL_LIST not in info.metadata:
                raise RecipeError(f"{path}.{fname}", "expected one model spec (a mapping with a 'name' key), got a list")
            value = [parse_model_spec(v, f"{path}.{fname}[{j}]") if isinstance(v, dict) else v
                     for j, v in enumerate(value)]
        object.__setattr__(cfg, fname, value)


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = (), env: dict | None = None) -> Recipe:
    """Parse a recipe file; its ``import:`` models are looked up in the recipe's folder first."""
    recipe = parse_recipe(read_yaml(path), overrides, env)
    folder = str(Path(path).resolve().parent)
    for _, spec in recipe.import_specs():
        if folder not in spec.search_path:
            spec.search_path = [folder, *spec.search_path]
    return recipe
