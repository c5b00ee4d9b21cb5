"""Name -> factory registries (as in timm): models, datasets, stages, and small plug-ins."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from compress.errors import RecipeError

T = TypeVar("T")
_POPULATED = False


def _populate() -> None:
    """Import every module that registers plug-ins (``compress._load_all``), once, before a registry is
    read: ``import compress`` is lazy, so a checkpoint loaded right after ``from compress.checkpoint import
    load_model`` still finds the transforms, stages and methods registered elsewhere."""
    global _POPULATED
    if not _POPULATED:
        _POPULATED = True
        importlib.import_module("compress")._load_all()  # by name: not an import edge of this leaf module


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    config: type | None
    description: str
    extra: dict = field(default_factory=dict)


class Registry(Generic[T]):
    """A named collection of plug-ins, each with an optional typed config class."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._fallback: Callable[[str], Entry[T] | None] | None = None

    def register(self, name: str, *, config: type | None = None, description: str = "", **extra: Any):
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            doc = description or ((obj.__doc__ or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, obj, config, doc, dict(extra))
            return obj

        return deco

    def set_fallback(self, fn: Callable[[str], "Entry[T] | None"]) -> None:
        """Resolve names outside the registry (for example any torchvision model)."""
        self._fallback = fn

    def get(self, name: str, path: str = "") -> Entry[T]:
        if name not in self._entries:
            _populate()
        if name in self._entries:
            return self._entries[name]
        if self._fallback is not None:
            entry = self._fallback(name)
            if entry is not None:
                return entry
        choices = sorted(self._entries)
        raise RecipeError(
            path, f"unknown {self.kind} '{name}'; expected one of {', '.join(choices)}{did_you_mean(name, choices)}"
        )

    def __contains__(self, name: str) -> bool:
        if name not in self._entries:
            _populate()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        _populate()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        _populate()
        return sorted(self._entries)
