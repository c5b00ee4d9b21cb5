"""Typed configs validated at the door, with one-line errors that name the recipe key path.

pydantic does the validation; this module only turns its errors into messages a recipe author can
act on (``stages[2].prune.sparsity: expected a number in [0, 1), got 'high'``).
"""
from __future__ import annotations

import functools
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import annotated_types as at
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from compress.errors import RecipeError, RecipeErrors, RenamedKeyWarning
from compress.registry import Registry, did_you_mean

M = TypeVar("M", bound=BaseModel)


INT64_MAX = 2**63 - 1
# Sizes that allocate memory (layer widths, class counts, image sides): a bound refuses 2**64 or
# a typo'd 10**9 at the door instead of as an allocation failure after the data has loaded.
MAX_WIDTH = 1 << 16
Width = Annotated[int, at.Interval(ge=1, le=MAX_WIDTH)]
# numpy takes 32-bit seeds, and stage/epoch seeds derived from the recipe's (x 1000, x 100003) must fit int64.
Seed = Annotated[int, at.Interval(ge=0, le=2**32 - 1)]


def _unbounded(value: Any, where: str = "") -> str | None:
    """The first non-finite float or int beyond int64 inside ``value`` (lists and mappings too), described."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}{where}"
    if isinstance(value, int) and abs(value) > INT64_MAX:
        return f"expected an integer of at most 2**63-1, got {value}{where}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        problem = _unbounded(v, f"{where or ' at '}{f'[{k}]' if isinstance(k, int) else f'.{k}'}")
        if problem:
            return problem
    return None


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are re-validated on assignment.

    No field takes inf/nan (pydantic refuses them per field, with the exact path) or an integer beyond
    int64 (checked below, lists and free-form mappings such as ``kwargs`` included): either would
    validate today and fail later as NaN weights or a torch overflow.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in _reparsed_fields(cls):
            return value
        problem = _unbounded(value)
        if problem:
            raise ValueError(problem)
        return value


@functools.cache
def _reparsed_fields(cls: type) -> frozenset:
    """Fields typed ``Any`` (recipe sections, model specs in stage options): parsed again into a
    StrictModel later, which names the exact key path; checking them here would preempt that."""
    out = set()
    for name, info in cls.model_fields.items():
        ann, _ = _unwrap(info.annotation)
        if ann is Any or (typing.get_origin(ann) is list and typing.get_args(ann) in ((Any,), ())):
            out.add(name)
    return frozenset(out)


def rename_keys(data: Any, renames: dict[str, str], info: ValidationInfo, where: str = "") -> Any:
    """For a ``model_validator(mode="before")``: move old keys to their new names, warning with the key
    path (``validate`` passes it as context; ``where`` outside a recipe). Both names at once is an error."""
    if not isinstance(data, dict) or not any(old in data for old in renames):
        return data
    prefix = (info.context or {}).get("path") or where
    data = dict(data)
    for old, new in renames.items():
        if old in data:
            if new in data:
                raise ValueError(f"give '{new}' only; '{old}' is its old name")
            warnings.warn(f"{join_path(prefix, (old,))}: renamed to '{new}' (same options); the old key will go away",
                          RenamedKeyWarning, stacklevel=2)
            data[new] = data.pop(old)
    return data


def writable_path(p: Path | None, folder: bool = False) -> Path | None:
    """An output path whose existing ancestors are folders (and, for a folder, not itself a file):
    otherwise a FileExistsError after the training. ValueError naming the file in the way."""
    if p is None:
        return p
    for parent in [*reversed(p.parents), *([p] if folder else [])]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"'{parent}' is a file, so '{p}' cannot be written{' as a folder' if parent == p else ' under it'}")
    return p


OutputPath = Annotated[Path, AfterValidator(writable_path)]
OutputDir = Annotated[Path, AfterValidator(functools.partial(writable_path, folder=True))]


def join_path(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _unwrap(ann):
    """Strip Optional/Annotated; return (base annotation, metadata list)."""
    meta: list = []
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            args = typing.get_args(ann)
            ann, meta = args[0], meta + list(args[1:])
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) == 1:
                ann = args[0]
                continue
        return ann, meta


def _field_at(cls: type, loc: tuple):
    """Find the annotation and constraints of the field at ``loc`` inside ``cls``, best effort."""
    ann: Any = cls
    meta: list = []
    for part in loc:
        ann, _ = _unwrap(ann)
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            args = typing.get_args(ann)
            if not args:
                return None, []
            ann, meta = args[0], []
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            info = ann.model_fields[part]
            ann, meta = info.annotation, list(info.metadata)
            continue
        if typing.get_origin(ann) is dict:
            ann, meta = typing.get_args(ann)[1], []
            continue
        return None, []
    base, extra = _unwrap(ann)
    return base, meta + extra


def describe(ann, meta) -> str:
    """'a number in [0, 1)', 'an integer >= 1', "one of 'sgd', 'adam'", ..."""
    if typing.get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    desc = names.get(ann)
    if desc is None:
        origin = typing.get_origin(ann)
        if origin in (list, tuple):
            inner = typing.get_args(ann)
            desc = "a list" + (f" of {describe(inner[0], []).split(' ', 1)[-1]}s" if inner and inner[0] in names else "")
        elif origin is dict:
            desc = "a mapping"
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            desc = "a mapping"
        else:
            desc = "a valid value"
    lo = hi = None
    for m in meta:
        for attr, kind in (("ge", "["), ("gt", "(")):
            if getattr(m, attr, None) is not None:
                lo = (kind, getattr(m, attr))
        for attr, kind in (("le", "]"), ("lt", ")")):
            if getattr(m, attr, None) is not None:
                hi = (kind, getattr(m, attr))
        if isinstance(m, at.Interval):
            if m.ge is not None: lo = ("[", m.ge)
            if m.gt is not None: lo = ("(", m.gt)
            if m.le is not None: hi = ("]", m.le)
            if m.lt is not None: hi = (")", m.lt)
    if lo and hi:
        desc += f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    elif lo:
        desc += f" {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    elif hi:
        desc += f" {'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return desc


def _format(cls: type, err: dict, prefix: str) -> RecipeError:
    kind = err["type"]
    # Drop pydantic's own steps ('function-after[...]', 'list[int]'); an unknown key is always the user's.
    raw = err["loc"][:-1] if kind == "extra_forbidden" else err["loc"]
    loc = tuple(p for p in raw if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    loc += err["loc"][-1:] if kind == "extra_forbidden" else ()
    path = join_path(prefix, loc)
    got = err.get("input")
    if kind == "extra_forbidden":
        parent, _ = _field_at(cls, loc[:-1])
        known = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        hint = did_you_mean(loc[-1], known)
        expected = f"; expected one of {', '.join(known)}" if known and not hint else ""
        return RecipeError(path, f"unknown key{expected}{hint}")
    if kind == "missing":
        return RecipeError(path, "required key is missing")
    if kind in ("value_error", "assertion_error"):
        msg = err.get("msg", "").removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return RecipeError(path, msg)
    ctx = err.get("ctx") or {}
    if kind == "string_pattern_mismatch":
        return RecipeError(path, f"expected a string matching {ctx.get('pattern')}, got {got!r}")
    if kind == "too_short":
        return RecipeError(path, f"expected at least {ctx.get('min_length')} item(s), got {got!r}")
    if kind == "too_long":
        return RecipeError(path, f"expected at most {ctx.get('max_length')} item(s), got {got!r}")
    ann, meta = _field_at(cls, loc)
    if kind == "finite_number" and ann is None:
        return RecipeError(path, f"expected a finite number, got {got!r}")
    if ann is None:
        return RecipeError(path, f"{err.get('msg', 'invalid value')}, got {got!r}")
    desc = describe(ann, meta)
    if kind == "finite_number":
        desc = desc.replace("a number", "a finite number", 1)
    hint = ""
    if typing.get_origin(ann) is Literal and isinstance(got, str):
        hint = did_you_mean(got, [str(a) for a in typing.get_args(ann)])
    return RecipeError(path, f"expected {desc}, got {got!r}{hint}")


class MethodConfig(StrictModel):
    """A config whose ``method`` picks the concrete class: one config class per method, each registered
    in the family's ``METHODS`` registry (torchao's pattern), so a new method is one new class.

    ``Family(method="x", ...)`` and recipe validation both build the registered class of method "x".
    """

    METHODS: ClassVar[Registry]  # set on the family's base class: method name -> config class
    DEFAULT: ClassVar[str]
    method: str

    def __new__(cls, *args, **data):
        return super().__new__(cls.dispatch(data))

    @classmethod
    def dispatch(cls, data: Any, path: str = "") -> type:
        """The concrete class for ``data`` (a concrete class is its own answer)."""
        if "METHODS" not in cls.__dict__:
            return cls
        name = data.get("method", cls.DEFAULT) if isinstance(data, dict) else cls.DEFAULT
        names = cls.METHODS.names()
        if not isinstance(name, str) or name not in names:
            key = f"{path}.method" if path else "method"
            raise RecipeError(key, f"expected one of {', '.join(repr(n) for n in names)}, got {name!r}"
                                   f"{did_you_mean(str(name), names)}")
        return cls.METHODS.get(name).config


def validate(cls: type[M], data: Any, prefix: str = "") -> M:
    """Validate ``data`` into ``cls``; raise RecipeErrors whose lines start with the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(prefix, f"expected a mapping, got {data!r}")
    cls = cls.dispatch(data, prefix) if isinstance(cls, type) and issubclass(cls, MethodConfig) else cls
    try:
        return cls.model_validate(data, context={"path": prefix})
    except ValidationError as exc:
        errors = [_format(cls, e, prefix) for e in exc.errors(include_url=False)]
        raise RecipeErrors(errors) from None
