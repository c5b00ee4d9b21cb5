"""Text classification data: a .csv (with a header) or .jsonl file of text + label (or MovieLens-100K's
movie titles by genre, ``movielens_titles``), tokenised for Hugging Face transformer classifiers.

The tokenizer is a local transformers tokenizer folder, a ``tokenizer.json`` file (the ``tokenizers``
library), or one trained here with ``tokenizers`` on the training split only (so validation and test
text never shapes the vocabulary). Samples are kept unpadded; the loader's collate function pads each
batch (to its longest sequence, or to ``max_length``) and builds the attention mask, so batches are
``Inputs({'input_ids', 'attention_mask'})`` (plus ``token_type_ids`` for text pairs when the tokenizer
marks segments).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from pydantic import Discriminator, Field, Tag, field_validator
from torch.utils.data import Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from compress.config import StrictModel
from compress.data.bundle import DataBundle, DataSpec, read_utf8, register_dataset, split_rows
from compress.data.inputs import Inputs
from compress.errors import RecipeError
from compress.safety import trust_remote_code

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
INTEGER = re.compile(r"-?\d+")  # labels that sort as numbers (\d: the digits int() reads)


class TrainTokenizer(StrictModel):
    """Train a tokenizer on the training split with the ``tokenizers`` library.

    bpe (the default): byte-level, GPT-2/RoBERTa style, no unknown tokens, the same vocabulary every run.
    wordpiece (BERT style, unseen characters become [UNK]): tokenizers' trainer numbers its '##' pieces
    in hash-map order, so the vocabulary can differ from run to run (huggingface/tokenizers#1794).
    """

    train: Literal["bpe", "wordpiece"] = "bpe"
    # An upper bound (small data gives fewer); byte-level bpe always holds its 256 bytes plus 5 special tokens.
    vocab_size: int = Field(8000, ge=len(SPECIALS) + 1, le=1 << 20)
    lowercase: bool = True
    min_frequency: int = Field(1, ge=1)


def _tokenizer_kind(value: Any) -> str:
    return "options[train]" if isinstance(value, dict) else "path[str]"


# A tagged union: a mistake gets one line for the member the value is (options or a path), not one per
# member. Tags in brackets are pydantic steps that compress.config drops from the key path.
Tokenizer = Annotated[Union[Annotated[TrainTokenizer, Tag("options[train]")], Annotated[str, Tag("path[str]")]],
                      Discriminator(_tokenizer_kind)]


class TextSpec(DataSpec):
    path: Path  # .csv with a header row, or .jsonl (one JSON object per line)
    text: str = "text"
    label: str = "label"
    text_pair: Optional[str] = None  # a second text column (sentence pairs)
    max_length: int = Field(128, ge=4, le=1 << 16)  # tokens per sample, [CLS]/[SEP] included; longer is truncated
    padding: Literal["longest", "max_length"] = "longest"  # per batch: to its longest sequence, or always max_length
    # A folder (transformers tokenizer), a tokenizer.json file, or training options.
    tokenizer: Tokenizer = Field(default_factory=TrainTokenizer)
    classes: Optional[list[str]] = Field(None, min_length=2)  # fixes the class ids; default: the labels found, sorted

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_given(cls, v: Any) -> Any:
        if not isinstance(v, (str, dict, TrainTokenizer)):
            raise ValueError(f"expected a tokenizer folder, a tokenizer.json file or training options "
                             f"({{train: bpe, vocab_size: 8000}}), got {v!r}")
        return v

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        repeated = sorted({c for c in v or [] if v.count(c) > 1})
        if repeated:
            raise ValueError(f"expected distinct class names, got {', '.join(map(repr, repeated))} more than once")
        return v

    @field_validator("path")
    @classmethod
    def _readable(cls, p: Path) -> Path:
        if p.suffix.lower() not in SUFFIXES:
            raise ValueError(f"expected a .csv or .jsonl file, got '{p}'")
        if not p.is_file():
            raise ValueError(f"expected an existing file, got '{p}' (no such file)")
        return p


# MovieLens-100K's genres, in u.item's flag order (the ml-100k README, u.genre).
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


class MovieLensTitlesSpec(TextSpec):
    """Real text every MovieLens-100K folder holds: ``u.item``'s titles as column text, labelled ``genre``
    or 'other' (column label) from the movie's genre flags. Read in place: nothing is written first."""

    path: Path  # ml-100k/u.item: '|'-separated latin-1, id|title|release date|video date|IMDb URL|19 flags
    genre: str = "Drama"

    @field_validator("path")
    @classmethod
    def _readable(cls, p: Path) -> Path:
        if not p.is_file():
            raise ValueError(f"expected MovieLens-100K's u.item file, got '{p}' (no such file)")
        return p

    @field_validator("genre")
    @classmethod
    def _known(cls, g: str) -> str:
        if g not in GENRES:
            raise ValueError(f"expected one of u.item's genres ({', '.join(GENRES)}), got {g!r}")
        return g


def _need(module: str, path: str) -> None:
    """One line naming the install command when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise RecipeError(path, f"the text dataset needs the optional package {module}: pip install 'compress[hf]'")


# -- reading the file -------------------------------------------------------------------------------------
def read_titles(path: Path, genre: str) -> tuple[list[dict], list[int], list[str]]:
    """u.item's rows as {text: title, label: genre / 'other'}, their line numbers, and the two columns."""
    flag = 5 + GENRES.index(genre)
    # latin-1 (the ml-100k README): every byte decodes. QUOTE_NONE: a quote in a title is a character.
    reader = csv.reader(io.StringIO(path.read_text(encoding="latin-1"), newline=""), delimiter="|",
                        quoting=csv.QUOTE_NONE)
    rows, lines = [], []
    for fields in reader:
        if not fields:
            continue
        if len(fields) != 5 + len(GENRES) or fields[flag] not in ("0", "1"):
            raise RecipeError("data.path", f"'{path}', line {reader.line_num}: expected a u.item row (id|title|release "
                                           f"date|video date|IMDb URL|{len(GENRES)} genre flags 0/1), got {fields[:2]}...")
        rows.append({"text": fields[1].strip(), "label": genre if fields[flag] == "1" else "other"})
        lines.append(reader.line_num)
    return rows, lines, ["text", "label"]


def read_rows(spec: TextSpec) -> tuple[list[dict], list[int]]:
    """The file's rows as dicts, with the line number of each (for messages)."""
    if isinstance(spec, MovieLensTitlesSpec):
        rows, lines, columns = read_titles(spec.path, spec.genre)
    else:
        rows, lines, columns = _read_table(spec)
    if not rows:
        raise RecipeError("data.path", f"'{spec.path}' has no data rows")
    for key in ("text", "label", "text_pair"):
        col = getattr(spec, key)
        if col is not None and col not in columns:
            raise RecipeError(f"data.{key}", f"'{spec.path}' has no column '{col}'; it has {', '.join(map(str, columns))}")
    return rows, lines


def _read_table(spec: TextSpec) -> tuple[list[dict], list[int], list[str]]:
    """A .csv's or .jsonl's rows, their line numbers, and the columns found."""
    content = read_utf8(spec.path)
    rows, lines = [], []
    if SUFFIXES[spec.path.suffix.lower()] == "csv":
        reader = csv.DictReader(io.StringIO(content, newline=""))
        try:
            for row in reader:
                if None in row:  # more fields than the header
                    raise RecipeError("data.path", f"'{spec.path}', line {reader.line_num}: more columns than the header")
                rows.append(row)
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise RecipeError("data.path", f"'{spec.path}', line {reader.line_num}: not a valid CSV row ({exc})") from None
        columns = list(reader.fieldnames or [])
    else:
        columns = []
        for lineno, row in jsonl_rows(spec.path, content):
            if not isinstance(row, dict):
                raise RecipeError("data.path", f"'{spec.path}', line {lineno}: expected a JSON object, "
                                               f"got {type(row).__name__}")
            columns += [k for k in row if k not in columns]
            rows.append(row)
            lines.append(lineno)
    return rows, lines, columns


def jsonl_rows(path: Path, content: str):
    """(line number, parsed value) of every non-blank line of a .jsonl file's ``content``."""
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError("data.path", f"'{path}', line {lineno}: not valid JSON ({exc.msg})") from None


def _texts(spec: TextSpec, rows: list[dict], lines: list[int], key: str) -> list[str]:
    col, out = getattr(spec, key), []
    for row, line in zip(rows, lines):
        v = row.get(col)
        if not isinstance(v, str) or not v.strip():
            got = "nothing" if v is None or (isinstance(v, str) and not v.strip()) else f"{type(v).__name__} {v!r}"
            raise RecipeError(f"data.{key}", f"'{spec.path}', line {line}: expected text in column '{col}', got {got}")
        out.append(v)
    return out


def _labels(spec: TextSpec, rows: list[dict], lines: list[int]) -> tuple[np.ndarray, list[str]]:
    """Class ids and class names: the given ``classes``, else the labels found, sorted (numerically when
    they are all integers, so '10' comes after '9')."""
    raw = []
    for row, line in zip(rows, lines):
        v = row.get(spec.label)
        if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
            raise RecipeError("data.label", f"'{spec.path}', line {line}: expected a label in column '{spec.label}', "
                                            f"got {v!r}")
        raw.append(str(v).strip())
    if spec.classes is not None:
        classes = list(spec.classes)
    else:
        found = set(raw)
        numeric = all(INTEGER.fullmatch(s) for s in found)  # not str.isdigit: '²' is a digit int() refuses
        classes = sorted(found, key=int if numeric else None)
        if len(classes) < 2:
            raise RecipeError("data.label", f"'{spec.path}': every row has label {classes[0]!r}; "
                                            "classification needs at least 2 classes")
    ids = {c: i for i, c in enumerate(classes)}
    for s, line in zip(raw, lines):
        if s not in ids:
            raise RecipeError("data.classes", f"'{spec.path}', line {line}: label {s!r} is not one of {classes}")
    return np.array([ids[s] for s in raw], dtype=np.int64), classes


# -- tokenizers ---------------------------------------------------------------------------------------------
class Encoder:
    """One interface over a ``tokenizers.Tokenizer`` and a transformers tokenizer: lists of token ids
    (truncated to ``max_length``, special tokens added), the pad id and the vocabulary size."""

    def __init__(self, backend: Any, pad_id: int, vocab_size: int, segments: bool):
        self.backend, self.pad_id, self.vocab_size, self.segments = backend, pad_id, vocab_size, segments

    def encode(self, texts: list[str], pairs: Optional[list[str]], max_length: int) -> list[dict[str, list[int]]]:
        from tokenizers import Tokenizer

        if isinstance(self.backend, Tokenizer):
            self.backend.enable_truncation(max_length)
            encs = self.backend.encode_batch(list(zip(texts, pairs)) if pairs else texts)
            out = [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encs]
        else:  # a transformers tokenizer
            enc = self.backend(texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=True)
            out = [{"input_ids": ids, "token_type_ids": t} for ids, t in zip(enc["input_ids"], enc["token_type_ids"])]
        keep = ("input_ids", "token_type_ids") if pairs and self.segments else ("input_ids",)
        return [{k: e[k] for k in keep} for e in out]


def _from_tokenizers(tok, path: str) -> Encoder:
    pad = tok.token_to_id("[PAD]")
    if pad is None:
        pad = tok.padding["pad_id"] if tok.padding else None
    if pad is None:
        raise RecipeError(path, "the tokenizer has no [PAD] token and no padding set; add one to tokenizer.json")
    # A tokenizer.json saved with padding on would pad every text in encode_batch, unmasked; the loader pads
    # each batch and masks the padding (PadCollate), so samples stay unpadded here.
    tok.no_padding()
    return Encoder(tok, pad, tok.get_vocab_size(with_added_tokens=True), segments=True)


def train_tokenizer(cfg: TrainTokenizer, texts: list[str]):
    """A ``tokenizers.Tokenizer`` trained on ``texts`` with BERT's special tokens and [CLS] a [SEP] (b [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if cfg.train == "wordpiece":
        warnings.warn("data.tokenizer: tokenizers' WordPiece training is not deterministic (huggingface/tokenizers#1794): "
                      "the vocabulary, and so the results, can differ run to run; train: bpe is reproducible")
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                            special_tokens=SPECIALS, show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if cfg.lowercase else []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def tokenizer_backend(value: Any, train_texts: list[str], path: str = "data.tokenizer"):
    """A ``tokenizers.Tokenizer`` (trained on ``train_texts``, or read from a tokenizer.json file) or a
    transformers tokenizer (a local folder: ``local_files_only``, its code only with the import opt-in)."""
    _need("tokenizers", path)
    if isinstance(value, TrainTokenizer):
        return train_tokenizer(value, train_texts)
    where = Path(value).expanduser()
    if where.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(where))
        except Exception as exc:  # tokenizers raises its own Exception type for a file it cannot read
            raise RecipeError(path, f"'{where}' is not a tokenizer.json file the tokenizers library "
                                    f"can read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not where.is_dir():
        raise RecipeError(path, f"expected a tokenizer folder, a tokenizer.json file or training options "
                                f"({{train: bpe, vocab_size: 8000}}), got '{where}' (no such file or folder)")
    if not any((where / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise RecipeError(path, f"'{where}' is not a tokenizer folder (no tokenizer.json, "
                                "tokenizer_config.json or vocab.txt in it)")
    _need("transformers", path)
    from transformers import AutoTokenizer

    code = trust_remote_code(where, path)  # passed explicitly: transformers never asks on stdin
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecipeError(path, f"transformers cannot read the tokenizer in '{where}': "
                                f"{str(exc).strip().splitlines()[0]}") from None


def load_tokenizer(spec: TextSpec, train_texts: list[str]) -> Encoder:
    from tokenizers import Tokenizer

    tok = tokenizer_backend(spec.tokenizer, train_texts)
    if isinstance(tok, Tokenizer):
        return _from_tokenizers(tok, "data.tokenizer")
    if tok.pad_token_id is None:
        raise RecipeError("data.tokenizer", f"the tokenizer in '{Path(spec.tokenizer).expanduser()}' has no padding "
                                            "token (pad_token)")
    return Encoder(tok, int(tok.pad_token_id), len(tok), segments="token_type_ids" in tok.model_input_names)


# -- dataset and batches ----------------------------------------------------------------------------------
class TokenizedText(Dataset):
    """Unpadded token ids and a class id per sample: ``(Inputs of 1-D tensors, label)``."""

    def __init__(self, encodings: list[dict[str, list[int]]], labels: np.ndarray):
        self.encodings, self.labels = encodings, torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        e = self.encodings[i]
        ids = torch.tensor(e["input_ids"], dtype=torch.long)
        x = Inputs(input_ids=ids, attention_mask=torch.ones_like(ids))
        if "token_type_ids" in e:
            x["token_type_ids"] = torch.tensor(e["token_type_ids"], dtype=torch.long)
        return x, self.labels[i]


class PadCollate:
    """Pads a batch's token ids with the tokenizer's pad id (attention mask 0 there), to the batch's longest
    sequence or to ``length``; the rest of each sample (label, index) goes through torch's default_collate.
    A class, not a closure, so the loader's worker processes can pickle it. ``fixed_shape``: every batch
    has one sequence length, so a KD stage may cache teacher hint features (compress.kd.teachers)."""

    def __init__(self, pad_id: int, length: Optional[int] = None):
        self.pad_id, self.length = pad_id, length
        self.fixed_shape = length is not None

    def __call__(self, samples: list[tuple]) -> tuple:
        xs = [s[0] for s in samples]
        width = self.length or max(x["input_ids"].shape[0] for x in xs)
        batch = Inputs()
        for key in xs[0]:
            fill = self.pad_id if key == "input_ids" else 0
            out = torch.full((len(xs), width), fill, dtype=torch.long)
            for row, x in enumerate(xs):
                out[row, :x[key].shape[0]] = x[key]
            batch[key] = out
        return (batch, *default_collate([s[1:] for s in samples]))


@register_dataset("text", config=TextSpec,
                  description="text classification from a .csv or .jsonl (text + label columns), tokenised for transformers")
def text(spec: TextSpec) -> DataBundle:
    rows, lines = read_rows(spec)
    texts = _texts(spec, rows, lines, "text")
    pairs = _texts(spec, rows, lines, "text_pair") if spec.text_pair else None
    labels, classes = _labels(spec, rows, lines)
    train_idx, val_idx, test_idx = split_rows(len(rows), spec)
    if len(train_idx) == 0:
        raise RecipeError("data.path", f"'{spec.path}' has {len(rows)} rows, none left for training after the "
                                       "test and validation splits")
    train_texts = [texts[i] for i in train_idx] + ([pairs[i] for i in train_idx] if pairs else [])
    encoder = load_tokenizer(spec, train_texts)
    full = TokenizedText(encoder.encode(texts, pairs, spec.max_length), labels)
    return DataBundle(Subset(full, train_idx), Subset(full, val_idx), Subset(full, test_idx), task="classification",
                      num_outputs=len(classes), input_shape=(spec.max_length,), batch_size=spec.batch_size,
                      eval_batch_size=spec.eval_batch_size, num_workers=spec.num_workers, classes=classes,
                      collate=PadCollate(encoder.pad_id, spec.max_length if spec.padding == "max_length" else None),
                      vocab_size=encoder.vocab_size)


register_dataset("movielens_titles", config=MovieLensTitlesSpec,
                 description="MovieLens-100K u.item titles labelled by one genre or 'other' (text classification)")(text)


# -- the model must fit the tokenizer -----------------------------------------------------------------
def vocab_mismatch(model: nn.Module, data: DataBundle, path: str) -> Optional[RecipeError]:
    """A model too small for the data's token ids (input embeddings or, for a transformers config,
    position embeddings), as the error naming the recipe key to change; None when it fits.

    Checked before a forward pass: an id beyond the embedding is an IndexError deep inside the model.
    An inline ``hf`` config must state ``vocab_size``: transformers' default (30,522 for BERT) would
    build, but as an embedding table sized for another tokenizer.
    """
    if not data.vocab_size:
        return None
    spec = getattr(model, "compress_spec", None) or {}
    inline = isinstance(spec.get("config"), dict)
    key = f"{path}.config" if inline else path
    if inline and "vocab_size" not in spec["config"]:
        return RecipeError(f"{key}.vocab_size", f"is required with text data: the tokenizer (data.tokenizer) has "
                                                f"{data.vocab_size} tokens; set vocab_size: {data.vocab_size}")
    inner = getattr(model, "model", model)
    emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else \
        next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if isinstance(emb, nn.Embedding) and emb.num_embeddings < data.vocab_size:
        return RecipeError(f"{key}.vocab_size" if inline else key,
                           f"the model embeds {emb.num_embeddings} tokens but the tokenizer (data.tokenizer) has "
                           f"{data.vocab_size}; set vocab_size: {data.vocab_size} or more")
    positions = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
    longest = data.input_shape[0] if data.input_shape else 0
    length = "data.block_size" if data.task == "lm" else "data.max_length"
    if isinstance(positions, int) and positions < longest:
        return RecipeError(f"{key}.max_position_embeddings" if inline else key,
                           f"the model has {positions} positions but {length} is {longest}; "
                           f"set max_position_embeddings: {longest} or lower {length}")
    return None
