"""compress.integrations.transformers: KD, pruning and QAT inside the Hugging Face Trainer's own loop."""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from compress import DistillConfig, PruneConfig, QuantizeConfig  # noqa: E402
from compress.integrations.transformers import DistillationTrainer, PruningCallback, QATCallback  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=32, num_labels=3)


def bert(seed, **kw):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**BERT, **kw}))


def rows(n=32, seq=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 100, (seq,), generator=g), "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": i % 3} for i in range(n)]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "hf"), num_train_epochs=1, per_device_train_batch_size=8, report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    return transformers.TrainingArguments(**{**base, **kw})


def batch(n=8):
    b = transformers.default_data_collator(rows()[:n])
    return b, {k: v[:1] for k, v in b.items() if k != "labels"}


def test_distillation_trainer_loss_is_the_stage_formula(tmp_path):
    student, teacher = bert(0), bert(1, intermediate_size=128)
    cfg = DistillConfig(temperature=4, alpha=0.3)
    trainer = DistillationTrainer(model=student, teacher=teacher, distill_config=cfg, args=args(tmp_path))
    b, _ = batch()
    student.train()
    torch.manual_seed(0)
    got = trainer.compute_loss(student, b)
    torch.manual_seed(0)
    out = student(**b)
    with torch.no_grad():
        t = teacher.eval()(**{k: v for k, v in b.items() if k != "labels"}).logits
    soft = 16 * F.kl_div(F.log_softmax(out.logits / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
    assert got.item() == pytest.approx((0.3 * F.cross_entropy(out.logits, b["labels"]) + 0.7 * soft).item(), rel=1e-5)
    student.eval()
    assert trainer.compute_loss(student, b).item() == pytest.approx(student(**b).loss.item(), rel=1e-6)  # eval: hard


def test_distillation_trains_with_bf16_and_accumulation_and_reloads(tmp_path):
    student, teacher = bert(0), bert(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher=teacher, distill_config=DistillConfig(temperature=2),
                                  args=args(tmp_path, bf16=True, gradient_accumulation_steps=2), train_dataset=rows())
    result = trainer.train()
    assert np.isfinite(result.training_loss) and result.global_step == 2  # 32 rows / (8 x 2)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the teacher is frozen
    trainer.save_model(str(tmp_path / "saved"))
    again = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"), local_files_only=True)
    b, _ = batch()
    b.pop("labels")
    saved, trained = again.state_dict(), student.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    # (logits are not compared: accelerate leaves the trained model's forward under bf16 autocast)


def test_pruning_callback_follows_the_schedule_and_the_folder_reloads(tmp_path):
    warnings.simplefilter("ignore")
    model = bert(0)
    b, example = batch()
    cb = PruningCallback(PruneConfig(method="channel", sparsity=0.5, steps=2, schedule="linear", round_to=8),
                         example, epochs_per_step=1)
    trainer = transformers.Trainer(model=model, args=args(tmp_path, num_train_epochs=3), train_dataset=rows(),
                                   callbacks=[cb])
    trainer.train()
    assert [r["target"] for r in cb.pruner.history] == [0.25, 0.5]  # one step at each of the first two epochs
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters()}  # the Trainer's optimizer follows the pruned tensors
    widths = {model.get_submodule(f"bert.encoder.layer.{i}.intermediate.dense").out_features for i in range(2)}
    assert widths == {32} and model.config.intermediate_size == 32
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 32  # heads and residual kept
    trainer.save_model(str(tmp_path / "saved"))
    again = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"), local_files_only=True)
    b.pop("labels")
    with torch.no_grad():
        assert torch.allclose(again.eval()(**b).logits, model.eval()(**b).logits, atol=1e-5)


def test_qat_callback_writes_the_int8_file(tmp_path):
    from compress.quant.qat import QuantLayer
    from compress.runtime.onnx import onnx_run, onnx_session

    warnings.simplefilter("ignore")
    model = bert(0)
    _, example = batch()
    cb = QATCallback(QuantizeConfig(method="qat", bits=8), example_inputs=example, onnx_path=tmp_path / "m.onnx")
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=rows(), callbacks=[cb])
    assert any(isinstance(m, QuantLayer) for m in model.modules())  # wrapped before the optimizer exists
    trainer.train()
    assert (tmp_path / "m.onnx").is_file()
    b, _ = batch(16)
    b.pop("labels")
    with torch.no_grad():
        want = model.eval()(**b).logits.argmax(1).numpy()
    from compress.data.inputs import Inputs

    got = onnx_run(onnx_session(tmp_path / "m.onnx"), Inputs(b))
    assert (np.asarray(got).argmax(1) == want).mean() >= 0.9
