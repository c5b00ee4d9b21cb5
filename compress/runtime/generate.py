"""Token generation and perplexity over ``StepLM`` (``compress.runtime.lm_export``): the same loop runs a
PyTorch model and its ONNX file, so their tokens and perplexities compare one to one."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from compress.errors import RecipeError
from compress.runtime.lm_export import StepLM, step_lm


def prefill_inputs(ids: np.ndarray, past: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, attention mask over past + new tokens, positions past..past+S-1) for a batch of equal-length rows."""
    b, s = ids.shape
    return ids, np.ones((b, past + s), np.int64), np.broadcast_to(np.arange(past, past + s), (b, s)).copy()


def next_token(logits: np.ndarray, temperature: float = 0.0, top_k: Optional[int] = None,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """[B, V] last-position logits -> [B] tokens: argmax at temperature 0, else a sample (top-k first)."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, -1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rng = rng or np.random.default_rng()
    return np.array([rng.choice(len(row), p=row) for row in p])


def generate(lm, ids: np.ndarray, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: Optional[int] = None,
             seed: Optional[int] = None, eos: Optional[int] = None, logits_out: Optional[list] = None) -> np.ndarray:
    """``ids`` [B, S] followed by up to ``max_new_tokens`` tokens (greedy by default), one cached step per token.

    Stops early when every row has produced ``eos``; ``logits_out`` collects each step's last logits."""
    lm: StepLM = step_lm(lm)
    ids = np.asarray(ids, np.int64)
    rng = np.random.default_rng(seed)
    b, s = ids.shape
    x, mask, pos = prefill_inputs(ids)
    cache = lm.empty_cache(b)
    out, done = [ids], np.zeros(b, bool)
    for t in range(max_new_tokens):
        logits, cache = lm.step(x, mask, pos, cache)
        last = logits[:, -1]
        if logits_out is not None:
            logits_out.append(last)
        tok = next_token(last, temperature, top_k, rng)
        if eos is not None:
            tok = np.where(done, eos, tok)
            done |= tok == eos
        out.append(tok[:, None])
        if eos is not None and done.all():
            break
        x = tok[:, None].astype(np.int64)
        mask = np.ones((b, s + t + 1), np.int64)
        pos = np.full((b, 1), s + t, np.int64)
    return np.concatenate(out, 1)


def token_nll(lm, blocks: np.ndarray, batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token NLL, tokens predicted) over ``blocks`` [N, T]: each block is one prefill, its first
    token is context only, so T-1 predictions per block (non-overlapping blocks, as the perplexity metric);
    negative ids are padding, neither fed nor predicted."""
    lm = step_lm(lm)
    blocks = np.asarray(blocks, np.int64)
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        logits, _ = lm.step(*prefill_inputs(np.maximum(x, 0)), lm.empty_cache(len(x)))
        z = logits[:, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        y = x[:, 1:]
        keep = y >= 0  # negative ids: padding after a stream's last token (the lm dataset's ignore index)
        total -= float((np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0] * keep).sum())
        count += int(keep.sum())
    return total, count


def perplexity(lm, blocks: np.ndarray, batch_size: int = 8) -> float:
    """exp(mean token NLL) over non-overlapping ``blocks`` [N, T] of a PyTorch LM or an ONNX file."""
    total, count = token_nll(lm, blocks, batch_size)
    return math.exp(total / max(count, 1))


def lm_blocks(data, split: str, n: int, path: str = "quantize") -> np.ndarray:
    """Up to ``n`` token blocks [n, T] of ``split``: from a mapping of split -> array, or a data bundle whose
    loader yields token batches (a tensor, or a dict with ``input_ids``, and next-token targets)."""
    if isinstance(data, dict):
        if split not in data:
            raise RecipeError(path, f"the data has no {split!r} token blocks (has {', '.join(data)})")
        return np.asarray(data[split], np.int64)[:n]
    if data is None or not hasattr(data, "loader"):
        raise RecipeError(path, "needs language-model data (token blocks) for its perplexity check")
    out: list[np.ndarray] = []
    for raw in data.loader(split, shuffle=False):
        x = raw[0] if isinstance(raw, (tuple, list)) else raw
        x = np.asarray(x["input_ids"] if isinstance(x, dict) else x, np.int64)
        y = np.asarray(raw[1], np.int64) if isinstance(raw, (tuple, list)) and len(raw) > 1 else None
        if y is not None and y.shape == x.shape:  # next-token targets (the lm dataset): the first input, then every
            x = np.concatenate([x[:, :1], y], 1)  # target (ignored ones stay negative), as the metric counts them
        out += list(x)
        if len(out) >= n:
            break
    if not out:
        raise RecipeError(path, f"no token blocks in the {split!r} split")
    return np.stack(out[:n])


def onnx_perplexity(session_or_path, blocks: np.ndarray, batch_size: int = 8, threads: Optional[int] = None) -> float:
    """Perplexity of an ONNX file with a cache (its prefill path) on token ``blocks`` [N, T]."""
    from compress.runtime.lm_export import OrtLM

    return perplexity(OrtLM(session_or_path, threads), blocks, batch_size)


__all__ = ["generate", "lm_blocks", "next_token", "onnx_perplexity", "perplexity", "prefill_inputs", "token_nll"]
