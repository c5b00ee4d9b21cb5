"""``compress generate MODEL --prompt ...``: what a (compressed) causal LM says, from a Hugging Face folder, a
compress checkpoint (``.pt``), a packed file (``.cpk``) or an ONNX file with a key-value cache.

Everything is local: the tokenizer comes from ``--tokenizer``, else from the run's recipe (``data.tokenizer``
of the ``recipe.yaml`` a checkpoint's run directory holds), else from the model's own folder; no remote code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from compress.cli_options import allow_import_opt, friendly_errors
from compress.errors import CompressError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _recipe_tokenizer(path: Path) -> Optional[Path]:
    """``data.tokenizer`` of the recipe.yaml of the run a checkpoint was saved in (its stage folder's parent)."""
    from compress import yamlsafe

    for folder in (path.parent, *path.parent.parents[:2]):  # a stage folder's model, or the run folder's
        recipe = folder / "recipe.yaml"
        if recipe.is_file():
            try:
                doc = yamlsafe.loads(recipe.read_text())
            except Exception:
                return None
            tok = ((doc or {}).get("data") or {}).get("tokenizer") if isinstance(doc, dict) else None
            if isinstance(tok, str):
                p = Path(tok).expanduser()
                return p if p.is_absolute() else (folder / p if (folder / p).exists() else p)
            return None
    return None


def find_tokenizer(model_path: Path, given: Optional[Path], spec_folder: Optional[Path] = None) -> Path:
    """The tokenizer folder or tokenizer.json to use, or one line naming where it was looked for."""
    if given is not None:
        if not (given.is_file() or _has_tokenizer(given)):
            raise CompressError(f"--tokenizer: '{given}' is not a tokenizer folder (no tokenizer.json or "
                                "tokenizer_config.json) nor a tokenizer.json file")
        return given
    beside = model_path if model_path.is_dir() else model_path.parent
    run = next((f for f in (beside, *beside.parents[:2]) if (f / "recipe.yaml").is_file()), None)
    # the tokenizer a run trained on its corpus: run/tokenizer.json beside run/recipe.yaml (run/stages/NN_x/model.pt)
    candidates = [_recipe_tokenizer(model_path), spec_folder, beside, run / "tokenizer.json" if run else None]
    for c in candidates:
        if c is not None and (_has_tokenizer(c) or (c.is_file() and c.suffix == ".json")):
            return c
    raise CompressError(f"{model_path}: no tokenizer found (not in the run's recipe data.tokenizer nor beside the "
                        "model); pass --tokenizer FOLDER")


class Tokenizer:
    """encode/decode over a transformers tokenizer folder or a ``tokenizers`` tokenizer.json, loaded locally."""

    def __init__(self, where: Path):
        from compress.safety import trust_remote_code

        self.eos: Optional[int] = None
        try:
            if where.is_file():
                from tokenizers import Tokenizer as Tok

                self.tok: Any = Tok.from_file(str(where))
                self.fast = True
            else:
                from transformers import AutoTokenizer

                code = trust_remote_code(where, "--tokenizer")
                self.tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=code)
                self.fast = False
                self.eos = self.tok.eos_token_id
        except CompressError:
            raise
        except Exception as exc:
            from compress.errors import error_line

            raise CompressError(f"{where}: cannot read the tokenizer: {error_line(exc)}") from None

    def encode(self, text: str) -> list[int]:
        if self.fast:
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.fast else self.tok.decode(ids, skip_special_tokens=True)


def load_lm(path: Path, allow_import: Optional[bool] = None, threads: Optional[int] = None):
    """(StepLM, the HF folder the model came from or None) for a HF folder, a .pt/.cpk or an .onnx file."""
    from compress.runtime.lm_export import OrtLM, TorchLM

    if not path.exists():
        raise CompressError(f"{path}: no such file or folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompressError(f"{path}: not a Hugging Face model folder (no config.json)")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from compress.safety import trust_remote_code

        hf_logging.disable_progress_bar()  # "Loading weights" bars would mix with the generated text
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=trust_remote_code(path, "MODEL"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            from compress.errors import error_line

            raise CompressError(f"{path}: transformers cannot load it as a causal LM: {error_line(exc)}") from None
        return TorchLM(model), path
    if path.suffix == ".onnx":
        return OrtLM(path, threads), None
    from compress.checkpoint import load_model
    from compress.runtime.onnx import OrtModel
    from compress.safety import allowing_imports

    with allowing_imports(allow_import):
        model = load_model(path)
    if isinstance(model, OrtModel):  # a packed ONNX file
        return OrtLM(model.sess), None
    name = str(getattr(model, "compress_spec", {}).get("name", ""))
    folder = Path(name[3:]) if name.startswith("hf:") else None
    return TorchLM(model), folder


@click.command("generate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy (the most likely token each step); above 0: sample.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample from the k most likely tokens only.")
@click.option("--seed", type=int, help="Seed of the sampler (same seed, same text).")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Tokenizer folder or tokenizer.json (default: the run's recipe data.tokenizer, or beside MODEL).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime / PyTorch threads (default: one per core).")
@allow_import_opt
@friendly_errors
def generate(model, prompt, max_new_tokens, temperature, top_k, seed, tokenizer, threads, allow_import):
    """Continue PROMPT with MODEL: a Hugging Face folder, a .pt checkpoint, a .cpk or an .onnx file with a cache."""
    import numpy as np

    from compress.runtime.generate import generate as run

    if threads:
        import torch

        torch.set_num_threads(threads)
    lm, folder = load_lm(model, allow_import, threads)
    tok = Tokenizer(find_tokenizer(model, tokenizer, folder))
    ids = tok.encode(prompt)
    if not ids:
        raise CompressError("--prompt: encodes to no tokens")
    if lm.shape.vocab and max(ids) >= lm.shape.vocab:
        raise CompressError(f"the tokenizer gives token id {max(ids)}, but the model has {lm.shape.vocab} tokens: "
                            "not this model's tokenizer")
    out = run(lm, np.array([ids]), max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, eos=tok.eos)
    new = [int(t) for t in out[0, len(ids):]]
    if tok.eos is not None and tok.eos in new:
        new = new[:new.index(tok.eos)]
    click.echo(prompt + tok.decode(new))


def bench_lm(model: Path, baseline: Optional[Path], json_out: Optional[Path]) -> None:
    """``compress bench LM.onnx [--baseline FP32.onnx]`` without a recipe: generation speed of a file with a cache
    (prefill of a 128-token prompt, cached decode) at batch 1 and 4, one thread and all, interleaved with the
    baseline."""
    from compress.measure.generation import format_generation, measure_generation
    from compress.measure.machine import machine_info
    from compress.runtime.lm_export import is_lm_file

    for p in (model, baseline):
        if p is not None and (p.suffix != ".onnx" or not p.is_file()):
            raise CompressError(f"{p}: without --recipe, bench measures a language model's .onnx file with a cache")
        if p is not None and not is_lm_file(p):
            raise CompressError(f"{p}: no key-value cache (no past_key_values.* inputs); give --recipe to measure it "
                                "on a recipe's data")
    models = {model.name: model, **({f"{baseline.name} (baseline)": baseline} if baseline else {})}
    speeds = measure_generation(models, baseline=f"{baseline.name} (baseline)" if baseline else None,
                                batches=(1, 4), threads=(1, None))
    info = machine_info()
    click.echo(format_generation(speeds))
    click.echo(f"\nprompt 128 tokens; decode: one cached step per row at past length 128; medians of interleaved "
               f"samples; CPU: {info['cpu']} ({', '.join(info['int8_flags'])})")
    if json_out:
        from compress.utils import write_json

        write_json(json_out, {"generation": [s.as_dict() for s in speeds], "machine": info})
