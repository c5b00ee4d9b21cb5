"""The command line answers before it imports torch: ``compress --help`` and ``import compress`` are cheap."""
import subprocess
import sys

from click.testing import CliRunner

from compress.cli import cli


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_help_and_the_package_import_no_torch():
    code = ("import sys; from compress.cli import cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
            "import compress; compress.__version__; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torch_pruning', 'onnx', 'onnxruntime', 'transformers', 'timm')))")
    assert _fresh(code) == "[]"


def test_public_names_load_on_first_use_and_search_stays_the_function():
    code = ("import compress, compress.search.engine; "
            "print(callable(compress.search), compress.distill.__name__, compress.SearchConfig.__name__)")
    assert _fresh(code) == "True distill SearchConfig"


def test_list_shows_every_model_source():
    out = CliRunner().invoke(cli, ["list", "models"]).output
    for source in ("<torchvision>", "timm:<name>", "hf:<folder>", "import:"):
        assert f"  {source}" in out
    assert out.count("models:") == 1


def test_checking_a_recipe_imports_torch_but_none_of_the_heavy_libraries():
    """``compress validate`` pays for torch (stage configs live beside their torch code), not for
    torch-pruning, timm, torchvision, transformers, ONNX Runtime or matplotlib (seconds more)."""
    code = ("import sys; from compress.pipeline import Pipeline; "
            "Pipeline.from_dict({'name': 'x', 'data': {'name': 'digits'}, 'model': {'name': 'mlp', 'hidden': [8]}, "
            "'stages': [{'train': {'epochs': 1}}, {'prune': {'method': 'channel', 'sparsity': 0.5}}]}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch_pruning', 'timm', 'torchvision', 'transformers', 'onnxruntime', 'matplotlib')))")
    assert _fresh(code) == "[]"
