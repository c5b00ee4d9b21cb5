"""The bring-your-own-model chains (recipes/mnist_vit_chain.yaml, mnist_resnet18_chain.yaml) pass
`compress validate` on the reference MNIST folder: models built, stage order and inputs checked. The
real runs are benchmarks/arch_chains.py, not tests."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe, model", [("mnist_vit_chain.yaml", "timm"), ("mnist_resnet18_chain.yaml", None)])
def test_chain_recipe_validates(recipe, model, shared_data):
    if model:
        pytest.importorskip(model, reason=f"{model} is an optional extra")
    result = CliRunner().invoke(cli, ["validate", str(ROOT / "recipes" / recipe)])
    assert result.exit_code == 0, result.output
    assert "train -> distill -> prune -> export -> quantize" in result.output
