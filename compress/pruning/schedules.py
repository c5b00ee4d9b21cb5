"""Sparsity targets per pruning step."""
from __future__ import annotations


def agp(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - t/n)^3 for t = 1..n (prunes fast, then gently)."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def linear(final: float, steps: int, initial: float = 0.0) -> list[float]:
    return [initial + (final - initial) * t / steps for t in range(1, steps + 1)]


SCHEDULES = {"agp": agp, "linear": linear}


def targets(kind: str, final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Target sparsity after each of ``steps`` pruning steps; the last one is ``final``."""
    return SCHEDULES[kind](final, steps, initial)


def tp_scheduler(kind: str, initial: float = 0.0):
    """The same schedule as torch-pruning's ``iterative_pruning_ratio_scheduler`` (a list with step 0 first)."""
    return lambda ratio, steps: [initial if initial else 0.0] + targets(kind, ratio, steps, initial)
