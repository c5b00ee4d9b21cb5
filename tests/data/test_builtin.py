"""Built-in datasets, seeded splits, and the MNIST IDX reader."""
import gzip
import struct

import numpy as np
import pytest

from compress.data import create_data, split_indices
from compress.data.builtin import read_idx
from compress.errors import RecipeError, RecipeErrors


def test_digits_splits_are_seeded_and_disjoint():
    a = create_data({"name": "digits", "split_seed": 1})
    b = create_data({"name": "digits", "split_seed": 1})
    c = create_data({"name": "digits", "split_seed": 2})
    sizes = [len(a.dataset(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    idx = [set(a.dataset(s).indices.tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert a.dataset("test").indices.tolist() == b.dataset("test").indices.tolist()
    assert a.dataset("test").indices.tolist() != c.dataset("test").indices.tolist()
    assert a.input_shape == (1, 8, 8) and a.num_outputs == 10 and a.task == "classification"


def test_split_indices_cover_everything():
    parts = split_indices(10, [0.2, 0.3], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert [len(p) for p in parts] == [2, 3, 5]


def test_npz_and_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = create_data({"name": "npz", "path": str(tmp_path / "d.npz")})
    assert d.input_shape == (3,) and d.num_outputs == 2
    (tmp_path / "d.csv").write_text("a,b,target\n" + "\n".join(f"{i},{i * 2},{i % 2}" for i in range(20)))
    c = create_data({"name": "csv", "path": str(tmp_path / "d.csv"), "task": "regression"})
    assert c.task == "regression" and c.input_shape == (2,) and c.num_outputs == 1
    with pytest.raises(RecipeError, match="data.y_key: .* has no array 'labels'"):
        create_data({"name": "npz", "path": str(tmp_path / "d.npz"), "y_key": "labels"})
    with pytest.raises(RecipeErrors, match="data.path: expected an existing file"):
        create_data({"name": "csv", "path": str(tmp_path / "missing.csv")})


def _write_idx(path, arr: np.ndarray):
    header = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_test_only_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(100, 28, 28))
    labels = rng.integers(0, 10, size=(100,))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    d = create_data({"name": "mnist", "root": str(tmp_path), "test_size": 20, "val_fraction": 0.1})
    assert [len(d.dataset(s)) for s in ("train", "val", "test")] == [72, 8, 20]
    assert d.input_shape == (1, 28, 28)


def test_idx_reader_rejects_truncated_file(tmp_path):
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(RecipeError, match="truncated"):
        read_idx(p)


def test_genuine_mnist_t10k(shared_data):
    root = shared_data / "mnist-t10k"
    x = read_idx(root / "t10k-images-idx3-ubyte.gz")
    y = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist()[:3] == [980, 1135, 1032]  # the official per-class counts
    d = create_data({"name": "mnist", "root": str(root), "val_fraction": 0.1})
    assert [len(d.dataset(s)) for s in ("train", "val", "test")] == [7200, 800, 2000]
    xb, _ = next(iter(d.loader("test")))
    assert abs(float(xb.mean())) < 0.2  # normalised with MNIST statistics


def _npz(path, **arrays):
    np.savez(path, **arrays)


@pytest.mark.parametrize("make,match", [
    (lambda p: _npz(p, x=np.array([[1.0, np.inf]] * 4), y=np.arange(4) % 2), r"d.npz', array 'x', row 0: expected finite numbers, got inf"),
    (lambda p: _npz(p, x=np.ones((4, 2)) * 1e39, y=np.arange(4) % 2), r"row 0: expected finite numbers, got 1e\+39 \(beyond float32\)"),
    (lambda p: _npz(p, x=np.ones((4, 2)), y=np.array([0, 1, -1, 0])), r"array 'y', row 2: expected a class id in \[0, 65536\), got -1"),
    (lambda p: _npz(p, x=np.ones((4, 2)), y=np.array([0, 1, 0.5, 0])), r"array 'y', row 2: expected a class id .* got 0.5"),
    (lambda p: _npz(p, x=np.array([["a", "b"]] * 4), y=np.arange(4)), r"array 'x': expected numbers, got dtype <U1"),
    (lambda p: _npz(p, x=np.ones((4, 2)), y=np.arange(3)), r"inputs have 4 rows but targets have 3"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), r"d.npz': not a readable .npz archive"),
    (lambda p: np.save(open(p, "wb"), np.ones(3)), r"d.npz' holds one array; expected an .npz archive"),
])
def test_npz_problems_name_the_file_and_row(tmp_path, make, match):
    make(tmp_path / "d.npz")
    with pytest.raises(RecipeError, match=r"^data\.\w+: .*" + match):
        create_data({"name": "npz", "path": str(tmp_path / "d.npz")})


@pytest.mark.parametrize("text,match", [
    ("a,b,target\n1,2,0\n3,nan,1\n", r"d.csv', line 3, column 2 \('b'\): expected a finite number, got 'nan'"),
    ("a,b,target\n1,2,0\n\n3,,1\n", r"d.csv', line 4, column 2 \('b'\): expected a finite number, got ''"),
    ("a,b,target\n1,2,0\n3,1e999,1\n", r"line 3, column 2 \('b'\): expected a finite number, got '1e999'"),
    ("a,b,target\n1,2,0\n3,4\n", r"d.csv', line 3: expected 3 columns as in the header, got 2"),
    ("a,b,target\n", r"d.csv' has a header but no data rows"),
    ("a,b,target\n1,2,0\n1,2,-3\n", r"d.csv', line 3: expected a class id in \[0, 65536\), got -3"),
    ("a,b,target\n1,2,0\n\"1,2,0\n", r"d.csv', line \d+: .*"),
    ("a,b,target\n1,2,0\nbad,é,1\n".encode("latin-1"), r"d.csv', line 3: not UTF-8 text \(byte 0xe9\)"),
])
def test_csv_problems_name_the_file_line_and_column(tmp_path, text, match):
    path = tmp_path / "d.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError, match=r"^data\.path: .*" + match):
        create_data({"name": "csv", "path": str(path)})


def test_synthetic_sizes_are_bounded_before_allocating():
    with pytest.raises(RecipeErrors, match=r"data: num_samples x shape is .* values; at most"):
        create_data({"name": "synthetic", "num_samples": 1 << 24, "shape": [3, 256, 256]})
    with pytest.raises(RecipeErrors, match=r"data.shape\[1\]: expected an integer in \[1, 65536\], got 0"):
        create_data({"name": "synthetic", "shape": [1, 0]})
