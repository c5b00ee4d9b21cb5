"""``imagefolder``: images in ``root/train/<class>/`` and ``root/val/<class>/`` (Imagenette, Imagewoof).

Class folders may be synset ids (``n01440764``) or names; the class order is train/'s sorted folder
names and val/ is mapped onto it. Splits: test = val/ (Imagenette and Imagewoof have no labelled test
set), validation = a seeded, stratified ``val_fraction`` of train/ (``validation: carve``, the default)
or val/ itself (``validation: val`` or ``val_fraction: 0``; best-epoch selection then sees the test split).
``test_fraction`` is not used.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from compress.data.bundle import DataBundle, DataSpec, register_dataset
from compress.errors import CompressError, RecipeError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
LAYOUT = ("expected a folder holding train/ and val/, each with one folder of images per class "
          "(the Imagenette/Imagewoof layout, e.g. imagenette2-320 from https://github.com/fastai/imagenette)")


class ImageFolderSpec(DataSpec):
    root: Path
    image_size: int = Field(224, ge=8, le=8192)  # the square crop the model sees: input_shape = (3, size, size)
    resize: Optional[int] = Field(None, ge=8, le=8192)  # shorter side before the centre crop; default size / 0.875
    random_resized_crop: bool = True  # train only; off: the val transform (resize + centre crop)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of RandomResizedCrop
    hflip: bool = True  # train only
    normalize: bool = True
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD), min_length=3, max_length=3)
    validation: Literal["carve", "val"] = "carve"
    max_per_class: Optional[int] = Field(None, ge=1)  # first N images per class in each folder (smoke runs)

    @field_validator("root")
    @classmethod
    def _exists(cls, p: Path) -> Path:
        if not p.is_dir():
            raise ValueError(f"no such folder '{p}' (give it with --set data.root=PATH); {LAYOUT}")
        return p

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"expected [min, max] with 0 < min <= max <= 1, got {list(v)}")
        return v

    @property
    def random_train(self) -> bool:
        return self.random_resized_crop or self.hflip


def transforms(spec: ImageFolderSpec, train: bool):
    """torchvision transforms: random resized crop + flip for training, resize + centre crop otherwise."""
    from torchvision.transforms import v2 as T
    import torch

    size = spec.image_size
    if train and spec.random_resized_crop:
        steps = [T.RandomResizedCrop(size, scale=tuple(spec.crop_scale), antialias=True)]
    else:
        steps = [T.Resize(spec.resize or round(size / 0.875), antialias=True), T.CenterCrop(size)]
    if train and spec.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    if spec.normalize:
        steps.append(T.Normalize(spec.mean, spec.std))
    return T.Compose(steps)


class UnreadableImage(CompressError):
    """An image file PIL cannot decode (truncated, not an image), named with its path."""

    def __init__(self, message: str):
        # A DataLoader worker's exception comes back as this class built from the worker's whole traceback
        # text (torch's ExceptionWrapper.reraise); its last line ends with the one-line message we raised.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def load_image(path: str):
    """torchvision's PIL loader (open, convert to RGB), with decoding errors named by file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImage(f"data.root: '{path}' is not a readable image ({detail}); remove or replace it") from None


def _folder(root: Path, split: str, max_per_class: Optional[int]):
    """One split as a torchvision ImageFolder, with folder problems turned into ``data.root`` errors."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    d = root / split
    if not any(p.is_dir() for p in d.iterdir()):
        raise RecipeError("data.root", f"'{d}' has no class folders; {LAYOUT}")
    try:
        ds = ImageFolder(str(d), loader=load_image)
    except FileNotFoundError as exc:  # torchvision: "Found no valid file for the classes a, b. Supported ..."
        empty = str(exc).split("classes ", 1)[-1].split(". ", 1)[0]
        raise RecipeError("data.root", f"'{d}': class folder(s) {empty} hold no images "
                                       f"({', '.join(IMG_EXTENSIONS)})") from None
    if max_per_class is not None:
        kept, count = [], {}
        for path, t in ds.samples:
            if count.get(t, 0) < max_per_class:
                kept.append((path, t))
                count[t] = count.get(t, 0) + 1
        ds.samples, ds.imgs = kept, kept
        ds.targets = [t for _, t in kept]
    return ds


def _with_transform(ds, transform):
    out = copy.copy(ds)  # shares the sample list; only the transform differs
    out.transform = transform
    return out


@register_dataset("imagefolder", config=ImageFolderSpec,
                  description="images in root/train/<class>/ and root/val/<class>/ (Imagenette, Imagewoof); test = val/")
def imagefolder(spec: ImageFolderSpec) -> DataBundle:
    from torch.utils.data import Subset

    missing = [f"{s}/" for s in ("train", "val") if not (spec.root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in spec.root.iterdir() if p.is_dir())
        raise RecipeError("data.root", f"'{spec.root}' has no {' or '.join(missing)} folder "
                                       f"(it has: {', '.join(found) or 'no folders'}); {LAYOUT}")
    train = _folder(spec.root, "train", spec.max_per_class)
    val = _folder(spec.root, "val", spec.max_per_class)
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise RecipeError("data.root", f"val/ has class folder(s) that train/ does not have: {shown}; "
                                       f"train/ has {', '.join(train.classes)}")
    # val/ may hold a subset of train's classes: relabel with train's indices.
    remap = {i: train.class_to_idx[c] for i, c in enumerate(val.classes)}
    val.samples = val.imgs = [(p, remap[t]) for p, t in val.samples]
    val.targets = [t for _, t in val.samples]
    val.classes, val.class_to_idx = train.classes, train.class_to_idx

    eval_tf = transforms(spec, train=False)
    train_tf = transforms(spec, train=True)
    test_ds = _with_transform(val, eval_tf)
    if spec.validation == "val" or spec.val_fraction == 0:
        train_ds, val_ds = _with_transform(train, train_tf), test_ds
    else:
        from sklearn.model_selection import train_test_split

        idx = list(range(len(train)))
        counts = {t: train.targets.count(t) for t in set(train.targets)}
        strat = train.targets if min(counts.values()) >= 2 and round(len(idx) * spec.val_fraction) >= len(counts) else None
        tr_idx, va_idx = train_test_split(idx, test_size=spec.val_fraction, random_state=spec.split_seed,
                                          stratify=strat)
        train_ds = Subset(_with_transform(train, train_tf), sorted(tr_idx))
        val_ds = Subset(_with_transform(train, eval_tf), sorted(va_idx))  # carved images get the eval transform
    return DataBundle(train_ds, val_ds, test_ds, task="classification", num_outputs=len(train.classes),
                      input_shape=(3, spec.image_size, spec.image_size), batch_size=spec.batch_size,
                      eval_batch_size=spec.eval_batch_size, num_workers=spec.num_workers,
                      deterministic=not spec.random_train, classes=list(train.classes))


SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def write_shapes_folder(root: str | Path, num_classes: int = 4, train_per_class: int = 24, val_per_class: int = 8,
                        size: int = 48, seed: int = 0) -> Path:
    """Write a tiny Imagenette-layout folder of PNGs (one coloured shape per class on noise), to try recipes offline."""
    import numpy as np
    from PIL import Image, ImageDraw

    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES)}]")
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 30), (200, 60, 200), (30, 200, 200)]
    root = Path(root)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            d = root / split / SHAPES[c]
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                bg = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                img = Image.fromarray(bg)
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                colour = tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for v in palette[c])
                box = [cx - r, cy - r, cx + r, cy + r]
                kind = SHAPES[c]
                if kind == "circle":
                    draw.ellipse(box, fill=colour)
                elif kind == "square":
                    draw.rectangle(box, fill=colour)
                elif kind == "triangle":
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
                elif kind == "cross":
                    draw.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=colour)
                    draw.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=colour)
                elif kind == "ring":
                    draw.ellipse(box, outline=colour, width=max(2, r // 3))
                else:
                    draw.rectangle([cx - r, cy - r // 4, cx + r, cy + r // 4], fill=colour)
                img.save(d / f"{split}_{c}_{i:04d}.png")
    return root
