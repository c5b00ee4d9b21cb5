import pytest

from compress.pruning.schedules import agp, linear, targets, tp_scheduler


def test_agp_matches_zhu_gupta_formula():
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3
    assert agp(0.9, 3) == pytest.approx([0.9 * (1 - (2 / 3) ** 3), 0.9 * (1 - (1 / 3) ** 3), 0.9])
    assert agp(0.95, 4, initial=0.5) == pytest.approx([0.95 - 0.45 * 0.75 ** 3, 0.95 - 0.45 * 0.5 ** 3,
                                                        0.95 - 0.45 * 0.25 ** 3, 0.95])


def test_agp_prunes_faster_early_than_linear():
    a, l = agp(0.8, 4), linear(0.8, 4)
    assert a[0] > l[0] and a[-1] == l[-1] == pytest.approx(0.8)
    assert all(x < y for x, y in zip(a, a[1:]))


def test_linear_and_torch_pruning_form():
    assert targets("linear", 0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    assert tp_scheduler("linear")(0.6, 3) == pytest.approx([0.0, 0.2, 0.4, 0.6])  # step 0 first, as torch-pruning wants
