"""compress.integrations.lightning: KD, pruning and QAT callbacks around a LightningModule's own loop."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("pytorch_lightning" if __import__("importlib").util.find_spec("lightning") is None else "lightning")

from compress import DistillConfig, PruneConfig, QuantizeConfig  # noqa: E402
from compress.integrations import lightning as cl  # noqa: E402
from compress.quant.qat import QuantLayer  # noqa: E402
from compress.runtime.onnx import onnx_run, onnx_session  # noqa: E402

pl = cl._pl


def mlp(hidden, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 3))


class Student(pl.LightningModule):
    def __init__(self, kd=None):
        super().__init__()
        self.model, self.kd, self.losses = mlp(32, 0), kd, []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, i):
        x, y = batch
        out = self(x)
        loss = self.kd.loss(out, x, y) if self.kd is not None else F.cross_entropy(out, y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)


def fit(module, callbacks, epochs=2):
    warnings.simplefilter("ignore")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader())
    return trainer


def test_kd_callback_loss_is_the_distillers_and_hooks_go(tmp_path):
    teacher = mlp(64, 1)
    cfg = DistillConfig(temperature=2, alpha=0.5, hints=[{"student": "model.2", "teacher": 2}])
    kd = cl.DistillationCallback(teacher, cfg, example_inputs=torch.zeros(2, 16))
    student = Student(kd)
    trainer = fit(student, [kd])
    assert len(trainer.optimizers[0].param_groups) == 2  # the hint adapter trains with the student
    assert student.losses[-1] < student.losses[0]
    assert kd.distiller is None and not any(m._forward_hooks for m in student.modules())  # removed at teardown
    assert all(p.requires_grad for p in teacher.parameters())
    x, y = next(iter(loader()))
    from compress.kd import Distiller

    with Distiller(teacher, DistillConfig(temperature=2, alpha=0.5)) as d:
        out = student(x)
        want = 0.5 * F.cross_entropy(out, y) + 0.5 * 4 * F.kl_div(F.log_softmax(out / 2, 1),
                                                                 F.softmax(teacher.eval()(x) / 2, 1), reduction="batchmean")
        assert d.loss(out, x, y).item() == pytest.approx(want.item(), rel=1e-5)


def test_pruning_callback_steps_on_schedule_epochs():
    cb = cl.PruningCallback(PruneConfig(method="channel", sparsity=0.5, steps=2, schedule="linear", round_to=1),
                            torch.zeros(1, 16), epochs_per_step=2, attr="model")
    student = Student()
    fit(student, [cb], epochs=4)
    assert [r["target"] for r in cb.pruner.history] == [0.25, 0.5]  # epochs 0 and 2
    assert student.model[1].out_features == 16 and student.losses[-1] < student.losses[0]


def test_qat_callback_writes_the_int8_file(tmp_path):
    cb = cl.QATCallback(QuantizeConfig(method="qat", bits=8), calibration=loader(), example_inputs=torch.zeros(1, 16),
                        onnx_path=tmp_path / "m.onnx", attr="model")
    student = Student()
    fit(student, [cb])
    assert all(m.packed for m in student.modules() if isinstance(m, QuantLayer))
    x, _ = next(iter(loader()))
    with torch.no_grad():
        want = student.model(x).argmax(1)
    got = torch.as_tensor(onnx_run(onnx_session(tmp_path / "m.onnx"), x)).argmax(1)
    assert (got == want).float().mean() >= 0.9
