"""KD losses: hand-computed formulas, the registry, and a newly registered loss used from a recipe."""
import math

import pytest
import torch

from compress import create_data
from compress.errors import RecipeError, RecipeErrors
from compress.kd.losses import KD_LOSSES, combine, kd_term, known_loss, register_kd_loss, task_problem, teacher_target
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_kl_term_matches_hand_computation_with_t_squared():
    s, t, T = [1.0, 2.0, 0.5], [3.0, 1.0, 0.0], 2.0
    p, q = softmax([v / T for v in t]), softmax([v / T for v in s])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    target = teacher_target([torch.tensor([t])], [1.0], T, "kl")
    got = kd_term(torch.tensor([s]), target, T, "kl")
    assert got.item() == pytest.approx(T * T * kl, rel=1e-5)
    # soft cross-entropy differs from KL by the teacher's entropy (times T^2), not by its gradients
    h = -sum(pi * math.log(pi) for pi in p)
    assert kd_term(torch.tensor([s]), target, T, "soft_ce").item() == pytest.approx(T * T * (kl + h), rel=1e-5)


def test_kd_terms_average_over_the_batch_and_mix_with_alpha():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    target = teacher_target([t], [1.0], 3.0, "kl")
    rows = [kd_term(s[i:i + 1], target[i:i + 1], 3.0, "kl") for i in range(2)]
    assert kd_term(s, target, 3.0, "kl").item() == pytest.approx((rows[0] + rows[1]).item() / 2, rel=1e-6)
    assert kd_term(s, t, 3.0, "mse_logits").item() == pytest.approx(((s - t) ** 2).mean().item())
    hard, soft = torch.tensor(2.0), torch.tensor(10.0)
    assert combine(hard, soft, "kl", 0.25, 99.0).item() == pytest.approx(0.25 * 2 + 0.75 * 10)
    assert combine(hard, soft, "regression", 0.25, 0.5).item() == pytest.approx(2 + 0.5 * 10)


def test_ensemble_averages_soft_targets_with_weights():
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0]])
    target = teacher_target([a, b], [0.75, 0.25], 2.0, "kl")
    want = 0.75 * torch.tensor(softmax([1.0, 0, 0])) + 0.25 * torch.tensor(softmax([0, 0, 2.0]))
    assert torch.allclose(target[0], want, atol=1e-6)
    assert teacher_target([a, b], [0.5, 0.5], 2.0, "mse_logits").tolist() == [[1.0, 0.0, 2.0]]


def test_mix_follows_the_registered_losses_properties():
    hard, soft = torch.tensor(2.0), torch.tensor(10.0)
    assert combine(hard, soft, "mse_logits", 0.25, 99.0).item() == pytest.approx(0.25 * 2 + 0.75 * 10)
    assert combine(hard, soft, "soft_ce", 1.0, 99.0).item() == pytest.approx(2.0)


# -- the registry ----------------------------------------------------------------------------------
def test_registered_losses_and_what_they_fit():
    assert KD_LOSSES.names() == ["kl", "mse_logits", "regression", "soft_ce", "token_jsd", "token_kl", "token_reverse_kl"]
    assert task_problem("mse_logits", "regression") is None and task_problem("kl", "classification") is None
    assert task_problem("kl", "regression") == ("'kl' needs class logits but the data is a regression task; "
                                                "use mse_logits or regression")
    with pytest.raises(ValueError, match=r"^unknown KD loss 'kld'; expected one of kl, mse_logits, regression, "
                                         r"soft_ce, token_jsd, token_kl, token_reverse_kl; did you mean 'kl'\?$"):
        known_loss("kld")
    assert known_loss("auto", allow_auto=True) == "auto"
    with pytest.raises(ValueError, match="unknown KD loss 'auto'"):
        known_loss("auto")  # the distill stage names its loss
    with pytest.raises(ValueError, match="registered twice"):
        register_kd_loss("kl", soft_targets=True)(lambda s, t, T: s.sum())


@pytest.fixture
def own_registry(monkeypatch):
    """Losses a test registers go away after it."""
    monkeypatch.setattr(KD_LOSSES, "_entries", dict(KD_LOSSES._entries))


def kd_recipe(tiny_recipe, loss: str) -> dict:
    quiet = {"epochs": 1, "progress": False}
    return {**tiny_recipe, "teacher": {"name": "mlp", "hidden": [24]}, "stages": [
        {"train": {"target": "teacher", **quiet}},
        {"distill": {"loss": loss, **quiet}},
        {"prune": {"sparsity": 0.5, "finetune": quiet, "kd": {"loss": loss, "teacher": "recipe"}}},
    ]}


def test_a_newly_registered_loss_is_usable_from_a_recipe(tmp_path, tiny_recipe, own_registry):
    with pytest.raises((RecipeError, RecipeErrors), match=r"stages\[1\]\.distill\.loss: unknown KD loss 'l1_logits'"):
        parse_recipe(kd_recipe(tiny_recipe, "l1_logits"))
    calls = []

    @register_kd_loss("l1_logits", soft_targets=False, tasks=None)
    def l1_logits(student, target, temperature):
        """L1 distance to the averaged teacher logits."""
        calls.append(student.shape[0])
        return (student - target).abs().mean()

    report = Pipeline.from_dict(kd_recipe(tiny_recipe, "l1_logits")).run(tmp_path / "run")
    assert report["stages"][1]["kd_loss"] == "l1_logits"
    n_train = len(create_data(tiny_recipe["data"]).train)
    assert sum(calls) == 2 * n_train  # one epoch of the distill stage, one of prune's KD fine-tune
