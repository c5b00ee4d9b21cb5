import numpy as np
import pytest
import torch

from compress.data import create_data
from compress.data.movielens import read_ratings
from compress.errors import CompressError

ROWS = [(1, 10, 5), (1, 20, 3), (2, 10, 4), (3, 30, 1), (2, 30, 2)]


def write(path, rows, fmt):
    lines = {"tab": [f"{u}\t{i}\t{r}\t88125{j}" for j, (u, i, r) in enumerate(rows)],
             "dat": [f"{u}::{i}::{r}::97830{j}" for j, (u, i, r) in enumerate(rows)],
             "csv": ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r}.0,11122{j}" for j, (u, i, r) in enumerate(rows)]}
    path.write_text("\n".join(lines[fmt]) + "\n")
    return path


@pytest.mark.parametrize("name,fmt", [("u.data", "tab"), ("u1.base", "tab"), ("ratings.dat", "dat"), ("ratings.csv", "csv")])
def test_formats_parse_to_the_same_ratings(tmp_path, name, fmt):
    r = read_ratings(write(tmp_path / name, ROWS, fmt))
    np.testing.assert_array_equal(r, np.array(ROWS, dtype=np.float64))


@pytest.mark.parametrize("name,fmt,bad", [("u1.base", "tab", "2\tten\t4"), ("ratings.dat", "dat", "2::10"),
                                          ("ratings.csv", "csv", "2,10,four,0")])
def test_bad_line_names_file_and_line(tmp_path, name, fmt, bad):
    path = write(tmp_path / name, ROWS, fmt)
    lines = path.read_text().splitlines()
    lines.insert(3, bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CompressError) as exc:
        read_ratings(path)
    assert f"{path}, line 4: expected" in str(exc.value) and repr(bad) in str(exc.value)


def test_item_matrix_inputs_and_targets(tmp_path):
    train = write(tmp_path / "u1.base", ROWS, "tab")
    test = write(tmp_path / "u1.test", [(3, 10, 2), (1, 30, 4), (4, 40, 3)], "tab")  # user 4 / item 40 only in test
    d = create_data({"name": "movielens", "path": str(train), "test_path": str(test)})
    assert d.task == "regression" and d.num_outputs == 4 and d.input_shape == (4,)
    x, y = d.train.tensors
    assert x.shape == (4, 4)  # items 10, 20, 30, 40 x users 1..4
    assert x[0].tolist() == [5, 4, 0, 0] and torch.isnan(y[0, 2:]).all() and y[0, :2].tolist() == [5, 4]
    assert int((~torch.isnan(y)).sum()) == len(ROWS)
    xt, yt = d.test.tensors
    assert torch.equal(xt, x)  # test inputs are the training ratings; targets are the held-out ones
    assert yt[0, 2] == 2 and yt[2, 0] == 4 and yt[3, 3] == 3 and int((~torch.isnan(yt)).sum()) == 3
    assert d.val is None  # val_fraction defaults to 0 for movielens


def test_seeded_splits_partition_the_ratings(tmp_path):
    rng = np.random.default_rng(0)
    rows = {(int(u), int(i)): int(rng.integers(1, 6)) for u, i in rng.integers(1, 30, size=(400, 2))}
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::{r}::0\n" for (u, i), r in rows.items()))
    spec = {"name": "movielens", "path": str(path), "test_fraction": 0.2, "val_fraction": 0.1, "split_seed": 3}
    d = create_data(spec)
    counts = [int((~torch.isnan(ds.tensors[1])).sum()) for ds in (d.train, d.val, d.test)]
    assert sum(counts) == len(rows) and counts[2] == round(0.2 * len(rows))
    masks = [~torch.isnan(ds.tensors[1]) for ds in (d.train, d.val, d.test)]
    assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any()
    # test inputs also hold the validation ratings; train inputs do not
    assert int((d.test.tensors[0] > 0).sum()) == counts[0] + counts[1]
    assert int((d.train.tensors[0] > 0).sum()) == counts[0]
    again = create_data(spec)
    assert torch.equal(torch.nan_to_num(again.test.tensors[1]), torch.nan_to_num(d.test.tensors[1]))
    by_user = create_data({**spec, "by": "user"})
    assert torch.equal(by_user.train.tensors[0], d.train.tensors[0].T)


def test_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(CompressError, match=r"data.path: expected an existing ratings file"):
        create_data({"name": "movielens", "path": str(tmp_path / "nope.dat")})


@pytest.mark.data
def test_ml100k_u1_split(shared_data):
    root = shared_data / "ml-100k"
    d = create_data({"name": "movielens", "path": str(root / "u1.base"), "test_path": str(root / "u1.test")})
    assert d.train.tensors[0].shape == (1682, 943)
    assert int((~torch.isnan(d.train.tensors[1])).sum()) == 80_000
    assert int((~torch.isnan(d.test.tensors[1])).sum()) == 20_000
