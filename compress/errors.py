"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""
from __future__ import annotations


class CompressError(Exception):
    """A problem with the user's input (recipe, files, data, model), never a bug in compress."""

    exit_code = 2


def error_line(exc: BaseException, n: int = 160) -> str:
    """``Type: first line of the message``, cut to ``n`` characters: an exception on crafted input as a part
    of one error line."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text if len(text) <= n else text[:n] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RecipeError(CompressError):
    """A recipe problem at a key path such as ``stages[2].prune.sparsity``."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class RecipeErrors(CompressError):
    """Several recipe problems found in one pass; printed one per line."""

    def __init__(self, errors: list[RecipeError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class RenamedKeyWarning(DeprecationWarning):
    """A recipe key under its old name: still read; the CLI shows it as one 'warning:' line."""
