import math

import pytest
import torch

from compress.pruning.gate import Scores, decide, mcnemar_p


def _pair(n: int, ref_wrong: int, newly_wrong: int, newly_right: int) -> tuple[Scores, Scores]:
    """Reference and step hits on the same ``n`` samples, with the given disagreements."""
    ref = torch.ones(n, dtype=torch.bool)
    ref[:ref_wrong] = False
    step = ref.clone()
    step[:newly_right] = True  # samples the reference got wrong
    step[ref_wrong:ref_wrong + newly_wrong] = False  # samples it got right
    return Scores(ref.float().mean().item(), ref), Scores(step.float().mean().item(), step)


def test_mcnemar_is_the_one_sided_binomial_tail_of_the_disagreements():
    assert mcnemar_p(10, 4) == pytest.approx((1001 + 364 + 91 + 14 + 1) / 2 ** 14)  # P(X >= 10), X ~ B(14, 1/2)
    assert mcnemar_p(6, 0) == pytest.approx(1 / 64)
    assert mcnemar_p(0, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) > 0.5  # as many newly right as newly wrong: no evidence at all
    assert 0 < mcnemar_p(700, 560) < 1e-4 and math.isfinite(mcnemar_p(700, 560))  # large counts stay exact


def test_a_drop_within_noise_is_kept_and_one_beyond_it_is_undone():
    # 800 validation samples, max_drop 0.005 (4 samples): the deep-compression gate
    ref, step = _pair(800, ref_wrong=5, newly_wrong=10, newly_right=4)  # 6 samples net: 0.0075 > max_drop
    d = decide(ref, step, max_drop=0.005)
    assert d.drop == pytest.approx(6 / 800) and (d.n, d.worse, d.better) == (800, 10, 4)
    assert d.p_value == pytest.approx(0.0898, abs=1e-4) and not d.undo  # 10 of 14 disagreements: a coin does that
    assert "p=0.0898" in d.why() and ">= 0.05" in d.why()

    ref, step = _pair(800, ref_wrong=5, newly_wrong=14, newly_right=0)
    d = decide(ref, step, max_drop=0.005)
    assert d.p_value == pytest.approx(2 ** -14) and d.undo
    assert "14 newly wrong vs 0 newly right" in d.why()


def test_a_significant_drop_within_max_drop_is_kept():
    ref, step = _pair(10000, ref_wrong=50, newly_wrong=30, newly_right=0)  # p ~ 1e-9 but only 0.3 points
    d = decide(ref, step, max_drop=0.005)
    assert d.p_value < 1e-6 and not d.undo
    assert not decide(ref, step, max_drop=None).undo  # no max_drop: never undone


def test_regression_falls_back_to_max_drop_alone():
    ref, worse = Scores(0.90), Scores(0.95)  # RMSE: lower is better, a rise of 0.05
    d = decide(ref, worse, max_drop=0.01, higher_is_better=False)
    assert d.drop == pytest.approx(0.05) and d.undo and d.p_value is None and d.n == 0
    assert not decide(ref, Scores(0.905), max_drop=0.01, higher_is_better=False).undo


def test_perplexity_rises_are_relative_and_gated_by_max_drop_alone():
    d = decide(Scores(80.0), Scores(86.0), max_drop=0.05, higher_is_better=False, relative=True)
    assert d.drop == pytest.approx(0.075) and d.undo and d.p_value is None
    assert "rose 7.50% (max_drop 0.05: relative)" in d.why()
    small = decide(Scores(8.0), Scores(8.3), max_drop=0.05, higher_is_better=False, relative=True)  # 3.75%
    assert not small.undo and small.drop == pytest.approx(0.0375)
