"""What compress may import, download and echo: the opt-in for user code named in data (``import:``
specs, and a model or tokenizer folder's own Python), when the network may be used, and secret redaction.

A recipe or a checkpoint is data, but a model spec ``import: pkg.module:factory`` makes compress import
that module and call the factory with the file's keyword arguments: loading such a file runs code. That
happens only with an explicit opt-in: ``allow_import=True`` in the API, ``--allow-import`` on the command
line, or ``COMPRESS_ALLOW_IMPORT=1`` in the environment. Built-in registry names (and torchvision
classifiers) need none. A transformers folder whose config names classes in ``auto_map`` asks to run
the Python files beside it: the same opt-in applies, and it is asked for here, never on stdin.

Only a recipe being run (``compress run``, ``search``) may download (a hub id, timm's ``pretrained``);
loading a checkpoint or packed file and checking a recipe read local files and the library caches only.
"""
from __future__ import annotations

import contextvars
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager, Iterator, Optional

from compress.errors import CompressError, RecipeError, RecipeErrors

ALLOW_IMPORT_ENV = "COMPRESS_ALLOW_IMPORT"
ALLOW_IMPORT_HINT = f"pass --allow-import (Python: allow_import=True, or set {ALLOW_IMPORT_ENV}=1) if you trust it"

# Set for the lifetime of a run that was allowed to import: every checkpoint it reloads (resume, the
# baseline row, an early-stopped teacher) was made from the same recipe.
_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("compress_allow_import", default=False)


def import_allowed(flag: Optional[bool] = None) -> bool:
    """An explicit flag wins; otherwise an enclosing ``allowing_imports()`` or the environment variable."""
    if flag is not None:
        return bool(flag)
    return _ALLOWED.get() or os.environ.get(ALLOW_IMPORT_ENV, "") == "1"


@contextmanager
def _setting(var: contextvars.ContextVar, value: object) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextmanager
def allowing_imports(flag: Optional[bool] = None) -> Iterator[bool]:
    """Make ``import_allowed()`` answer ``flag`` (resolved as above) inside the block."""
    with _setting(_ALLOWED, import_allowed(flag)):
        yield _ALLOWED.get()


# Set while a recipe is only parsed and checked (stage checks may build models to look at layer names):
# an import: spec is then never resolved, whatever the opt-in says.
_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar("compress_checking_recipe", default=False)


def checking_only() -> ContextManager[None]:
    return _setting(_CHECKING, True)


def imports_blocked() -> bool:
    return _CHECKING.get()


def import_refused(target: object) -> str:
    """Why an ``import:`` spec is not resolved, in one line (the names are escaped: they are data)."""
    module = str(target).partition(":")[0]
    return f"imports module {module!r} ({str(target)!r}) and so would run code from it; {ALLOW_IMPORT_HINT}"


# -- a model or tokenizer folder's own Python ----------------------------------------------------------
CODE_FILES = ("config.json", "tokenizer_config.json")  # where transformers looks for auto_map on our paths


def asks_for_code(folder: str | Path) -> Optional[str]:
    """The file in ``folder`` whose ``auto_map`` names Python classes to load from the folder, or None.

    Read here (plain JSON) so the refusal comes before transformers, which would ask on stdin."""
    for name in CODE_FILES:
        try:
            doc = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or unreadable: transformers reports that itself
            continue
        if isinstance(doc, dict) and doc.get("auto_map"):
            return name
    return None


def code_refused(source: str, where: str) -> str:
    """Why a folder's (or hub id's) own Python is not run, in one line."""
    why = "it is never run while a recipe is only checked" if imports_blocked() else ALLOW_IMPORT_HINT
    return f"'{source}' asks to run its own Python (auto_map in {where}); {why}"


def trust_remote_code(folder: Optional[str | Path], key: str) -> bool:
    """transformers' ``trust_remote_code``: the import opt-in, never while a recipe is only checked. Without
    it a local ``folder`` that asks for its code is refused here (``key``: the recipe key path)."""
    allowed = import_allowed() and not imports_blocked()
    where = None if allowed or not folder else asks_for_code(folder)
    if where:
        raise RecipeError(key, code_refused(str(folder), where))
    return allowed


# -- downloads ------------------------------------------------------------------------------------------
_OFFLINE: contextvars.ContextVar[str] = contextvars.ContextVar("compress_offline", default="")


def offline(why: str) -> ContextManager[None]:
    """No downloads inside the block; ``why`` ('while m.pt is loaded') ends the message of what is refused."""
    return _setting(_OFFLINE, why)


def offline_reason() -> str:
    """'' when a download may happen (a recipe being run), else why not."""
    return _OFFLINE.get() or ("while a recipe is only checked" if _CHECKING.get() else "")


# -- secrets ------------------------------------------------------------------------------------------
MIN_SECRET_LEN = 4  # shorter values ("1", "cpu") would blank out ordinary words in messages


def redact(text: str, secrets: dict[str, str]) -> str:
    """Replace every value that came from the environment by the ``${VAR}`` it came from."""
    for value in sorted(secrets, key=len, reverse=True):  # longest first: a value may contain another
        text = text.replace(value, f"${{{secrets[value]}}}")
    return text


def redact_error(exc: CompressError, secrets: dict[str, str]) -> CompressError:
    """Rewrite ``exc``'s message (and its parts) in place so that no environment value is echoed."""
    if not secrets:
        return exc
    if isinstance(exc, RecipeErrors):
        for e in exc.errors:
            redact_error(e, secrets)
        exc.args = ("\n".join(str(e) for e in exc.errors),)
    elif isinstance(exc, RecipeError):
        exc.path, exc.message = redact(exc.path, secrets), redact(exc.message, secrets)
        exc.args = (f"{exc.path}: {exc.message}" if exc.path else exc.message,)
    else:
        exc.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in exc.args)
    return exc


# The environment values of the run in progress: every file compress writes inside ``redacting()`` goes
# through ``scrub`` (compress.utils' writers, checkpoint specs, packed headers), so none holds a value.
_SECRETS: contextvars.ContextVar[dict] = contextvars.ContextVar("compress_secrets", default={})


@contextmanager
def redacting(secrets: dict[str, str]) -> Iterator[None]:
    """Inside the block, errors do not echo the values in ``secrets`` and files written do not hold them."""
    token = _SECRETS.set({**_SECRETS.get(), **secrets})
    try:
        yield
    except CompressError as exc:
        redact_error(exc, secrets)  # in place: the traceback and suppressed context stay as raised
        raise
    finally:
        _SECRETS.reset(token)


def scrub(obj):
    """``obj`` with every environment value of the enclosing ``redacting()`` put back as ``${VAR}``
    (strings and paths inside dicts, lists and tuples; anything else is returned as it is)."""
    secrets = _SECRETS.get()
    if not secrets:
        return obj
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, os.PathLike):
        return type(obj)(redact(os.fspath(obj), secrets))
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v) for v in obj)
    return obj
