"""MovieLens ratings as an item-based rating matrix (one sample per item), for autoencoder recommenders.

Each sample is one item: the input is its ratings by every user from the training ratings (0 where
missing), the target is the ratings to predict with NaN where missing, so ``masked_mse`` and RMSE only
see observed ratings. Train targets are the training ratings themselves (an autoencoder); val/test
targets are held-out ratings while the input stays the item's training ratings (AutoRec/KernelNet
protocol).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.utils.data import TensorDataset

from compress.data.bundle import DataBundle, DataSpec, register_dataset
from compress.errors import CompressError

Format = Literal["auto", "tab", "dat", "csv"]


def detect_format(path: Path) -> str:
    """'tab' for u.data/u1.base/u1.test, 'dat' for ratings.dat (1M/10M), 'csv' for ratings.csv (20M/25M)."""
    name = path.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".dat"):
        return "dat"
    return "tab"


def read_ratings(path: str | Path, format: Format = "auto") -> np.ndarray:
    """(n, 3) float64 array of (user id, item id, rating); timestamps are dropped.

    Parsed line by line (not np.loadtxt) so that a bad line is reported with its file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such ratings file")
    fmt = detect_format(path) if format == "auto" else format
    sep = {"tab": None, "dat": "::", "csv": ","}[fmt]  # None: any whitespace (u.data is tab-separated)
    expected = {"tab": "user<TAB>item<TAB>rating[<TAB>timestamp]", "dat": "user::item::rating[::timestamp]",
                "csv": "userId,movieId,rating[,timestamp]"}[fmt]
    rows: list[tuple[float, float, float]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            if fmt == "csv" and lineno == 1 and not text[0].isdigit():
                continue  # the header row
            parts = text.split(sep)
            try:
                if len(parts) < 3:
                    raise ValueError
                user, item, rating = int(parts[0]), int(parts[1]), float(parts[2])
                if not np.isfinite(rating):
                    raise ValueError
            except ValueError:
                raise CompressError(f"{path}, line {lineno}: expected {expected}, got {text[:80]!r}") from None
            rows.append((user, item, rating))
    if not rows:
        raise CompressError(f"{path}: no ratings found")
    return np.asarray(rows, dtype=np.float64)


def rating_matrix(ratings: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Dense (items, users) float32 matrix with NaN where unrated; ids mapped through sorted id arrays."""
    m = np.full((len(items), len(users)), np.nan, dtype=np.float32)
    ui = np.searchsorted(users, ratings[:, 0].astype(np.int64))
    ii = np.searchsorted(items, ratings[:, 1].astype(np.int64))
    m[ii, ui] = ratings[:, 2]
    return m


class MovieLensSpec(DataSpec):
    path: Path  # u1.base, u.data, ratings.dat or ratings.csv
    test_path: Optional[Path] = None  # u1.test; without it a seeded test_fraction of ratings is held out
    format: Format = "auto"
    by: Literal["item", "user"] = "item"  # one sample per item (I-AutoRec/KernelNet) or per user
    # Held-out share of the training ratings for validation/early stopping; 0 keeps every rating for training.
    val_fraction: float = Field(0.0, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)

    @field_validator("path", "test_path")
    @classmethod
    def _exists(cls, p: Optional[Path]) -> Optional[Path]:
        if p is not None and not p.is_file():
            raise ValueError(f"expected an existing ratings file, got '{p}' (no such file)")
        return p


def _split_ratings(r: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(r))
    k = int(round(len(r) * fraction))
    return r[perm[k:]], r[perm[:k]]


def load_movielens(spec: MovieLensSpec) -> DataBundle:
    train = read_ratings(spec.path, spec.format)
    if spec.test_path is not None:
        test = read_ratings(spec.test_path, spec.format)
    else:
        train, test = _split_ratings(train, spec.test_fraction, spec.split_seed)
    train, val = _split_ratings(train, spec.val_fraction, spec.split_seed + 1)
    everything = np.concatenate([train, val, test])
    users, items = np.unique(everything[:, 0].astype(np.int64)), np.unique(everything[:, 1].astype(np.int64))
    mats = {k: rating_matrix(r, users, items) for k, r in (("train", train), ("val", val), ("test", test))}
    if spec.by == "user":
        mats = {k: m.T.copy() for k, m in mats.items()}
    x_train = torch.from_numpy(np.nan_to_num(mats["train"], nan=0.0))
    # Test inputs also see the validation ratings: they are known at prediction time.
    x_test = torch.from_numpy(np.nan_to_num(np.fmax(mats["train"], mats["val"]), nan=0.0))
    y = {k: torch.from_numpy(m) for k, m in mats.items()}
    val_ds = TensorDataset(x_train, y["val"]) if len(val) else None
    return DataBundle(TensorDataset(x_train, y["train"]), val_ds, TensorDataset(x_test, y["test"]),
                      task="regression", num_outputs=x_train.shape[1], input_shape=(x_train.shape[1],),
                      batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size,
                      num_workers=spec.num_workers, deterministic=True)


@register_dataset("movielens", config=MovieLensSpec,
                  description="MovieLens ratings (u.data/u1.base, ratings.dat, ratings.csv) as an item x user matrix")
def movielens(spec: MovieLensSpec) -> DataBundle:
    return load_movielens(spec)
