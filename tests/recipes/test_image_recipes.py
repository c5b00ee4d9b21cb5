"""The Imagenette/Imagewoof KD recipes, run unchanged on a tiny generated folder with small overrides."""
from pathlib import Path

import pytest
import torch
import torchvision

from compress.data.imagefolder import write_shapes_folder
from compress.errors import CompressError
from compress.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["imagenette_kd.yaml", "imagewoof_kd.yaml"]
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("shapes"), num_classes=NUM_CLASSES, train_per_class=32,
                               val_per_class=10, size=40)


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> Path:
    """A stand-in for a downloaded torchvision file: a random shufflenet_v2_x0_5 with its 1000-class ImageNet head."""
    path = tmp_path_factory.mktemp("weights") / "shufflenet-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=1000).state_dict(), path)
    return path


def tiny_overrides(root: Path, weights: Path) -> list[str]:
    """Small images, shufflenet_v2_x0_5 for resnet50, narrow students, a few epochs, no latency timing."""
    sets = [f"data.root={root}", "data.image_size=32", "data.num_workers=0", "data.batch_size=16",
            "data.eval_batch_size=64", "data.crop_scale=[0.6, 1.0]",
            "teacher.name=shufflenet_v2_x0_5", f"teacher.weights={weights}",
            "model.widths=[16, 32]", "stages.3.distill.student.widths=[16, 32]",
            "stages.0.train.epochs=2", "benchmark.latency=false", "benchmark.macs=false",
            "benchmark.zipped=false"]
    for i, kind in enumerate(["train", "train", "train", "distill", "distill"]):
        if i:
            sets.append(f"stages.{i}.{kind}.epochs=4")
        sets.append(f"stages.{i}.{kind}.progress=false")
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_on_tiny_folder(recipe, shapes, imagenet_weights, tmp_path):
    report = Pipeline.from_yaml(ROOT / "recipes" / recipe, tiny_overrides(shapes, imagenet_weights)).run(tmp_path / "run")
    rows = report["stages"]
    assert [r["name"] for r in rows] == ["train", "train", "train", "distill", "distill"]
    assert rows[0]["role"] == "teacher" and rows[0]["params"] > 10 * rows[1]["params"]  # the resnet, not a student
    chance = 1 / NUM_CLASSES
    for r in rows[3:]:
        assert r["split"] == "test"
        assert r["metrics"]["accuracy"] > chance + 0.15, r  # distilled students learn, far above chance
    assert (tmp_path / "run" / "report.json").is_file()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_needs_only_a_path(recipe, shapes, tmp_path):
    """Unchanged but for data.root, the recipe validates: folder layout, class count, model shapes."""
    with pytest.raises(CompressError, match="data.root: no such folder"):
        Pipeline.from_yaml(ROOT / "recipes" / recipe, [f"data.root={tmp_path / 'missing'}"])
    p = Pipeline.from_yaml(ROOT / "recipes" / recipe, [f"data.root={shapes}", "teacher.weights=null"])
    assert p.recipe.data.image_size == 224 and p.recipe.teacher.name == "resnet50"
    assert p.recipe.stages[0].config.freeze_backbone_epochs == 1
    assert p.recipe.stages[0].config.optimizer.backbone_lr_mult < 1
    assert [s.config.student.name for s in p.recipe.stages[3:]] == ["smallcnn", "lenet5"]
