"""The imagefolder dataset: class mapping, splits, transforms and folder errors (all on tiny PNGs)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import create_data
from compress.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, write_shapes_folder
from compress.errors import CompressError, RecipeError, RecipeErrors

SYNSETS = ["n01440764", "n02102040", "n02979186"]


def solid(path: Path, colour=(255, 0, 0), size=(20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def folder(root: Path, train: dict, val: dict) -> Path:
    """Write ``{class: n_images}`` for train/ and val/; each class gets its own solid colour."""
    for split, spec in (("train", train), ("val", val)):
        for c, n in spec.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                solid(root / split / c / f"{i}.png", (10 * (SYNSETS.index(c) + 1) if c in SYNSETS else 50, i, 0))
    return root


def data(root, **kw):
    return create_data({"name": "imagefolder", "root": str(root), "image_size": 8, **kw})


def test_class_mapping_follows_train_and_val_subset_is_relabelled(tmp_path):
    root = folder(tmp_path, {c: 6 for c in SYNSETS}, {SYNSETS[2]: 2, SYNSETS[1]: 3})
    b = data(root, validation="val")
    assert b.classes == SYNSETS and b.num_outputs == 3 and b.input_shape == (3, 8, 8)
    # val/ holds only two classes: its labels are train/'s indices, read back from each file's folder.
    for path, label in b.test.samples:
        assert SYNSETS[label] == Path(path).parent.name
    assert sorted(b.test.targets) == [1, 1, 1, 2, 2]


def test_class_names_as_folders(tmp_path):
    root = write_shapes_folder(tmp_path, num_classes=3, train_per_class=4, val_per_class=2, size=16)
    b = data(root, val_fraction=0.25)
    assert b.classes == ["circle", "square", "triangle"]
    assert len(b.train) + len(b.val) == 12 and len(b.test) == 6


def test_carved_validation_is_seeded_stratified_and_disjoint(tmp_path):
    root = folder(tmp_path, {c: 10 for c in SYNSETS}, {c: 2 for c in SYNSETS})
    a, b, c = data(root, val_fraction=0.3), data(root, val_fraction=0.3), data(root, val_fraction=0.3, split_seed=1)
    assert list(a.val.indices) == list(b.val.indices) and list(a.val.indices) != list(c.val.indices)
    assert not set(a.val.indices) & set(a.train.indices) and len(a.val) + len(a.train) == 30
    base = a.val.dataset
    assert sorted(np.bincount([base.targets[i] for i in a.val.indices])) == [3, 3, 3]  # stratified
    # Carved images are validation data: they get the deterministic eval transform.
    x1, x2 = a.val[0][0], a.val[0][0]
    assert torch.equal(x1, x2)


def test_validation_val_uses_the_val_folder(tmp_path):
    root = folder(tmp_path, {c: 4 for c in SYNSETS}, {c: 2 for c in SYNSETS})
    b = data(root, validation="val")
    assert b.val is b.test and len(b.train) == 12


def test_eval_transform_is_deterministic_train_is_random(tmp_path):
    root = write_shapes_folder(tmp_path, num_classes=2, train_per_class=3, val_per_class=2, size=32)
    b = data(root, image_size=16, validation="val", crop_scale=[0.2, 0.5])
    assert not b.deterministic
    x = b.test[0][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.equal(x, b.test[0][0])
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = data(root, image_size=16, random_resized_crop=False, hflip=False)
    assert plain.deterministic
    assert torch.equal(plain.train.dataset[0][0], plain.train.dataset[0][0])


def test_normalization_uses_imagenet_statistics(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("a", "b"):
            solid(root / split / c / "0.png", (255, 128, 0), size=(10, 10))
    x = data(root, validation="val").test[0][0]
    want = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 4, 4], want, atol=1e-5)
    raw = data(root, validation="val", normalize=False).test[0][0]
    assert torch.allclose(raw[:, 4, 4], torch.tensor([255, 128, 0]) / 255, atol=1e-6)


def test_resize_then_centre_crop(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("a", "b"):
            # Left half black, right half white: a centre crop of a 2:1 image keeps both halves.
            img = Image.new("RGB", (40, 20), (0, 0, 0))
            img.paste((255, 255, 255), (20, 0, 40, 20))
            (root / split / c).mkdir(parents=True)
            img.save(root / split / c / "0.png")
    x = data(root, image_size=10, resize=10, validation="val", normalize=False).test[0][0]
    assert x.shape == (3, 10, 10)
    assert x[:, :, 0].max() < 0.1 and x[:, :, -1].min() > 0.9


def test_loader_batches_and_max_per_class(tmp_path):
    root = folder(tmp_path, {c: 8 for c in SYNSETS}, {c: 4 for c in SYNSETS})
    b = data(root, max_per_class=2, validation="val", batch_size=4)
    assert len(b.train) == 6 and len(b.test) == 6
    x, y = next(iter(b.loader("train")))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.long


@pytest.mark.parametrize("make, match", [
    (lambda r: r, "has no train/ or val/ folder"),
    (lambda r: (r / "train").mkdir() or r, "has no val/ folder"),
    (lambda r: [(r / s).mkdir() for s in ("train", "val")] and r, "has no class folders"),
    (lambda r: folder(r, {"a": 0, "b": 2}, {"b": 1}), "class folder\\(s\\) a hold no images"),
    (lambda r: folder(r, {"a": 2, "b": 2}, {"b": 1, "zebra": 1}), "val/ has class folder\\(s\\) that train/ does not have: zebra"),
])
def test_folder_errors_name_data_root(tmp_path, make, match):
    root = tmp_path / "d"
    root.mkdir()
    make(root)
    with pytest.raises(RecipeError, match=match) as exc:
        data(root)
    assert exc.value.path == "data.root"


def test_missing_root_and_bad_options_are_recipe_errors(tmp_path):
    with pytest.raises(CompressError, match="data.root: no such folder"):
        data(tmp_path / "nope")
    root = folder(tmp_path, {"a": 1, "b": 1}, {"a": 1})
    with pytest.raises(RecipeErrors) as exc:
        data(root, crop_scale=[0.5, 0.2], validation="test")
    lines = str(exc.value).splitlines()
    assert any(line.startswith("data.crop_scale: expected [min, max]") for line in lines)
    assert any(line.startswith("data.validation: expected one of 'carve', 'val'") for line in lines)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_named_in_one_line(tmp_path, workers):
    """Truncated or non-image files fail when read, naming the file, also from DataLoader worker processes."""
    from compress.data.imagefolder import UnreadableImage

    root = folder(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1})
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    d = data(root, val_fraction=0, num_workers=workers, batch_size=6)
    with pytest.raises(UnreadableImage) as exc:
        next(iter(d.loader("train", shuffle=False)))
    msg = str(exc.value)
    assert msg.startswith(f"data.root: '{bad}' is not a readable image (") and "\n" not in msg
