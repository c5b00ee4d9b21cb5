"""The text dataset: csv/jsonl rows, labels to class ids, tokenizers (trained on the training split only,
a folder, a tokenizer.json), padded batches, one-line errors, and a whole chain on text from the CLI."""
import csv
import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.data import create_data
from compress.data.bundle import DataSpec, split_rows
from compress.data.inputs import Inputs
from compress.errors import CompressError, RecipeError

pytest.importorskip("tokenizers", reason="tokenizers is in the optional extra compress[hf]")
os.environ["HF_HUB_OFFLINE"] = "1"

GOOD, BAD, FILL = ["good", "great", "lovely"], ["bad", "awful", "dull"], ["the", "movie", "was", "a", "plot"]
UNK, PAD = 1, 0  # the trained tokenizer's [UNK] and [PAD] ids (SPECIALS order)
VOCAB = 300  # byte-level bpe: 256 bytes, 5 special tokens, a few merges


def _rows(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [(GOOD if label == "pos" else BAD)[i % 3]] + [FILL[int(j)] for j in torch.randint(0, 5, (1 + i % 7,), generator=g)]
        out.append({"text": " ".join(words), "label": label})
    return out


def _csv(path, rows, columns=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([[r.get(c, "") for c in columns] for r in rows])
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _data(path, **kw):
    return create_data({"name": "text", "path": str(path), "tokenizer": {"vocab_size": VOCAB}, "batch_size": 8, **kw})


@pytest.mark.parametrize("write", [_csv, _jsonl], ids=["csv", "jsonl"])
def test_rows_become_padded_named_batches_with_sorted_string_classes(tmp_path, write):
    data = _data(write(tmp_path / f"t.{'csv' if write is _csv else 'jsonl'}", _rows()))
    assert data.classes == ["neg", "pos"] and data.num_outputs == 2 and data.input_shape == (128,)
    assert len(data.train) + len(data.val) + len(data.test) == 60 and data.vocab_size <= VOCAB
    x, y = next(iter(data.loader("train", shuffle=False)))
    assert isinstance(x, Inputs) and set(x) == {"input_ids", "attention_mask"} and y.dtype == torch.long
    lengths = x["attention_mask"].sum(1)
    assert x["input_ids"].shape[1] == int(lengths.max())  # padded to the batch's longest sequence
    for ids, mask, n in zip(x["input_ids"], x["attention_mask"], lengths):
        assert (mask[:n] == 1).all() and (mask[n:] == 0).all() and (ids[n:] == PAD).all()
        assert ids[0] == 2 and ids[n - 1] == 3  # [CLS] ... [SEP]
    # Labels follow the text: every 'pos' row holds a word from GOOD.
    assert data.example_input(2)["input_ids"].shape[0] == 2


def test_integer_labels_sort_as_numbers_and_max_length_pads_and_truncates(tmp_path):
    rows = [{"text": "word " * (8 + i % 20), "label": [2, 10, 9][i % 3]} for i in range(30)]
    data = _data(_jsonl(tmp_path / "t.jsonl", rows), max_length=8, padding="max_length")
    assert data.classes == ["2", "9", "10"]
    x, _ = next(iter(data.loader("train")))
    assert x["input_ids"].shape[1] == 8 and (x["input_ids"][:, -1] == 3).all()  # truncated, [SEP] kept


def test_labels_int_cannot_read_sort_as_strings(tmp_path):
    rows = [{"text": f"word {i}", "label": ["²", "--1", "10", "-3"][i % 4]} for i in range(12)]
    assert _data(_jsonl(tmp_path / "t.jsonl", rows)).classes == ["--1", "-3", "10", "²"]  # int('²') raises


def test_the_tokenizer_learns_from_the_training_split_only(tmp_path):
    n, spec = 60, DataSpec(name="text")
    _, _, test_idx = split_rows(n, spec)
    rows = _rows(n)
    for i in test_idx:  # a word in characters no training row has
        rows[i]["text"] += " жжж"
    with pytest.warns(UserWarning, match="tokenizers#1794"):  # wordpiece: unseen characters are [UNK]
        data = _data(_csv(tmp_path / "t.csv", rows), tokenizer={"train": "wordpiece", "vocab_size": 60})
    test_ids = [data.test[i][0]["input_ids"] for i in range(len(data.test))]
    assert all(UNK in ids for ids in test_ids)
    assert not any(UNK in data.train[i][0]["input_ids"] for i in range(len(data.train)))


def test_bpe_training_gives_the_same_vocabulary_every_time(tmp_path):
    path = _csv(tmp_path / "t.csv", [{"text": f"{r['text']} title{i} the movie{i % 7}", "label": r["label"]}
                                     for i, r in enumerate(_rows(200))])
    first, again = _data(path), _data(path)
    assert all(torch.equal(first.train[i][0]["input_ids"], again.train[i][0]["input_ids"]) for i in range(len(first.train)))


def test_a_saved_tokenizer_folder_and_file_read_back(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from transformers import PreTrainedTokenizerFast

    from compress.data.text import TrainTokenizer, train_tokenizer

    path = _csv(tmp_path / "t.csv", _rows())
    tok = train_tokenizer(TrainTokenizer(vocab_size=VOCAB), [r["text"] for r in _rows()])
    tok.save(str(tmp_path / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(tmp_path / "tok")
    from_file = _data(path, tokenizer=str(tmp_path / "tokenizer.json"))
    from_folder = _data(path, tokenizer=str(tmp_path / "tok"))
    assert from_file.vocab_size == from_folder.vocab_size == tok.get_vocab_size()
    a, b = next(iter(from_file.loader("test"))), next(iter(from_folder.loader("test")))
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"]) and torch.equal(a[0]["attention_mask"], b[0]["attention_mask"])
    assert torch.equal(a[0]["input_ids"][0, :3], torch.tensor(tok.encode(_rows()[int(split_rows(60, DataSpec(name="t"))[2][0])]["text"]).ids[:3]))


def test_a_tokenizer_json_saved_with_padding_on_leaves_the_padding_and_mask_to_the_loader(tmp_path):
    from compress.data.text import TrainTokenizer, train_tokenizer

    tok = train_tokenizer(TrainTokenizer(vocab_size=VOCAB), [r["text"] for r in _rows()])
    tok.enable_padding(pad_id=PAD, pad_token="[PAD]")
    tok.save(str(tmp_path / "tokenizer.json"))
    data = _data(_csv(tmp_path / "t.csv", _rows()), tokenizer=str(tmp_path / "tokenizer.json"))
    for x, _ in data.loader("train", shuffle=False):
        real = x["input_ids"] != PAD
        assert torch.equal(x["attention_mask"], real.long())  # no [PAD] the model attends to
        assert real[:, -1].any()  # padded to the batch's longest text, not the file's


def test_text_pairs_get_segment_ids(tmp_path):
    rows = [{**r, "other": "and more"} for r in _rows(20)]
    data = _data(_jsonl(tmp_path / "t.jsonl", rows), text_pair="other", max_length=32)
    x = data.example_input(1)
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"}
    assert x["token_type_ids"].sum() == 3  # "and more [SEP]"
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from compress.models import create_model
    from compress.stages.base import check_outputs

    config = {**BERT, "vocab_size": VOCAB}
    with pytest.raises(RecipeError, match=r"^model: .*unknown input 'token_type_ids'.*model.inputs: \[input_ids, "
                                          r"attention_mask, token_type_ids\]$"):
        check_outputs(create_model({"name": "hf", "config": config}, data.input_shape, 2), data, "model")
    named = {"name": "hf", "config": config, "inputs": ["input_ids", "attention_mask", "token_type_ids"]}
    check_outputs(create_model(named, data.input_shape, 2), data, "model")


def _error(tmp_path, **kw):
    with pytest.raises(CompressError) as exc:
        _data(kw.pop("path", tmp_path / "t.csv"), **kw)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_bad_input_is_one_line_naming_the_key(tmp_path, monkeypatch):
    _csv(tmp_path / "t.csv", _rows())
    assert _error(tmp_path, path=tmp_path / "no.csv").startswith("data.path: expected an existing file")
    assert _error(tmp_path, path=tmp_path / "t.txt").startswith("data.path: expected a .csv or .jsonl")
    assert _error(tmp_path, text="body") == f"data.text: '{tmp_path / 't.csv'}' has no column 'body'; it has text, label"
    assert _error(tmp_path, label="y").startswith("data.label: ") and "it has text, label" in _error(tmp_path, label="y")
    assert "label 'pos' is not one of ['neg', 'other']" in _error(tmp_path, classes=["neg", "other"])
    assert _error(tmp_path, classes=["neg", "pos", "neg"]) == "data.classes: expected distinct class names, got 'neg' more than once"
    assert _error(tmp_path, tokenizer=str(tmp_path)).startswith("data.tokenizer: ") and "not a tokenizer folder" in _error(tmp_path, tokenizer=str(tmp_path))
    assert "no such file or folder" in _error(tmp_path, tokenizer=str(tmp_path / "nope"))
    assert _error(tmp_path, tokenizer=5).startswith("data.tokenizer: expected a tokenizer folder, a tokenizer.json")
    assert _error(tmp_path, tokenizer={"train": "unigram"}).startswith("data.tokenizer.train: ")
    (tmp_path / "junk.json").write_text("{}")
    assert _error(tmp_path, tokenizer=str(tmp_path / "junk.json")).startswith("data.tokenizer: ")
    empty = _rows(10)
    empty[3]["text"] = "  "
    _csv(tmp_path / "e.csv", empty)
    assert _error(tmp_path, path=tmp_path / "e.csv") == f"data.text: '{tmp_path / 'e.csv'}', line 5: expected text in column 'text', got nothing"
    _csv(tmp_path / "one.csv", [{"text": "a", "label": "x"}] * 5)
    assert "at least 2 classes" in _error(tmp_path, path=tmp_path / "one.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    assert "line 2: expected a JSON object" in _error(tmp_path, path=tmp_path / "b.jsonl")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real(name, *a))
    assert "pip install 'compress[hf]'" in _error(tmp_path)


BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 64}


def test_a_model_smaller_than_the_vocabulary_names_model_config_vocab_size(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from compress.models import create_model
    from compress.stages.base import check_outputs

    data = _data(_csv(tmp_path / "t.csv", _rows()), max_length=32)
    for config, words in [(BERT, "is required with text data"), ({**BERT, "vocab_size": 10}, "embeds 10 tokens")]:
        model = create_model({"name": "hf", "config": config}, data.input_shape, data.num_outputs)
        with pytest.raises(RecipeError, match=f"^model.config.vocab_size: .*{words}.*set vocab_size: {data.vocab_size}"):
            check_outputs(model, data, "model")
    short = create_model({"name": "hf", "config": {**BERT, "vocab_size": VOCAB, "max_position_embeddings": 16}}, (32,), 2)
    with pytest.raises(RecipeError, match="^model.config.max_position_embeddings: .* data.max_length is 32"):
        check_outputs(short, data, "model")
    check_outputs(create_model({"name": "hf", "config": {**BERT, "vocab_size": VOCAB}}, (32,), 2), data, "model")


def _recipe(tmp_path, stages, vocab=VOCAB):
    csv_path = _csv(tmp_path / "t.csv", _rows(96))
    doc = {"name": "text", "seed": 0,
           "data": {"name": "text", "path": str(csv_path), "max_length": 16, "batch_size": 16,
                    "tokenizer": {"train": "bpe", "vocab_size": VOCAB}},
           "teacher": {"name": "hf", "config": {**BERT, "vocab_size": vocab, "hidden_size": 32, "num_attention_heads": 4}},
           "model": {"name": "hf", "config": {**BERT, "vocab_size": vocab, "num_attention_heads": 4}},
           "stages": stages, "benchmark": {"latency": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "r.yaml")


@pytest.mark.parametrize("override,words", [
    ([], "model.config.vocab_size: the model embeds 20 tokens but the tokenizer (data.tokenizer) has"),
    (["--set", "data.text=title"], "data.text: "),
], ids=["vocab", "column"])
def test_cli_refuses_bad_text_recipes_in_one_line_with_exit_2(tmp_path, override, words):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    result = CliRunner().invoke(cli, ["validate", _recipe(tmp_path, [{"train": {"epochs": 1}}], vocab=20), *override])
    assert result.exit_code == 2 and words in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_runs_distill_head_prune_export_and_dynamic_int8_on_text(tmp_path):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from compress.runtime.onnx import onnx_run, onnx_session

    fast = {"epochs": 6, "progress": False, "optimizer": {"name": "adam", "lr": 0.005}}
    stages = [{"train": {"target": "teacher", **fast}},
              {"distill": {"teacher": "recipe", "temperature": 2, "alpha": 0.5, **fast}},
              {"prune": {"method": "channel", "sparsity": 0.5, "finetune": {"epochs": 1, "progress": False}}},
              {"export": {}}, {"quantize": {"method": "ptq_dynamic"}}]
    result = CliRunner().invoke(cli, ["run", _recipe(tmp_path, stages), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["train", "distill", "prune", "export", "quantize"]
    assert rows[2]["params"] < rows[1]["params"] < rows[0]["params"]  # heads pruned after distilling
    assert all(r["metrics"]["accuracy"] > 0.6 for r in rows), [r["metrics"] for r in rows]  # one word tells the label
    sess = onnx_session(rows[-1]["artifact"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    x = Inputs(input_ids=torch.tensor([[2, 5, 6, 7, 3]] * 3), attention_mask=torch.ones(3, 5, dtype=torch.long))
    assert onnx_run(sess, x).shape == (3, 2)  # dynamic batch and sequence axes


# -- a tokenizer folder is data too (issue 24) ------------------------------------------------------------
def test_a_tokenizer_folder_asking_to_run_its_code_is_refused_without_asking(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    from transformers import PreTrainedTokenizerFast

    from compress.data.text import TrainTokenizer, train_tokenizer

    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")  # a prompt says yes
    monkeypatch.delenv("COMPRESS_ALLOW_IMPORT", raising=False)
    folder, marker = tmp_path / "tok", tmp_path / "ran"
    tok = train_tokenizer(TrainTokenizer(vocab_size=VOCAB), [r["text"] for r in _rows()])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]").save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    said = _error(tmp_path, path=_csv(tmp_path / "t.csv", _rows()), tokenizer=str(folder))
    assert said.startswith(f"data.tokenizer: '{folder}' asks to run its own Python (auto_map in tokenizer_config.json)")
    assert "--allow-import" in said and asked == [] and not marker.exists()


# -- MovieLens-100K titles: the shipped text recipe's data, read in place --------------------------------
def _u_item(folder, n=60):
    """A u.item in ml-100k's format: id|title|date|video date|url|19 genre flags; odd ids are dramas."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{i}|{FILL[i % 5].title()} {GOOD[i % 3]} ({1990 + i % 9})|01-Jan-1995||http://x|"
             + "|".join("1" if (k == 8 and i % 2) or (k == 5 and not i % 2) else "0" for k in range(19)) for i in range(1, n + 1)]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder / "u.item"


def test_movielens_titles_reads_u_item_in_place_and_the_shipped_recipe_validates(tmp_path):
    path = _u_item(tmp_path / "ml-100k")
    data = create_data({"name": "movielens_titles", "path": str(path), "tokenizer": {"vocab_size": VOCAB}})
    assert data.classes == ["Drama", "other"] and len(data.train) + len(data.val) + len(data.test) == 60
    assert create_data({"name": "movielens_titles", "path": str(path), "genre": "Comedy"}).classes == ["Comedy", "other"]
    with pytest.raises(CompressError, match="data.genre: expected one of u.item's genres"):
        create_data({"name": "movielens_titles", "path": str(path), "genre": "drama"})
    pytest.importorskip("transformers", reason="transformers is the optional extra compress[hf]")
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "text_bert_tiny.yaml")
    result = CliRunner().invoke(cli, ["validate", recipe], env={"COMPRESS_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0 and result.output.startswith("ok: text_bert_tiny: classification"), result.output
