import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_DATA_DIR") or ROOT.parent / "shared" / "data")

torch.set_num_threads(1)  # many small tests: threads cost more than they give on 2 cores
# No test reaches the Hugging Face hub: set before any module imports huggingface_hub (it reads these once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def shared_data() -> Path:
    """The reference data folder (MNIST t10k, MovieLens 100K), or a skip when this clone has none."""
    if not SHARED.is_dir():
        pytest.skip(f"reference data not found at {SHARED}; set COMPRESS_DATA_DIR")
    os.environ["COMPRESS_DATA_DIR"] = str(SHARED.resolve())
    return SHARED.resolve()


@pytest.fixture
def tiny_recipe() -> dict:
    """A recipe that trains in well under a second."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "synthetic", "num_samples": 256, "num_classes": 3, "shape": [1, 6, 6], "batch_size": 32},
        "model": {"name": "mlp", "hidden": [16]},
        "stages": [{"train": {"epochs": 2, "progress": False}}, {"evaluate": {}}],
        "benchmark": {"latency": False},  # timing is for benchmarks/, not unit tests
    }


# The documentation: README.md (the front door) and the pages under docs/ (built with MkDocs).
DOC_FILES = ["README.md"] + sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def read_doc(name: str, heading: str | None = None) -> str:
    """The text of README.md or of a page under docs/ ("recipes.md"); with ``heading`` ("## Your models"),
    only the section that starts with it, up to the next heading of its level or above (code blocks skipped)."""
    text = (ROOT / name if name == "README.md" else ROOT / "docs" / name).read_text()
    if heading is None:
        return text
    level, out, fence = len(heading) - len(heading.lstrip("#")), None, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#+ ", line):
            n = len(line) - len(line.lstrip("#"))
            if out is not None and n <= level:
                break
            if out is None and line.startswith(heading):
                out = []
        if out is not None:
            out.append(line)
    if out is None:
        raise LookupError(f"{name} has no heading {heading!r}")
    return "".join(out)


def code_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced block of ``lang`` in ``text``."""
    return [(text[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


@pytest.fixture
def doc():
    """read_doc: a documentation file's text, or one of its sections."""
    return read_doc


def pytest_generate_tests(metafunc):
    """``doc_yaml``: every ```yaml block of README.md and docs/*.md, as (file, line, text)."""
    if "doc_yaml" in metafunc.fixturenames:
        blocks = [(name, line, code) for name in DOC_FILES for line, code in code_blocks(read_doc(name), "yaml")]
        metafunc.parametrize("doc_yaml", blocks, ids=[f"{name}:{line}" for name, line, _ in blocks])


# -- tiny causal LMs (decoder-LM deployment tests) -----------------------------------------------------------
def tiny_causal_lm(family: str = "llama", vocab: int = 128, seed: int = 0, init: float = 0.5):
    """A random-init transformers causal LM of ``family`` in a few KB (Llama/Qwen2/Phi-3 with 4 heads in 2
    key-value groups); a wide ``init`` so that its next-token distribution is peaked, not uniform."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, initializer_range=init, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}[family]
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, **common)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def tiny_lm():
    return tiny_causal_lm


# -- tiny decoder language models (issue 28) -------------------------------------------------------------
TINY_LM = {  # inline `name: hf` configs, a few thousand parameters each, grouped-query attention where the family has it
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "phi3": {"model_type": "phi3", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
}


@pytest.fixture(scope="session")
def lm_corpus(tmp_path_factory) -> Path:
    """Twelve small text files of Python-like lines: enough for a 300-token BPE and a split by file."""
    root = tmp_path_factory.mktemp("corpus")
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "None", "print", "list"]
    for i in range(12):
        lines = [f"{words[(i + j) % 12]} x{j % 5} = {words[(3 * i + j) % 12]}({j})" for j in range(40)]
        (root / f"doc{i:02d}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes.txt").write_text("not python\n", encoding="utf-8")
    return root


def lm_data_spec(root: Path, **kw) -> dict:
    return {"name": "lm", "root": str(root), "files": "*.py", "block_size": 16, "batch_size": 8,
            "tokenizer": {"train": "bpe", "vocab_size": 300}, **kw}
