"""What every ``compress`` command shares: one-line errors, the recipe argument and common options.

Apart from ``compress.cli`` so that command modules (``cli_report``, ``cli_sensitivity``) do not import the
group that imports them.
"""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import click

from compress.errors import CompressError, RenamedKeyWarning

EXIT_USAGE = 2
EXIT_PEER = 1  # under torchrun: another process of the run failed


def friendly_errors(fn):
    """User mistakes become one 'error:' line per problem on stderr and exit status 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                _renamed_keys_as_lines()
                return fn(*args, **kwargs)
        except CompressError as exc:
            from compress import distributed

            if distributed.is_main():  # under torchrun every rank meets the same mistake: say it once
                for line in str(exc).splitlines() or [type(exc).__name__]:
                    click.echo(f"error: {line}", err=True)
            sys.exit(EXIT_USAGE)
        except (RuntimeError, OSError) as exc:
            from compress import distributed

            if distributed.env_world_size() <= 1 or not distributed.is_peer_failure(exc):
                raise
            click.echo(f"error: {distributed.peer_failure_line(exc)}", err=True)
            sys.exit(EXIT_PEER)

    return wrapper


def _renamed_keys_as_lines() -> None:
    """Old recipe keys still work: one 'warning:' line each (Python hides DeprecationWarnings by default)."""
    warnings.filterwarnings("default", category=RenamedKeyWarning)
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RenamedKeyWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line


def check_output(option: str, path: Path | None, folder: bool = False) -> None:
    """An output option under a regular file is one line before any work, not a FileExistsError after it."""
    from compress.config import writable_path

    try:
        writable_path(path, folder)
    except ValueError as exc:
        raise CompressError(f"{option}: {exc}") from None


recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
allow_import_opt = click.option(
    "--allow-import", is_flag=True, default=None,
    help="Let model specs with 'import: pkg.module:factory' (in the recipe or a checkpoint) import and call "
         "that code. Only for files you trust. Same as COMPRESS_ALLOW_IMPORT=1.")
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                       help="Override a recipe key, e.g. --set stages.0.train.epochs=1 (repeatable).")
