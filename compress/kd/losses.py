"""KD losses: a registry of soft terms, and the formulas that build targets from teachers and mix terms.

Each loss is a small function ``(student_outputs, target, temperature) -> scalar`` registered with
its properties; a recipe names it (``loss: kl`` in a distill stage or a ``kd:`` block). Adding a loss
is one function plus ``@register_kd_loss``. Kept apart from the hook so the formulas can be tested
against hand-computed values.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from compress.registry import Entry, Registry, did_you_mean

KDLossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
KD_LOSSES: Registry[KDLossFn] = Registry("KD loss")


def register_kd_loss(name: str, *, soft_targets: bool, tasks: Optional[Sequence[str]] = ("classification",),
                     needs: str = "class logits", mix: Literal["alpha", "beta"] = "alpha", description: str = ""):
    """Register a KD loss under ``name``.

    soft_targets: the target is the teachers' averaged softened probabilities softmax(t/T) (Hinton 2015
                  averages soft targets, not logits); otherwise their averaged raw outputs.
    tasks:        data tasks the loss applies to (None: any); ``needs`` words that in the error message.
    mix:          ``alpha``: alpha*hard + (1-alpha)*soft; ``beta``: hard + beta*soft (regression KD).
    """
    return KD_LOSSES.register(name, description=description, soft_targets=soft_targets,
                              tasks=None if tasks is None else tuple(tasks), needs=needs, mix=mix)


def kd_loss(name: str, path: str = "") -> Entry[KDLossFn]:
    """The registered loss ``name`` (RecipeError at ``path`` naming the known ones otherwise)."""
    return KD_LOSSES.get(name, path)


def known_loss(name: str, allow_auto: bool = False) -> str:
    """Config validator: ``name`` must be registered (pydantic turns the ValueError into a key-path line)."""
    if (allow_auto and name == "auto") or name in KD_LOSSES:
        return name
    names = (["auto"] if allow_auto else []) + KD_LOSSES.names()
    raise ValueError(f"unknown KD loss '{name}'; expected one of {', '.join(names)}{did_you_mean(name, names)}")


def task_problem(name: str, task: str) -> Optional[str]:
    """Why loss ``name`` cannot train on ``task`` data (None: it can)."""
    tasks = kd_loss(name).extra["tasks"]
    if tasks is None or task in tasks:
        return None
    fits = [e.name for e in KD_LOSSES if e.extra["tasks"] is None or task in e.extra["tasks"]]
    return (f"'{name}' needs {kd_loss(name).extra['needs']} but the data is a {task} task"
            + (f"; use {', '.join(fits[:-1])} or {fits[-1]}" if len(fits) > 1 else f"; use {fits[0]}" if fits else ""))


# -- the losses ----------------------------------------------------------------------------------------
@register_kd_loss("kl", soft_targets=True)
def kl(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(target || softmax(s/T)) (T^2 keeps the soft gradients' scale as T changes)."""
    log_q = F.log_softmax(student / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_q, target, reduction="batchmean")


@register_kd_loss("soft_ce", soft_targets=True)
def soft_ce(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * CE(target, softmax(s/T)): KL plus the teacher's entropy, so the same gradients."""
    log_q = F.log_softmax(student / temperature, dim=1)
    return temperature ** 2 * -(target * log_q).sum(dim=1).mean()


def _mse(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.mse_loss(student, target.view_as(student))


register_kd_loss("mse_logits", soft_targets=False, tasks=None,
                 description="MSE to the averaged teacher logits (Ba & Caruana 2014)")(_mse)
register_kd_loss("regression", soft_targets=False, tasks=("regression",), needs="real-valued targets", mix="beta",
                 description="MSE to the averaged teacher predictions over every entry, observed or not")(_mse)


# -- language models: per-token divergences, a chunk of tokens at a time -------------------------------------
CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB of float32): a 150k vocabulary is ~110 tokens a chunk


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    return F.log_softmax(student.float() / temperature, -1), F.log_softmax(teacher.float() / temperature, -1)


def _forward_kl(student, teacher, temperature):
    log_q, log_p = _log_probs(student, teacher, temperature)
    return (log_p.exp() * (log_p - log_q)).sum()


def _reverse_kl(student, teacher, temperature):
    log_q, log_p = _log_probs(student, teacher, temperature)
    return (log_q.exp() * (log_q - log_p)).sum()


def _jsd(student, teacher, temperature):
    log_q, log_p = _log_probs(student, teacher, temperature)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum() + (log_q.exp() * (log_q - log_m)).sum())


TOKEN_DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def token_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "forward_kl",
                     chunk: Optional[int] = None) -> torch.Tensor:
    """T^2 x the mean over tokens of a divergence between teacher and student next-token distributions
    (``[..., V]`` logits; the teacher's raw logits, not probabilities).

    Computed ``chunk`` tokens at a time (default: ``CHUNK_ELEMENTS // V``), each chunk under activation
    checkpointing: the float32 softmaxes of a 32k-150k vocabulary exist for one chunk only, in the forward
    and again in the backward, instead of for every token of the batch at once (the logits themselves are
    the model's output and are not copied). Chunked and unchunked give the same value and gradients.
    """
    from torch.utils.checkpoint import checkpoint

    fn = TOKEN_DIVERGENCES[kind]
    vocab = student.shape[-1]
    s, t = student.reshape(-1, vocab), teacher.reshape(-1, vocab).detach()
    rows = chunk or max(1, CHUNK_ELEMENTS // vocab)
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], rows):
        a, b = s[i:i + rows], t[i:i + rows]
        total = total + (checkpoint(fn, a, b, temperature, use_reentrant=False) if a.requires_grad
                         else fn(a, b, temperature))
    return temperature ** 2 * total / max(s.shape[0], 1)


for _name, _kind, _what in (("token_kl", "forward_kl", "forward KL(teacher || student) per token (Hinton KD for LMs)"),
                            ("token_reverse_kl", "reverse_kl", "reverse KL(student || teacher) per token (mode-seeking, MiniLLM)"),
                            ("token_jsd", "jsd", "Jensen-Shannon divergence per token (symmetric, bounded)")):
    register_kd_loss(_name, soft_targets=False, tasks=("lm",), needs="next-token logits (lm data)",
                     description=f"{_what}, at a temperature, in chunks of tokens")(
        lambda s, t, temperature, _k=_kind: token_divergence(s, t, temperature, _k))


# -- how the losses are used -----------------------------------------------------------------------------
def teacher_target(outputs: Sequence[torch.Tensor], weights: Sequence[float], temperature: float,
                   kind: str) -> torch.Tensor:
    """What the student is pulled towards: averaged softened probabilities or averaged outputs."""
    if kd_loss(kind).extra["soft_targets"]:
        return sum(w * F.softmax(o.float() / temperature, dim=1) for w, o in zip(weights, outputs))
    return sum(w * o.float() for w, o in zip(weights, outputs))


def kd_term(student: torch.Tensor, target: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """The soft part of the loss, averaged over the batch."""
    return kd_loss(kind).obj(student, target, temperature)


def combine(hard: torch.Tensor, soft: torch.Tensor, kind: str, alpha: float, beta: float) -> torch.Tensor:
    """alpha*hard + (1-alpha)*soft, or hard + beta*soft for losses registered with ``mix='beta'``."""
    if kd_loss(kind).extra["mix"] == "beta":
        return hard + beta * soft
    return alpha * hard + (1 - alpha) * soft


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint: MSE between the (adapted) student feature and the teacher's."""
    return F.mse_loss(student_feat, teacher_feat)
