"""The lm dataset: split by file, packed into non-overlapping blocks with next-token targets."""
import json

import pytest
import torch

from compress.data import create_data
from compress.data.lm import IGNORE, TokenBlocks, glob_regex
from compress.errors import CompressError, RecipeError
from tests.conftest import lm_data_spec

pytest.importorskip("tokenizers")


def test_blocks_predict_every_token_once():
    ds = TokenBlocks(torch.arange(10), block_size=4, pad_id=0)
    assert len(ds) == 3 and ds.tokens == 9  # every token but the first is a target
    x, y = ds[0]
    assert x["input_ids"].tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]
    x, y = ds[2]
    assert x["input_ids"].tolist() == [8, 9, 0, 0] and y.tolist() == [9, IGNORE, IGNORE, IGNORE]
    targets = torch.cat([ds[i][1] for i in range(len(ds))])
    assert targets[targets != IGNORE].tolist() == list(range(1, 10))


def test_split_by_file_with_a_seed(lm_corpus):
    data = create_data(lm_data_spec(lm_corpus))
    d = data.description
    assert data.task == "lm" and d["documents"] == 12 and sum(d["split_documents"]) == 12  # notes.txt is not *.py
    assert d["split_tokens"][0] == data.train.tokens and data.vocab_size == data.num_outputs <= 300
    x, y = next(iter(data.loader("train", shuffle=False)))
    assert x["input_ids"].shape == (8, 16) and y.shape == (8, 16)
    assert torch.equal(x["input_ids"][0, 1:], y[0, :-1])  # targets are the inputs shifted by one
    other = create_data(lm_data_spec(lm_corpus, split_seed=1)).description
    assert other["split_tokens"] != d["split_tokens"]


def test_jsonl_field_and_stdlib(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i} " * 20}) for i in range(6)) + "\n")
    data = create_data({"name": "lm", "path": str(path), "field": "body", "block_size": 8,
                        "tokenizer": {"train": "bpe", "vocab_size": 280}})
    assert data.description["documents"] == 6
    std = create_data({"name": "lm", "root": "stdlib", "files": "json/*.py", "block_size": 32,
                       "tokenizer": {"train": "bpe", "vocab_size": 300}})
    import platform

    assert std.description["python"] == platform.python_version() and "standard library" in std.description["corpus"]


def test_one_line_errors(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(RecipeError, match=r"data.files: .*found 1 document"):
        create_data({"name": "lm", "root": str(tmp_path), "files": "*.py"})
    with pytest.raises(CompressError, match="either files:"):
        create_data({"name": "lm", "root": str(tmp_path)})


def test_glob_regex():
    r = glob_regex("**/test/**")
    assert r.fullmatch("test/a.py") and r.fullmatch("ctypes/test/x/a.py") and not r.fullmatch("attest/a.py")
    assert glob_regex("*.py").fullmatch("a.py") and not glob_regex("*.py").fullmatch("d/a.py")
