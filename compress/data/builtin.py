"""Built-in datasets: digits (scikit-learn, offline), mnist (IDX files), npz, csv, synthetic."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from compress.data.bundle import DataBundle, DataSpec, register_dataset, tensor_splits
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


class SyntheticSpec(DataSpec):
    num_samples: int = Field(512, ge=8)
    num_classes: int = Field(4, ge=2)
    shape: list[int] = [1, 8, 8]
    task: Literal["classification", "regression"] = "classification"
    noise: float = Field(0.5, ge=0)
    seed: int = 0


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
    with np.load(spec.path, allow_pickle=False) as f:
        for k in (spec.x_key, spec.y_key):
            if k not in f:
                raise RecipeError("data.x_key" if k == spec.x_key else "data.y_key",
                                  f"'{spec.path}' has no array '{k}'; it has {', '.join(f.files)}")
        x, y = f[spec.x_key], f[spec.y_key]
    return _arrays(spec, x, y)


class CsvSpec(FileSpec):
    target: str = "target"


@register_dataset("csv", config=CsvSpec, description="your own table: a CSV with a header and a target column")
def csv(spec: CsvSpec) -> DataBundle:
    import csv as _csv

    with open(spec.path, newline="") as f:
        rows = list(_csv.reader(f))
    if not rows or spec.target not in rows[0]:
        raise RecipeError("data.target", f"'{spec.path}' has no column '{spec.target}'; header is {rows[0] if rows else []}")
    header, body = rows[0], rows[1:]
    t = header.index(spec.target)
    try:
        x = np.array([[float(v) for i, v in enumerate(r) if i != t] for r in body], dtype=np.float32)
        y = np.array([float(r[t]) for r in body])
    except ValueError as exc:
        raise RecipeError("data.path", f"'{spec.path}': every column must be numeric ({exc})") from None
    return _arrays(spec, x, y)


def _arrays(spec: FileSpec, x: np.ndarray, y: np.ndarray) -> DataBundle:
    if len(x) != len(y):
        raise RecipeError("data.path", f"inputs have {len(x)} rows but targets have {len(y)}")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if spec.task == "classification":
        yt = torch.as_tensor(np.asarray(y)).long()
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
