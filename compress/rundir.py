"""Run directories: plain names, a marker that says compress made the folder, and a lock while a run lives.

Rules (README, "Security"):
- a run name is a plain folder name (no '.'/'..', no separators, at most NAME_MAX characters);
- a new run never writes into a folder that has files; ``--force`` empties only a folder that holds the
  MARKER file *and* lies under ``runs/`` or is the ``--out`` given explicitly (never a recipe's
  ``output.dir`` elsewhere); an output file outside the run directory (``export.path``) is never replaced
  without ``--force``, and then only if it is an ``.onnx`` file;
- a run holds an exclusive lock on its folder for its lifetime, so a second run, ``--force`` or
  ``--resume`` on a live folder is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from compress.errors import CompressError

MARKER = ".compress-run"  # JSON, written when compress creates (or takes over) a run directory
LOCK = ".compress.lock"  # holds the pid of the run that has it locked
RUNS = Path("runs")
NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")

try:  # fcntl.flock is POSIX stdlib: the kernel drops the lock when the holder dies, so a lock left by a
    import fcntl  # killed run is stale by construction and no lock library (filelock, ...) is needed.
except ImportError:  # pragma: no cover  (Windows: runs are not locked)
    fcntl = None


def check_run_name(name: str) -> str:
    """A run name becomes a folder under ``runs/``: refuse anything that could point elsewhere."""
    if not (isinstance(name, str) and len(name) <= NAME_MAX and _NAME.fullmatch(name)):
        raise ValueError(f"expected a plain run name (letters, digits, '_', '-', '.', not starting with '.', "
                         f"at most {NAME_MAX} characters), got {name!r}")
    return name


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.compress.lock`` with the holder's pid written in it.

    The file stays when the run ends (deleting a lock file races with a process about to lock it); a
    file whose lock nobody holds is stale and is simply taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        """True if this process now holds the lock, False if a live run holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: held by another open file (another process or thread)
                os.close(fd)
                return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _busy(run_dir: Path, lock: RunLock) -> CompressError:
    return CompressError(f"{run_dir}: in use by a running compress ({lock.holder()}); wait for it to end, "
                         "or use --out for another run directory")


def _exists(run_dir: Path) -> CompressError:
    return CompressError(f"{run_dir}: run directory exists; use --resume to continue it, --force to replace it, "
                         "or --out for another one")


def _has_files(d: Path) -> bool:
    return d.is_dir() and any(p.name != LOCK for p in d.iterdir())


def is_run_dir(d: Path) -> bool:
    """True if compress made ``d`` (its MARKER file names compress)."""
    try:
        return json.loads((d / MARKER).read_text()).get("tool") == "compress"
    except (OSError, ValueError, AttributeError):
        return False


def is_inside(root: Path, path: Path) -> bool:
    """True if ``path``, symlinks resolved, lies under ``root`` (a link out of it is not inside)."""
    try:
        return Path(root).resolve() in Path(path).resolve().parents
    except (OSError, RuntimeError):  # a symlink loop
        return False


def check_inside(root: Path, path: Path, what: str) -> Path:
    """``path`` if it stays inside ``root`` (symlinks resolved), else one line naming ``what`` and the path."""
    if not is_inside(root, path):
        raise CompressError(f"{what}: {path} resolves outside {root}; refusing to read or write it")
    return Path(path)


def _under_runs(d: Path) -> bool:
    runs, target = RUNS.resolve(), d.resolve()
    return target != runs and runs in target.parents


def _write_marker(d: Path, name: str) -> None:
    from compress.utils import write_json

    write_json(d / MARKER, {"tool": "compress", "recipe": name})


def _locked(d: Path) -> RunLock:
    if d.exists() and not d.is_dir():
        raise CompressError(f"{d}: exists and is not a directory; use --out for the run directory")
    d.mkdir(parents=True, exist_ok=True)
    lock = RunLock(d)
    if not lock.acquire():
        raise _busy(d, lock)
    return lock


def latest_run(default: Path) -> Path:
    """This recipe's newest directory: runs/<name> or runs/<name>-<n> (not runs/<name>_other)."""
    candidates = sorted((p for p in default.parent.glob(f"{default.name}*")
                         if p.name == default.name or re.fullmatch(rf"{re.escape(default.name)}-\d+", p.name)),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else default


def open_run_dir(out: Optional[Path], default: Path, name: str, *, resume: bool = False,
                 force: bool = False, saved: str = "recipe.yaml") -> tuple[Path, RunLock]:
    """Pick the run directory, lock it, and empty it for ``force``; the caller releases the lock.

    ``out``: the directory the caller named (``--out``, ``run(out=...)``); ``default``: the recipe's
    (``output.dir`` or ``runs/<name>``), made unique for a new run unless ``force``; ``saved``: the file
    an earlier run left that ``resume`` needs (``compress search`` keeps ``search.yaml``).
    """
    if resume and force:
        raise CompressError("--resume and --force exclude each other")
    if resume:
        d = out if out is not None else latest_run(default)
        if not (d / saved).is_file():
            raise CompressError(f"{d}: nothing to resume (no {saved} from an earlier run)")
        return d, _locked(d)
    if out is None and not force:
        return _new_default(default, name)
    d = out if out is not None else default
    if _has_files(d):
        if not force:
            raise _exists(d)
        if not is_run_dir(d):
            raise CompressError(f"{d}: --force replaces only a run directory made by compress (with a {MARKER} "
                                "file); this one has none, so nothing was deleted: remove it yourself or use --out")
        if out is None and not _under_runs(d):
            raise CompressError(f"{d}: --force replaces output.dir only under {RUNS}/; nothing was deleted: "
                                "name it with --out to replace it, or remove it yourself")
    lock = _locked(d)
    try:
        if _has_files(d) and not force:  # filled between the check and the lock
            raise _exists(d)
        for p in d.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        _write_marker(d, name)
    except BaseException:
        lock.release()
        raise
    return d, lock


def _new_default(default: Path, name: str) -> tuple[Path, RunLock]:
    """The first of default, default-2, ... that has no files and no live run in it."""
    d, n = default, 2
    while True:
        if not _has_files(d) and not (d.exists() and not d.is_dir()):
            d.mkdir(parents=True, exist_ok=True)
            lock = RunLock(d)
            if lock.acquire():
                if not _has_files(d):
                    _write_marker(d, name)
                    return d, lock
                lock.release()
        d, n = default.with_name(f"{default.name}-{n}"), n + 1


def check_output_file(path: Path, key: str, run_dir: Path, *, force: bool, resume: bool) -> None:
    """An output file outside the run directory (``export.path``) follows the run directory's rule:
    never replaced without ``--force``, and then only if it is an ``.onnx`` file; on ``--resume``, a file
    written since the run began is its own."""
    path = Path(path)
    if path.is_symlink():  # writers follow links: the name could be an .onnx while the target is anything
        raise CompressError(f"{key}: {path} is a symbolic link (to {os.readlink(path)}); compress does not write "
                            "through links: choose another path")
    try:
        inside = run_dir.resolve() in path.resolve().parents
    except OSError:
        inside = False
    if inside or not (path.exists() or path.is_symlink()):
        return
    if not path.is_file():
        raise CompressError(f"{key}: {path} exists and is not a file; choose another path")
    if resume:
        since = run_dir / MARKER if (run_dir / MARKER).is_file() else run_dir / "recipe.yaml"
        if since.is_file() and path.stat().st_mtime >= since.stat().st_mtime:
            return
    if not force:
        raise CompressError(f"{key}: {path} exists; use --force to replace it, or choose another path")
    if path.suffix != ".onnx":
        raise CompressError(f"{key}: {path} exists and is not an .onnx file; --force replaces only .onnx files "
                            "there; choose another path")
