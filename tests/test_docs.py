"""The documentation site: MkDocs builds it without a warning, its links land, every recipe in it is valid.

The Python examples and the recipes that tests/test_readme.py checks in detail are run there."""
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress.recipe import parse_recipe, read_yaml

ROOT = Path(__file__).resolve().parents[1]

# Runs mkdocs in this interpreter and says whether building imported torch (mkdocstrings reads the source).
BUILD = """
import sys, runpy
sys.argv = ["mkdocs", "build", "--strict", "-f", sys.argv[1], "-d", sys.argv[2]]
try:
    runpy.run_module("mkdocs", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site's folder (`mkdocs build --strict`), or a skip where MkDocs is not installed."""
    for module in ("mkdocs", "mkdocstrings_handlers.python", "pymdownx"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BUILD, str(ROOT / "mkdocs.yml"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "WARNING" not in log, log
    assert "torch imported: False" in log, log
    print(f"mkdocs build --strict: {time.monotonic() - start:.1f} s")
    return out


def test_site_builds_strict(site):
    pages = sorted(p.parent.name for p in site.glob("*/index.html"))
    assert {"recipes", "stages", "search", "training", "runs", "security", "results", "development", "api"} <= set(pages)
    api = (site / "api" / "index.html").read_text()
    for name in ("compress.distill", "compress.prune", "compress.quantize", "compress.export", "compress.load_model",
                 "compress.Pipeline", "compress.PruneConfig"):
        assert f'id="{name}"' in api, name
    # the quickstart table is written once, in the README, and included on the home page
    assert "0: train" in (site / "index.html").read_text()


def test_readme_links_land(site, doc):
    """Every link from the README into docs/ names a page that exists and, after '#', a heading on it."""
    links = re.findall(r"\]\(docs/([\w-]+)\.md(?:#([\w-]+))?\)", doc("README.md"))
    assert len(links) >= 10
    for page, anchor in links:
        html = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), page
        assert not anchor or f'id="{anchor}"' in html.read_text(), f"docs/{page}.md#{anchor}"


# a recipe fragment (stages:, data:, model:, ...) is checked inside this recipe; a search: section inside
# recipes/mnist_search.yaml, whose stages its key paths name
BASE = {"name": "doc-snippet", "data": {"name": "digits"}, "teacher": {"name": "mlp", "hidden": [128]},
        "model": {"name": "mlp", "hidden": [32]}, "stages": [{"train": {"target": "teacher"}}, {"distill": {}}]}


def test_doc_recipes_are_valid(doc_yaml, tmp_path, monkeypatch):
    """Every ```yaml block of README.md and docs/*.md: a recipe parses; a fragment parses inside a recipe."""
    name, line, text = doc_yaml
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    (tmp_path / "mnist-t10k").mkdir()
    monkeypatch.chdir(tmp_path)
    block = yaml.safe_load(text)
    if "model" in block and (block["model"].get("name", "").startswith("timm:") or block["model"].get("name") == "hf"):
        pytest.importorskip("timm" if block["model"]["name"].startswith("timm:") else "transformers")
    if "name" in block:
        doc = block
    elif "search" in block:
        from compress.search.config import parse_search

        doc = {**read_yaml(ROOT / "recipes" / "mnist_search.yaml"), **block}
        parse_search(doc)
    else:
        doc = {**BASE, **block}
    if block.get("data", {}).get("name") == "text":  # the csv it names, one text and one label a row
        (tmp_path / block["data"]["path"]).write_text("text,label\ngood,pos\nbad,neg\n")
    parse_recipe(doc)
