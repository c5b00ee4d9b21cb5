"""Teachers: which models a KD stage learns from, how they are weighted, frozen and cached.

A recipe's ``teacher:`` is ``recipe`` (the recipe's teacher, or that teacher's epoch-k checkpoint),
``previous`` (the model the previous stage produced: teacher-assistant chains), a model spec with a
checkpoint, or a list of these (an ensemble). In Python a teacher is a model or a checkpoint path.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.nn as nn
from torch.utils.data import Dataset

from compress.data import DataBundle
from compress.errors import RecipeError
from compress.models.registry import ModelSpec


# -- frozen teachers -----------------------------------------------------------------------------------
def freeze(models: Sequence[nn.Module]) -> list:
    """Eval mode and no gradients; returns the previous flags (plain data, so a hook holding them copies)."""
    saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval().requires_grad_(False)
    return saved


def unfreeze(models: Sequence[nn.Module], saved: list) -> None:
    for m, (training, flags) in zip(models, saved):
        m.train(training)
        for p, f in zip(m.parameters(), flags):
            p.requires_grad_(f)


@contextmanager
def frozen(models: Sequence[nn.Module]):
    """Eval mode and no gradients for the teachers; their previous flags come back afterwards."""
    saved = freeze(models)
    try:
        yield
    finally:
        unfreeze(models, saved)


# -- ensembles -------------------------------------------------------------------------------------------
def load_teachers(teacher) -> list[nn.Module]:
    """Python API teachers: a model, a checkpoint path, or a list of them (an ensemble)."""
    from compress.checkpoint import load_model

    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    return [load_model(t) if isinstance(t, (str, Path)) else t for t in teachers]


def teacher_weights(weights: Optional[Sequence[float]], n: int, path: str) -> list[float]:
    """Ensemble weights normalised to sum 1 (equal when not given); ``path``: the stage's key path."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise RecipeError(f"{path}.teacher_weights", f"has {len(weights)} weights for {n} teacher{'s' if n > 1 else ''}")
    if sum(weights) <= 0:
        raise RecipeError(f"{path}.teacher_weights", "must not all be zero")
    return [v / sum(weights) for v in weights]


# -- cached teacher outputs --------------------------------------------------------------------------------
class IndexedDataset(Dataset):
    """Yields (x, y, index) so the trainer's ``Batch.index`` can look cached teacher outputs up."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return x, y, i


# Hint features are [B, T, D] for text: cached per eval batch (its own padded T), they would not line up with
# a training batch padded to another length. Logits ([B, C]) do not depend on T, so they still cache.
VARYING_SHAPES = ("hints are set and the data's batches vary in shape (the text dataset pads each batch to its "
                  "longest text), so cached teacher features would not line up with the student's; "
                  "data.padding: max_length gives every batch one shape")


def cache_reason(augments: bool, data: DataBundle, hints: bool = False) -> Optional[str]:
    """Why cached teacher outputs would be wrong (None: they are exact); ``augments``: the trainer does;
    ``hints``: teacher features are cached too (a collate function must mark its batches ``fixed_shape``)."""
    if augments:
        return "the trainer augments the inputs (augment:), so the teacher must see each new batch"
    if data.task == "lm":
        return "a language model's outputs (tokens x vocabulary per block) are too large to keep for every block"
    if hints and data.collate is not None and not getattr(data.collate, "fixed_shape", False):
        return VARYING_SHAPES
    if not data.deterministic:
        return "the data pipeline is not deterministic (random augmentation)"
    if data.train is None:
        return ("the training data comes from a user's DataLoader, whose order and transforms compress cannot "
                "index (give datasets: DataBundle(train=..., val=..., test=...) to cache teacher outputs)")
    return None


# -- recipe teachers -----------------------------------------------------------------------------------
def teacher_items(value: Any, path: str) -> list[tuple[Any, str]]:
    """``(teacher, key path)`` for a recipe's ``teacher:`` value, a list or a single one."""
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{path}.teacher", "is an empty list; give at least one teacher")
        return [(v, f"{path}.teacher[{j}]") for j, v in enumerate(value)]
    return [(value, f"{path}.teacher")]


def teacher_stage(recipe, index: int):
    """The latest ``train`` stage before ``index`` that trained the recipe's teacher."""
    for s in reversed(recipe.stages[:index]):
        if s.name == "train" and getattr(s.config, "target", None) == "teacher":
            return s
    return None


def check_teachers(recipe, items: list[tuple[Any, str]], path: str, *, new_student: bool) -> None:
    """Recipe check of every teacher item (before anything runs)."""
    for item, ipath in items:
        if isinstance(item, ModelSpec):
            if item.checkpoint is None:
                raise RecipeError(f"{ipath}.checkpoint", "a teacher given as a model spec needs trained weights "
                                                         "(checkpoint: path/to/model.pt)")
        elif item == "recipe":
            if recipe.teacher is None:
                raise RecipeError(ipath, "is 'recipe' but the recipe has no 'teacher:' section")
        elif item == "previous":
            if not new_student:
                raise RecipeError(f"{path}.student", "is required with teacher: previous (the current model becomes "
                                                     "the teacher, so give a model spec for the new student)")
        else:
            raise RecipeError(ipath, f"expected 'recipe', 'previous', a model spec mapping or a list of them, got {item!r}")


def check_teacher_epoch(recipe, index: int, items: list[tuple[Any, str]], teacher_epoch: int, path: str) -> None:
    """An early-stopped teacher needs the recipe's teacher, trained earlier with a checkpoint per epoch."""
    if not any(item == "recipe" for item, _ in items):
        raise RecipeError(f"{path}.teacher_epoch", "picks a checkpoint of the recipe's teacher, but teacher is not 'recipe'")
    src = teacher_stage(recipe, index)
    if src is None or not src.config.save_every_epoch:
        raise RecipeError(f"{path}.teacher_epoch", "needs an earlier 'train' stage with target: teacher and "
                                                   "save_every_epoch: true")
    if teacher_epoch > src.config.epochs:
        raise RecipeError(f"{path}.teacher_epoch", f"is {teacher_epoch} but {src.path} trains the teacher "
                                                   f"for {src.config.epochs} epochs")


def resolve_teacher(state, item, ipath: str, teacher_epoch: Optional[int] = None) -> nn.Module:
    """The model behind one recipe teacher item, in a running pipeline ``state``."""
    from compress.checkpoint import load_model
    from compress.models import create_model

    if isinstance(item, ModelSpec):
        return create_model(item, state.data.input_shape, state.data.num_outputs, data_task=state.data.task)
    if item == "previous":
        return state.model
    if teacher_epoch is not None:
        src = teacher_stage(state.recipe, state.stage.index)
        ckpt = state.stage_dir_of(src, create=False) / f"epoch{teacher_epoch:03d}.pt"
        if not ckpt.is_file():
            raise RecipeError(f"{state.stage.path}.teacher_epoch", f"no checkpoint {ckpt} (did {src.path} stop early?)")
        return load_model(ckpt)
    if state.teacher is None:
        raise RecipeError(ipath, "is 'recipe' but there is no teacher")
    return state.teacher
