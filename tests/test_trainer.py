"""The shared training loop: optimizers, schedules, early stopping, hooks, metrics."""
import json
import math

import pytest
import torch
import torch.nn as nn

from compress.data import create_data
from compress.models import create_model
from compress.trainer import AugmentConfig, Hook, TrainConfig, Trainer, augment_batch, evaluate


@pytest.fixture
def data():
    return create_data({"name": "synthetic", "num_samples": 256, "num_classes": 3, "shape": [1, 6, 6], "batch_size": 32})


def _model(data, hidden=(16,)):
    torch.manual_seed(0)
    return create_model("mlp", data.input_shape, data.num_outputs, hidden=list(hidden))


@pytest.mark.parametrize("opt,sched", [("sgd", "step"), ("adam", "cosine"), ("adamw", "onecycle"), ("adam", "none")])
def test_training_learns(data, opt, sched):
    model = _model(data)
    before = evaluate(model, data, "test")["loss"]
    cfg = TrainConfig(epochs=3, progress=False, optimizer={"name": opt, "lr": 0.01}, scheduler={"name": sched})
    Trainer(model, cfg, data).fit()
    after = evaluate(model, data, "test")
    assert after["loss"] < before and after["accuracy"] > 0.6


def test_hooks_see_every_step_and_can_add_loss(data):
    class Counting(Hook):
        def __init__(self):
            self.steps = self.epochs = 0
            self.extra = nn.Parameter(torch.tensor(3.0))

        def parameters(self):
            return [self.extra]

        def loss(self, trainer, batch, outputs, loss):
            return loss + self.extra ** 2  # pulls the hook's own parameter to 0

        def after_step(self, trainer):
            self.steps += 1

        def on_epoch_end(self, trainer, epoch, metrics):
            self.epochs += 1

    hook = Counting()
    cfg = TrainConfig(epochs=2, progress=False, optimizer={"lr": 0.1})
    trainer = Trainer(_model(data), cfg, data, [hook])
    trainer.fit()
    steps_per_epoch = math.ceil(len(data.dataset("train")) / 32)
    assert hook.steps == trainer.step == 2 * steps_per_epoch
    assert hook.epochs == 2
    assert abs(hook.extra.item()) < 3.0


class Worsen(Hook):
    """After epoch 1, scramble the weights so validation gets worse."""

    def on_epoch_start(self, trainer, epoch):
        if epoch >= 1:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(torch.randn_like(p) * 5)


def test_early_stopping_stops_and_keeps_best(data):
    model = _model(data)
    cfg = TrainConfig(epochs=10, progress=False, early_stopping={"patience": 2}, optimizer={"lr": 0.01})
    trainer = Trainer(model, cfg, data, [Worsen()])
    trainer.fit()
    assert len(trainer.history) < 10
    best = max(r["val_accuracy"] for r in trainer.history)
    assert evaluate(model, data, "val")["accuracy"] == pytest.approx(best)


def test_keep_best_restores_the_hooks_state_of_the_best_epoch_too(data):
    """A hook's own state (FitNets adapters, ...) must match the weights it is kept with."""

    class Counter(Hook):  # its state: how many epochs have ended
        def __init__(self):
            self.n = torch.zeros(())

        def on_epoch_end(self, trainer, epoch, metrics):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}  # a live view, as nn.Module.state_dict() gives

        def load_state_dict(self, state):
            self.n.copy_(state["n"])

    counter = Counter()
    trainer = Trainer(_model(data), TrainConfig(epochs=4, progress=False, optimizer={"lr": 0.01}), data,
                      [Worsen(), counter])
    trainer.fit()
    accs = [r["val_accuracy"] for r in trainer.history]
    best = accs.index(max(accs))
    assert best < len(accs) - 1  # otherwise best and last agree and this test shows nothing
    assert counter.n.item() == best + 1


def test_keep_last_keeps_last(data):
    model = _model(data)
    Trainer(model, TrainConfig(epochs=2, keep="last", progress=False), data).fit()
    last = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())


def test_grad_clip_bounds_the_update(data):
    model = _model(data)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(epochs=1, progress=False, grad_clip=1e-6, optimizer={"name": "sgd", "lr": 1.0, "momentum": 0})
    Trainer(model, cfg, data).fit()
    moved = sum((p.detach() - s).norm() ** 2 for p, s in zip(model.parameters(), start)) ** 0.5
    assert moved < 1e-6 * 10  # at most (steps x clip x lr)


def test_regression_metrics_ignore_missing_targets():
    from compress.metrics import MetricAccumulator, masked_mse

    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, float("nan")], [5.0, 4.0]])
    assert masked_mse(pred, target).item() == pytest.approx(4 / 3)
    acc = MetricAccumulator("regression")
    acc.update(pred, target)
    m = acc.compute()
    assert m["rmse"] == pytest.approx((4 / 3) ** 0.5) and m["mae"] == pytest.approx(2 / 3)


def test_top5_and_accuracy():
    from compress.metrics import MetricAccumulator

    out = torch.eye(6)[[0, 1, 2, 3]] + torch.arange(6).flip(0) * 0.01
    acc = MetricAccumulator("classification")
    acc.update(out, torch.tensor([0, 1, 5, 4]))
    m = acc.compute()
    assert m["accuracy"] == 0.5 and m["top5"] == 0.75


def test_random_shift_moves_pixels_but_keeps_shape():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1
    y = augment_batch(x, AugmentConfig(random_shift=2))
    assert y.shape == x.shape
    pos = y.flatten(1).argmax(1)
    assert len(set(pos.tolist())) > 1 and (y.sum(dim=(1, 2, 3)) == 1).all()
    assert torch.equal(augment_batch(x, AugmentConfig()), x)


def test_regression_training(tmp_path):
    data = create_data({"name": "synthetic", "task": "regression", "num_classes": 2, "num_samples": 256, "shape": [4]})
    model = create_model("mlp", data.input_shape, data.num_outputs, hidden=[16])
    before = evaluate(model, data, "test")["rmse"]
    Trainer(model, TrainConfig(epochs=15, progress=False, optimizer={"lr": 0.01}), data).fit()
    assert evaluate(model, data, "test")["rmse"] < 0.5 * before


def test_lbfgs_full_batch_and_model_provided_hooks(data):
    class Penalized(nn.Module):
        """A model that brings its own loss term, as KernelNet does."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
            self.calls = 0

        def forward(self, x):
            return self.net(x)

        def training_hooks(self):
            model = self

            class Count(Hook):
                def loss(self, trainer, batch, outputs, loss):
                    model.calls += 1
                    return loss + 1e-4 * model.net[1].weight.pow(2).sum()

            return [Count()]

    torch.manual_seed(0)
    model = Penalized()
    cfg = TrainConfig(epochs=2, progress=False, optimizer={"name": "lbfgs", "lr": 1, "max_iter": 5})
    trainer = Trainer(model, cfg, data)
    trainer.fit()
    assert trainer.step == 2  # one full-batch step per epoch
    assert model.calls > 2  # L-BFGS evaluated the closure (with the model's hook) several times per step
    assert evaluate(model, data, "test")["accuracy"] > 0.8


class _NanFrom(Hook):
    """Makes the loss NaN from a given epoch on (a run that diverges)."""

    def __init__(self, epoch: int):
        self.from_epoch, self.epoch = epoch, 0

    def on_epoch_start(self, trainer, epoch):
        self.epoch = epoch

    def loss(self, trainer, batch, outputs, loss):
        return loss * float("nan") if self.epoch >= self.from_epoch else loss


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_epoch(data, tmp_path):
    from compress.errors import CompressError

    state, log = tmp_path / "trainer_state.pt", tmp_path / "metrics.jsonl"
    cfg = TrainConfig(epochs=3, progress=False)
    trainer = Trainer(_model(data), cfg, data, [_NanFrom(1)], state_path=state, log_path=log, where="stages[1].train")
    with pytest.raises(CompressError) as exc:
        trainer.fit()
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("stages[1].train: training diverged in epoch 2/3") and "learning rate" in msg
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]  # no row for the bad epoch
    # Resuming picks up the good epoch (and, with the cause fixed, finishes).
    resumed = Trainer(_model(data), cfg, data, state_path=state)
    resumed.fit()
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04truncated"])
def test_unreadable_trainer_state_is_one_line(data, tmp_path, content):
    from compress.errors import CompressError

    state = tmp_path / "trainer_state.pt"
    state.write_bytes(content)
    with pytest.raises(CompressError, match=r"^train: cannot resume from .*trainer_state.pt \(.*\); delete that file"):
        Trainer(_model(data), TrainConfig(epochs=1, progress=False), data, state_path=state).fit()
    assert state.read_bytes() == content  # nothing deleted behind the user's back


def test_device_must_exist_on_this_machine(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    for bad, why in (("cuda:2", "this machine has 2 CUDA GPU"), ("banana", "expected 'auto', 'cpu'"), ("xla", "expected")):
        with pytest.raises(ValidationError, match=why):
            TrainConfig(device=bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValidationError, match="this machine has none"):
        TrainConfig(device="cuda")


def test_bf16_autocast_trains_in_fp32_weights_and_fp16_needs_cuda(data):
    from compress.errors import CompressError

    m = _model(data)
    row = Trainer(m, TrainConfig(epochs=2, precision="bf16", progress=False), data).fit()
    assert math.isfinite(row["train_loss"]) and row["val_accuracy"] > 0.3
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(CompressError, match="fp16 needs a CUDA device"):
        Trainer(_model(data), TrainConfig(epochs=1, precision="fp16", progress=False, device="cpu"), data).fit()


def test_channels_last_is_undone_after_fit(data):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    Trainer(m, TrainConfig(epochs=1, channels_last=True, progress=False), data).fit()
    assert m[0].weight.is_contiguous()


def test_a_head_that_does_not_exist_names_the_stage_key():
    from compress.errors import RecipeError

    data = create_data({"name": "synthetic", "num_samples": 16, "num_classes": 3, "shape": [4]})
    model = create_model("mlp", data.input_shape, 3, hidden=[4])
    cfg = TrainConfig(epochs=1, freeze_backbone_epochs=1, head="fc", progress=False)
    with pytest.raises(RecipeError, match=r"^stages\[0\]\.train\.head: no module 'fc' in the model"):
        Trainer(model, cfg, data, where="stages[0].train").fit()
