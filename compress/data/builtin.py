"""Built-in datasets: digits (scikit-learn, offline), mnist (IDX files), npz, csv, synthetic."""
from __future__ import annotations

import gzip
import io
import math
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from compress.config import MAX_WIDTH, Seed, Width
from compress.data.bundle import DataBundle, DataSpec, read_utf8, register_dataset, tensor_splits
from compress.errors import RecipeError


def _bundle(spec: DataSpec, x, y, *, task="classification", test=None, num_outputs=None, classes=None) -> DataBundle:
    train, val, test_ds = tensor_splits(x, y, spec, test)
    if num_outputs is None:
        num_outputs = int(y.max()) + 1 if task == "classification" else (y.shape[1] if y.ndim > 1 else 1)
    return DataBundle(train, val, test_ds, task=task, num_outputs=num_outputs, input_shape=tuple(x.shape[1:]),
                      batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size,
                      num_workers=spec.num_workers, classes=classes)


@register_dataset("digits", description="scikit-learn's 1,797 8x8 handwritten digits (offline), 10 classes")
def digits(spec: DataSpec) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    return _bundle(spec, x, torch.tensor(d.target, dtype=torch.long), classes=[str(c) for c in range(10)])


MAX_SYNTHETIC_VALUES = 1 << 28  # 1 GiB of float32


class SyntheticSpec(DataSpec):
    num_samples: int = Field(512, ge=8, le=1 << 24)
    num_classes: int = Field(4, ge=2, le=MAX_WIDTH)
    shape: list[Width] = Field(default_factory=lambda: [1, 8, 8], min_length=1)
    task: Literal["classification", "regression"] = "classification"
    noise: float = Field(0.5, ge=0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _fits(self) -> "SyntheticSpec":
        values = self.num_samples * int(np.prod(self.shape))
        if values > MAX_SYNTHETIC_VALUES:
            raise ValueError(f"num_samples x shape is {values} values; at most {MAX_SYNTHETIC_VALUES} "
                             "(it is held in memory)")
        return self


@register_dataset("synthetic", config=SyntheticSpec,
                  description="random class prototypes plus noise: learnable, tiny, for tests")
def synthetic(spec: SyntheticSpec) -> DataBundle:
    g = torch.Generator().manual_seed(spec.seed)
    n, shape = spec.num_samples, tuple(spec.shape)
    if spec.task == "classification":
        protos = torch.randn((spec.num_classes, *shape), generator=g)
        y = torch.randint(0, spec.num_classes, (n,), generator=g)
        x = protos[y] + spec.noise * torch.randn((n, *shape), generator=g)
        return _bundle(spec, x, y)
    x = torch.randn((n, *shape), generator=g)
    w = torch.randn((int(np.prod(shape)), spec.num_classes), generator=g) / np.sqrt(np.prod(shape))
    y = x.flatten(1) @ w + spec.noise * 0.1 * torch.randn((n, spec.num_classes), generator=g)
    return _bundle(spec, x, y, task="regression")


class FileSpec(DataSpec):
    path: Path
    task: Literal["classification", "regression"] = "classification"

    @field_validator("path")
    @classmethod
    def _exists(cls, p: Path) -> Path:
        if not p.is_file():
            raise ValueError(f"expected an existing file, got '{p}' (no such file)")
        return p


class NpzSpec(FileSpec):
    x_key: str = "x"
    y_key: str = "y"


@register_dataset("npz", config=NpzSpec, description="your own arrays: an .npz file with inputs and targets")
def npz(spec: NpzSpec) -> DataBundle:
    import zipfile

    try:
        f = np.load(spec.path, allow_pickle=False)
        if not hasattr(f, "files"):  # a plain .npy array
            raise RecipeError("data.path", f"'{spec.path}' holds one array; expected an .npz archive (numpy.savez) "
                                           f"with arrays '{spec.x_key}' and '{spec.y_key}'")
        with f:
            for k in (spec.x_key, spec.y_key):
                if k not in f:
                    raise RecipeError("data.x_key" if k == spec.x_key else "data.y_key",
                                      f"'{spec.path}' has no array '{k}'; it has {', '.join(f.files)}")
            x, y = f[spec.x_key], f[spec.y_key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # not an archive, pickled objects, corrupt
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError("data.path", f"'{spec.path}': not a readable .npz archive of numeric arrays ({first})") from None
    names = {"x": f"array '{spec.x_key}'", "y": f"array '{spec.y_key}'"}
    return _arrays(spec, x, y, lambda which, i=None: f"'{spec.path}', {names[which]}" + (f", row {i}" if i is not None else ""))


class CsvSpec(FileSpec):
    target: str = "target"


@register_dataset("csv", config=CsvSpec, description="your own table: a CSV with a header and a target column")
def csv(spec: CsvSpec) -> DataBundle:
    import csv as _csv

    text = read_utf8(spec.path, "table")
    xs, ys, lines = [], [], []
    reader = _csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        if spec.target not in header:
            raise RecipeError("data.target", f"'{spec.path}' has no column '{spec.target}'; header is {header}")
        t = header.index(spec.target)
        for row in reader:
            if not row:
                continue  # a blank line
            where = f"'{spec.path}', line {reader.line_num}"
            if len(row) != len(header):
                raise RecipeError("data.path", f"{where}: expected {len(header)} columns as in the header, got {len(row)}")
            values = []
            for i, v in enumerate(row):
                try:
                    number = float(v)
                except ValueError:
                    number = None
                if number is None or not math.isfinite(number):
                    raise RecipeError("data.path", f"{where}, column {i + 1} ('{header[i]}'): expected a finite number, "
                                                   f"got {v!r}")
                values.append(number)
            ys.append(values.pop(t))
            xs.append(values)
            lines.append(reader.line_num)
    except _csv.Error as exc:  # an unterminated quote, a field too large
        raise RecipeError("data.path", f"'{spec.path}', line {reader.line_num}: not a valid CSV row ({exc})") from None
    if not xs:
        raise RecipeError("data.path", f"'{spec.path}' has a header but no data rows")
    return _arrays(spec, np.array(xs), np.array(ys), lambda which, i=None: f"'{spec.path}'" + (f", line {lines[i]}" if i is not None else ""))


MAX_CLASSES = MAX_WIDTH


def _arrays(spec: FileSpec, x: np.ndarray, y: np.ndarray, where) -> DataBundle:
    """Check user arrays before anything trains on them: numbers, finite, one row per target, class ids.

    ``where(which, i)`` names row ``i`` of the inputs (``'x'``) or targets (``'y'``) in the user's file
    (``where(which)``: the file or array itself).
    """
    for which, a in (("x", x), ("y", y)):
        if a.dtype.kind not in "biuf":
            raise RecipeError("data.path", f"{where(which)}: expected numbers, got dtype {a.dtype}")
        if a.ndim == 0 or len(a) == 0:
            raise RecipeError("data.path", f"{where(which)}: expected one row per sample, "
                                           f"got shape {a.shape}")
    if len(x) != len(y):
        raise RecipeError("data.path", f"inputs have {len(x)} rows but targets have {len(y)}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        xf, yf = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
    for which, a, conv in (("x", x, xf), ("y", y, yf)):
        bad = ~np.isfinite(conv)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise RecipeError("data.path", f"{where(which, idx[0])}: expected finite numbers, got {a[idx].item()!r}"
                                           f"{' (beyond float32)' if np.isfinite(a[idx]) else ''}")
    xt = torch.as_tensor(xf)
    if spec.task == "classification":
        if y.ndim != 1:
            raise RecipeError("data.task", f"classification needs one class id per row, but the targets have shape "
                                           f"{y.shape}; use task: regression for several targets")
        bad = (y < 0) | (y != np.floor(y)) | (y >= MAX_CLASSES)
        if bad.any():
            i = int(np.argmax(bad))
            raise RecipeError("data.path", f"{where('y', i)}: expected a class id in [0, {MAX_CLASSES}), got {y[i].item()!r} "
                                           "(use task: regression for real-valued targets)")
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    else:
        yt = torch.as_tensor(np.asarray(y, dtype=np.float32))
        yt = yt.unsqueeze(1) if yt.ndim == 1 else yt
    return _bundle(spec, xt, yt, task=spec.task)


class MnistSpec(DataSpec):
    root: Path
    download: bool = False
    test_size: int = Field(2000, ge=1)  # used only when the folder holds just the 10k test files

    @field_validator("root")
    @classmethod
    def _exists(cls, p: Path) -> Path:
        if not p.is_dir():
            raise ValueError(f"expected a folder with MNIST IDX files, got '{p}' (no such folder)")
        return p


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzipped or not.

    torchvision's ``read_image_file`` reads only uncompressed files and the reference folder ships
    ``.gz``; the format is a 4-byte magic, big-endian dims, then raw uint8, so numpy reads it directly.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise RecipeError("data.root", f"'{path}' is not an IDX uint8 file (magic {magic})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise RecipeError("data.root", f"'{path}' is truncated: header says {dims}, found {arr.size} values")
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@register_dataset("mnist", config=MnistSpec,
                  description="MNIST from IDX files in data.root (a folder with only t10k files gets a seeded split)")
def mnist(spec: MnistSpec) -> DataBundle:
    root = spec.root
    if spec.download:
        from compress.safety import offline_reason

        if offline_reason():  # validate, or a checkpoint being loaded: what is already there, nothing fetched
            if not (root / "MNIST" / "raw").is_dir():
                raise RecipeError("data.download", f"MNIST is not in '{root / 'MNIST' / 'raw'}' yet, and nothing is "
                                                   f"downloaded {offline_reason()}; 'compress run' downloads it")
        else:
            from torchvision.datasets import MNIST

            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        root = root / "MNIST" / "raw"
    files = {k: _find(root, k) for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    if not (files["t10k-images-idx3-ubyte"] and files["t10k-labels-idx1-ubyte"]):
        raise RecipeError("data.root", f"expected t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in '{root}'")

    def load(prefix):
        x = torch.from_numpy(read_idx(files[f"{prefix}-images-idx3-ubyte"]).copy()).float().div_(255).unsqueeze(1)
        y = torch.from_numpy(read_idx(files[f"{prefix}-labels-idx1-ubyte"]).astype(np.int64))
        return (x - MNIST_MEAN) / MNIST_STD, y

    xt, yt = load("t10k")
    if files["train-images-idx3-ubyte"] and files["train-labels-idx1-ubyte"]:
        x, y = load("train")
        return _bundle(spec, x, y, test=(xt, yt), num_outputs=10)
    # Only the 10k test set: a seeded split of test_size held out, the rest for train/val.
    spec = spec.model_copy(update={"test_fraction": spec.test_size / len(xt)})
    return _bundle(spec, xt, yt, num_outputs=10)
