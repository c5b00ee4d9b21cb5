"""The DataBundle: train/val/test splits plus what a model needs to know about them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, Subset

from compress.config import Seed, StrictModel, validate
from compress.data.inputs import as_inputs
from compress.errors import RecipeError
from compress.registry import Registry

DATASETS: Registry = Registry("dataset")


class DataSpec(StrictModel):
    """Options every dataset shares; each dataset's config subclasses this."""

    name: str
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    num_workers: int = Field(0, ge=0, le=1024)  # each one is a process
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: Seed = 0


@dataclass
class DataBundle:
    """Splits and their metadata. Build one from datasets, or wrap existing loaders (Python API)."""

    train: Optional[Dataset]
    val: Optional[Dataset]
    test: Optional[Dataset]
    task: Literal["classification", "regression", "lm"] = "classification"  # lm: next-token targets per position
    num_outputs: int = 0
    input_shape: tuple = ()
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = 0
    deterministic: bool = True  # no random augmentation: a teacher's outputs can be cached
    classes: Optional[list] = None
    loaders: dict = field(default_factory=dict)  # split -> DataLoader given by the user
    collate: Optional[Callable] = None  # batches samples (text: pads each batch); None: torch's default_collate
    vocab_size: Optional[int] = None  # text data: the tokenizer's vocabulary (every token id is below it)
    description: dict = field(default_factory=dict)  # facts about the corpus for the report (lm: Python version, tokens)
    tokenizer: Any = None  # text data: the tokenizer the ids came from (a trained one is saved in the run folder)

    @classmethod
    def from_loaders(cls, train: DataLoader, val: DataLoader | None = None, test: DataLoader | None = None,
                     task: str = "classification", num_outputs: int | None = None) -> "DataBundle":
        """Wrap a user's loaders; shapes and class count are read from the first batch."""
        x, y = next(iter(train))[:2]
        x = as_inputs(x)
        if num_outputs is None:
            num_outputs = int(y.max()) + 1 if task == "classification" else (y.shape[1] if y.ndim > 1 else 1)
        loaders = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}
        return cls(None, None, None, task=task, num_outputs=num_outputs, input_shape=tuple(x.shape[1:]),
                   batch_size=train.batch_size or 64, loaders=loaders)

    def has(self, split: str) -> bool:
        return split in self.loaders or getattr(self, split, None) is not None

    def dataset(self, split: str) -> Dataset:
        ds = getattr(self, split, None)
        if ds is None:
            if split in self.loaders:
                return self.loaders[split].dataset
            raise RecipeError("data", f"this dataset has no '{split}' split")
        return ds

    def loader(self, split: str, *, shuffle: bool | None = None, batch_size: int | None = None,
               generator: torch.Generator | None = None, sampler=None, pin_memory: bool = False) -> DataLoader:
        """``sampler``: a torch Sampler or a list of indices (a rank's shard); ``pin_memory`` for CUDA copies."""
        if split in self.loaders and batch_size is None and sampler is None:
            return self.loaders[split]
        ds = self.dataset(split)
        shuffle = (split == "train") if shuffle is None else shuffle
        bs = batch_size or (self.batch_size if split == "train" else self.eval_batch_size)
        return DataLoader(ds, batch_size=bs, shuffle=shuffle and sampler is None, sampler=sampler,
                          generator=generator, num_workers=self.num_workers, drop_last=False, pin_memory=pin_memory,
                          collate_fn=self.collate)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A real batch from the test (or val) split, for shape checks, export and tracing."""
        for split in ("test", "val", "train"):
            if self.has(split):
                x = as_inputs(next(iter(self.loader(split, shuffle=False, batch_size=batch)))[0])
                return x[:batch]
        return torch.zeros((batch, *self.input_shape))


def split_indices(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Seeded random split of range(n); the last part takes the remainder."""
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for f in fractions:
        k = int(round(n * f))
        out.append(perm[start:start + k])
        start += k
    out.append(perm[start:])
    return out


def register_dataset(name: str, config: type[DataSpec] = DataSpec, description: str = ""):
    return DATASETS.register(name, config=config, description=description)


def parse_data_spec(raw: dict, path: str = "data") -> DataSpec:
    if not isinstance(raw, dict):
        raise RecipeError(path, f"expected a mapping with a 'name' key, got {raw!r}")
    if "name" not in raw:
        raise RecipeError(f"{path}.name", f"required key is missing; expected one of {', '.join(DATASETS.names())}")
    entry = DATASETS.get(str(raw["name"]), f"{path}.name")
    return validate(entry.config, raw, path)


def create_data(spec: DataSpec | dict | str, **overrides) -> DataBundle:
    """Build a DataBundle by registry name: ``create_data('digits', batch_size=32)``."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = parse_data_spec({**spec, **overrides})
    entry = DATASETS.get(spec.name, "data.name")
    return entry.obj(spec)


def split_rows(n: int, spec: DataSpec, with_test: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) row indices of ``n`` rows, seeded by ``spec.split_seed`` (``with_test=False``:
    the test split comes from elsewhere and is empty here)."""
    if with_test:
        test_idx, rest = split_indices(n, [spec.test_fraction], spec.split_seed)
    else:
        test_idx, rest = np.arange(0), np.arange(n)
    # val_fraction is a share of what is left after the test split.
    val_pos, train_pos = split_indices(len(rest), [spec.val_fraction], spec.split_seed + 1)
    return rest[train_pos], rest[val_pos], test_idx


def tensor_splits(x: torch.Tensor, y: torch.Tensor, spec: DataSpec, test: tuple | None = None):
    """Split arrays into train/val/test (test given or carved out), all seeded by ``spec.split_seed``."""
    from torch.utils.data import TensorDataset

    full = TensorDataset(x, y)
    train_idx, val_idx, test_idx = split_rows(len(full), spec, with_test=test is None)
    test_ds = Subset(full, test_idx) if test is None else TensorDataset(*test)
    return Subset(full, train_idx), Subset(full, val_idx), test_ds


def read_utf8(path: Path, what: str = "file") -> str:
    """A user's text file as str (a BOM dropped); not UTF-8 is one line naming the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError("data.path", f"'{path}', line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                                       f"save the {what} as UTF-8") from None
