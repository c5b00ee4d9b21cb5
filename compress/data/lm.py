"""Language-model data: documents (text files from a glob, or one field of a .jsonl) tokenised, split into
train / val / test BY DOCUMENT (one file is one document) with a seed, each split packed into
non-overlapping blocks of ``block_size`` tokens.

A sample is ``(Inputs({'input_ids': [T]}), targets [T])`` where the targets are the next tokens: block ``i``
of a split's token stream ``s`` reads ``s[iT:(i+1)T]`` and predicts ``s[iT+1:(i+1)T+1]``. Every token of
the stream but the first is predicted exactly once; the last block is padded and its padding targets are
``IGNORE`` (-100, what ``F.cross_entropy`` skips), so perplexity covers every token of the split.
Documents are concatenated in split order, each between the tokenizer's begin/end tokens where it has
them, so a block may cross a document boundary (as GPT-2-style packing does).

``root: stdlib`` reads the running interpreter's standard library (``sysconfig.get_paths()['stdlib']``):
real text that every machine with Python has; the Python version is part of the data's description.
"""
from __future__ import annotations

import os
import platform
import re
import stat
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import Dataset

from compress.data.bundle import DataBundle, DataSpec, read_utf8, register_dataset, split_rows
from compress.data.inputs import Inputs
from compress.data.text import Tokenizer, TrainTokenizer, jsonl_rows, tokenizer_backend
from compress.errors import RecipeError

IGNORE = -100  # target of a padding position (F.cross_entropy's ignore_index)
STDLIB = "stdlib"
# Not the standard library's own text: installed packages, generated caches, and the (huge, repetitive) tests.
STDLIB_EXCLUDE = ["site-packages/**", "dist-packages/**", "**/__pycache__/**", "**/test/**", "**/tests/**", "idlelib/**"]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class LMSpec(DataSpec):
    """Text files (``files``: a glob, relative to ``root``) or a .jsonl's ``field``, for causal LMs."""

    root: Optional[str] = None  # a folder the glob is relative to, or 'stdlib' (this interpreter's standard library)
    files: Optional[str] = None  # e.g. '**/*.py' ('**' reaches into subfolders)
    exclude: Optional[list[str]] = None  # globs (relative to root) left out; default for root: stdlib in STDLIB_EXCLUDE
    path: Optional[Path] = None  # a .jsonl file: one document per line
    field: str = "text"  # the .jsonl field holding a document's text
    max_files: Optional[int] = Field(None, ge=3)  # a seeded sample of this many documents (smaller runs)
    block_size: int = Field(128, ge=2, le=1 << 16)
    tokenizer: Tokenizer = Field(default_factory=lambda: TrainTokenizer(lowercase=False))
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(16, ge=1)  # logits are [batch, block, vocab]: 512 blocks would be gigabytes

    @model_validator(mode="after")
    def _one_source(self) -> "LMSpec":
        if (self.files is None) == (self.path is None):
            raise ValueError("give either files: (a glob of text files) or path: (a .jsonl file)")
        if self.path is not None:
            if self.path.suffix.lower() not in (".jsonl", ".ndjson"):
                raise ValueError(f"path: expected a .jsonl file, got '{self.path}'")
            if not self.path.is_file():
                raise ValueError(f"path: expected an existing file, got '{self.path}' (no such file)")
        return self

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _code_defaults(cls, v: Any) -> Any:
        if isinstance(v, dict) and "lowercase" not in v:  # source code and prose keep their case
            return {**v, "lowercase": False}
        return v

    def folder(self) -> Path:
        if self.root == STDLIB:
            return stdlib_root()
        return Path(self.root).expanduser() if self.root else Path.cwd()

    def describe(self) -> str:
        if self.root == STDLIB:
            return f"Python {platform.python_version()} standard library ({stdlib_root()})"
        return str(self.path) if self.path is not None else str(self.folder() / self.files)


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """A glob as a regex on '/'-separated relative paths: ``**/`` any folders (or none), ``*`` and ``?`` within
    one name. Hand-written: ``glob.translate`` is Python 3.13+, and walking once with excluded folders
    pruned is what keeps ``root: stdlib`` fast (its site-packages may hold tens of thousands of files)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            c = pattern[i]
            out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
            i += 1
    return re.compile("".join(out))


MAX_DOCUMENT_BYTES = 256 << 20  # one text file of a corpus; the whole stdlib is ~40 MiB


def _walk(root: Path, files: str, exclude: list[str]) -> list[str]:
    """Relative paths under ``root`` matching ``files`` and no ``exclude`` glob, sorted; folders an exclude
    glob ending in '/**' names are not entered."""
    want, skip = glob_regex(files), [glob_regex(p) for p in exclude]
    skip_dirs = [glob_regex(p[:-3]) for p in exclude if p.endswith("/**")]
    found = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = sorted(d for d in dirs if not any(r.fullmatch(rel + d) for r in skip_dirs))
        found += [rel + n for n in names if want.fullmatch(rel + n) and not any(r.fullmatch(rel + n) for r in skip)]
    return sorted(found)


def _documents(spec: LMSpec) -> tuple[list[str], list[str]]:
    """(names, texts) of every non-empty document, in a sorted (machine-independent) order."""
    if spec.path is not None:
        names, texts = [], []
        for lineno, row in jsonl_rows(spec.path, read_utf8(spec.path)):
            value = row.get(spec.field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise RecipeError("data.field", f"'{spec.path}', line {lineno}: expected text in field '{spec.field}', "
                                                f"got {type(value).__name__}")
            if value.strip():
                names.append(f"line {lineno}")
                texts.append(value)
        return names, texts
    root = spec.folder()
    if not root.is_dir():
        raise RecipeError("data.root", f"expected a folder, got '{root}' (no such folder)")
    exclude = spec.exclude if spec.exclude is not None else (STDLIB_EXCLUDE if spec.root == STDLIB else [])
    found = _walk(root, spec.files, exclude)
    names, texts = [], []
    inside = root.resolve()
    for p in found:
        path = root / p
        try:
            # Files from strangers: a link out of the folder (a secret, /dev/zero) or a FIFO is not read.
            if not path.resolve().is_relative_to(inside) or not stat.S_ISREG(path.stat().st_mode):
                continue
            if path.stat().st_size > MAX_DOCUMENT_BYTES:
                raise RecipeError("data.root", f"'{path}' is {path.stat().st_size:,} bytes; documents over "
                                               f"{MAX_DOCUMENT_BYTES >> 20} MiB are refused (split the file)")
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a stray binary or latin-1 file in a corpus folder is not text to learn
        if text.strip():
            names.append(p)
            texts.append(text)
    return names, texts


class TokenBlocks(Dataset):
    """Non-overlapping blocks of one token stream: ``(Inputs(input_ids=[T]), next-token targets [T])``."""

    def __init__(self, stream: torch.Tensor, block_size: int, pad_id: int = 0):
        self.block_size, self.pad_id = block_size, pad_id
        n = max(len(stream) - 1, 0)  # predicted tokens: all but the first
        self.blocks = -(-n // block_size)
        padded = torch.full((self.blocks * block_size + 1,), IGNORE, dtype=torch.long)
        padded[:len(stream)] = stream
        self.stream = padded

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, i: int):
        s = self.stream[i * self.block_size:(i + 1) * self.block_size + 1]
        ids = s[:-1].clone()
        ids[ids == IGNORE] = self.pad_id  # after the last real token: never seen by a predicted position
        return Inputs(input_ids=ids), s[1:].clone()

    @property
    def tokens(self) -> int:
        """Predicted tokens (padding excluded)."""
        return int((self.stream[1:] != IGNORE).sum())


def _encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids per document, special tokens as the tokenizer adds them (begin/end of document), untruncated."""
    from tokenizers import Tokenizer as HFTokenizers

    if isinstance(tok, HFTokenizers):
        tok.no_truncation()
        tok.no_padding()
        return [e.ids for e in tok.encode_batch(texts)]
    with warnings.catch_warnings():  # "longer than the model's maximum length": packing splits documents anyway
        warnings.simplefilter("ignore")
        out = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
    eos = tok.eos_token_id
    return [ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids for ids in out]


def vocab_size_of(tok) -> int:
    from tokenizers import Tokenizer as HFTokenizers

    return tok.get_vocab_size(with_added_tokens=True) if isinstance(tok, HFTokenizers) else len(tok)


@register_dataset("lm", config=LMSpec,
                  description="language modelling: text files (a glob, root: stdlib) or a .jsonl field, split by file, "
                              "packed into token blocks")
def lm(spec: LMSpec) -> DataBundle:
    names, texts = _documents(spec)
    where = spec.describe()
    if spec.max_files is not None and len(texts) > spec.max_files:
        import numpy as np

        keep = sorted(np.random.default_rng(spec.split_seed).permutation(len(texts))[:spec.max_files].tolist())
        names, texts = [names[i] for i in keep], [texts[i] for i in keep]
    if len(texts) < 3:
        raise RecipeError("data.files" if spec.files else "data.path",
                          f"{where}: found {len(texts)} document(s); train, val and test need at least 3 "
                          "(documents are split by file)")
    train_idx, val_idx, test_idx = split_rows(len(texts), spec)
    if len(train_idx) == 0:
        raise RecipeError("data.test_fraction", f"{where}: {len(texts)} documents, none left for training")
    tok = tokenizer_backend(spec.tokenizer, [texts[i] for i in train_idx])  # the vocabulary sees training text only
    vocab = vocab_size_of(tok)
    encoded = _encode(tok, texts)
    pad = getattr(tok, "pad_token_id", None) or 0

    def blocks(idx) -> TokenBlocks:
        ids = [t for i in sorted(idx) for t in encoded[i]]
        return TokenBlocks(torch.tensor(ids, dtype=torch.long), spec.block_size, pad)

    train, val, test = blocks(train_idx), blocks(val_idx), blocks(test_idx)
    if len(train) == 0:
        raise RecipeError("data.block_size", f"{where}: the training split has no block of {spec.block_size} tokens")
    bundle = DataBundle(train, val if len(val) else None, test if len(test) else None, task="lm", num_outputs=vocab,
                        input_shape=(spec.block_size,), batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size,
                        num_workers=spec.num_workers, vocab_size=vocab)
    bundle.description = {"corpus": where, "python": platform.python_version(), "documents": len(texts),
                          "split_documents": [len(train_idx), len(val_idx), len(test_idx)],
                          "split_tokens": [train.tokens, val.tokens, test.tokens], "block_size": spec.block_size,
                          "vocab_size": vocab}
    bundle.tokenizer = tok
    return bundle
