"""Hinton KD of recipes/mnist_kd.yaml's 2x800 student three ways: compress's own ``distill`` stage, the Hugging
Face ``DistillationTrainer``, and a plain PyTorch loop with ``compress.kd.Distiller``.

Per seed: the recipe's teacher (its train stage; ``--teacher-epochs`` shortens it), then the recipe's 2x800
distill stage's settings (T, alpha, Adam lr, cosine, batch size; ``--epochs`` shortens it) run each way from the
same initial student; test accuracy is read once at the end of each. Then the wall-time overhead of each way over
a bare loop (cross-entropy, no teacher) on the same data: ``--rounds`` rounds of one epoch per way, interleaved
(bare, plain+Distiller, HF, stage, bare, ...) as benchmarks/trainer_throughput.py does, one torch thread; the
median over rounds of (way's seconds / bare seconds) is reported. Each way's epoch is timed as a user pays it: the
stage's includes building its teacher-output cache and its validation pass, the HF one the Trainer's setup.

    .venv/bin/python -m benchmarks.loop_integrations --seeds 0,1,2            # the recipe's full settings
    .venv/bin/python -m benchmarks.loop_integrations --seeds 0 --teacher-epochs 8 --epochs 8 --rounds 3

``--part bert``: channel pruning (2 steps to half the MLP widths) then 8-bit QAT of a tiny BERT classifier (random
init, a synthetic token task: is token 7 in the sequence), once through the Hugging Face ``Trainer`` with
``PruningCallback`` and ``QATCallback``, once through compress's ``prune`` and ``quantize`` stages (told to keep
the same layers), from the same initial weights: the widths each makes, and each int8 file's top-1 agreement with
its own PyTorch model and test accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table

RECIPE = "recipes/mnist_kd.yaml"
RESULTS = ROOT / "benchmarks" / "results"


class _HFStudent(nn.Module):
    """The MLP as a transformers model is called: keyword inputs, a dict with ``loss`` and ``logits``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}


class _HFTeacher(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return self.net(pixel_values)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y, *_ = self.ds[i]
        return {"pixel_values": x, "labels": int(y)}


def _cosine(opt, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


def plain_loop(student, teacher, cfg, data, epochs: int, seed: int, kd: bool = True) -> None:
    """Your own loop: Adam, cosine per step, the data's shuffled loader; with ``kd`` the Distiller's loss."""
    from compress.kd import Distiller

    opt = torch.optim.Adam(student.parameters(), lr=cfg.optimizer.lr)
    loader = data.loader("train", shuffle=True, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(seed))
    sched = _cosine(opt, epochs * len(loader))
    distiller = Distiller(teacher, cfg) if kd else None
    try:
        for epoch in range(epochs):
            student.train()
            for x, y, *_ in loader:
                out = student(x)
                loss = distiller.loss(out, x, y) if kd else F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        if distiller is not None:
            distiller.close()


def hf_trainer(student, teacher, cfg, data, epochs: int, seed: int, out_dir: Path) -> None:
    from transformers import TrainingArguments

    from compress.integrations.transformers import DistillationTrainer

    args = TrainingArguments(str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=cfg.batch_size or data.batch_size,
                             learning_rate=cfg.optimizer.lr, lr_scheduler_type="cosine", warmup_steps=0,
                             weight_decay=0.0, optim="adamw_torch", seed=seed, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = DistillationTrainer(model=_HFStudent(student), teacher=_HFTeacher(teacher), distill_config=cfg, args=args,
                                  train_dataset=_Rows(data.train))
    trainer.train()
    trainer.distiller.close()


def stage(student, teacher, cfg, data, epochs: int, seed: int) -> None:
    from compress import distill

    distill(student, teacher, cfg.model_copy(update={"epochs": epochs}), data, seed=seed)


def _accuracy(model, data) -> float:
    from compress.trainer import evaluate

    return evaluate(model, data, "test")["accuracy"]


def run_seed(seed: int, teacher_epochs: int | None, epochs: int | None, rounds: int, out_dir: Path) -> dict:
    from benchmarks.hinton_mnist import _roles
    from compress import create_data, create_model, train
    from compress.utils import seed_everything

    roles = _roles(RECIPE)
    recipe = roles["recipe"]
    data = create_data(recipe.data)
    tcfg = roles["teacher_train"]
    if teacher_epochs:
        tcfg = tcfg.model_copy(update={"epochs": teacher_epochs, "save_every_epoch": False})
    seed_everything(seed)
    teacher = create_model(recipe.teacher, data.input_shape, data.num_outputs)
    t0 = time.perf_counter()
    train(teacher, tcfg.model_copy(update={"progress": False}), data, seed=seed, name=f"teacher s{seed}")
    teacher_s = time.perf_counter() - t0
    cfg = roles["kd"][800].model_copy(update={"progress": False})
    epochs = epochs or cfg.epochs
    seed_everything(seed * 1000 + 800)
    init = create_model({"name": "mlp", "hidden": [800, 800]}, data.input_shape, data.num_outputs)

    row = {"seed": seed, "teacher_epochs": tcfg.epochs, "student_epochs": epochs, "teacher_test": _accuracy(teacher, data),
           "teacher_seconds": round(teacher_s, 1), "temperature": cfg.temperature, "alpha": cfg.alpha}
    ways = {
        "stage": lambda m, e: stage(m, teacher, cfg, data, e, seed),
        "hf": lambda m, e: hf_trainer(m, teacher, cfg, data, e, seed, out_dir / f"hf_s{seed}"),
        "plain": lambda m, e: plain_loop(m, teacher, cfg, data, e, seed),
    }
    for name, fn in ways.items():
        m = copy.deepcopy(init)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        fn(m, epochs)
        row[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        row[f"{name}_test"] = _accuracy(m, data)
        print(f"seed {seed} {name}: test accuracy {row[f'{name}_test']:.4f} in {row[f'{name}_seconds']} s", flush=True)

    # overhead over a bare loop: one epoch per way per round, interleaved
    timed = {"bare": lambda m: plain_loop(m, teacher, cfg, data, 1, seed, kd=False), "plain": lambda m: ways["plain"](m, 1),
             "hf": lambda m: ways["hf"](m, 1), "stage": lambda m: ways["stage"](m, 1)}
    secs: dict = {k: [] for k in timed}
    for r in range(rounds + 1):  # round 0 warms every path up and is not counted
        for name, fn in timed.items():
            m = copy.deepcopy(init)
            t0 = time.perf_counter()
            fn(m)
            if r:
                secs[name].append(time.perf_counter() - t0)
    row["epoch_seconds"] = {k: [round(v, 3) for v in vs] for k, vs in secs.items()}
    for name in ("plain", "hf", "stage"):
        row[f"{name}_overhead"] = round(statistics.median(a / b for a, b in zip(secs[name], secs["bare"])), 3)
    return row


BERT = dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=60,
            max_position_embeddings=32)


def _token_rows(n: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BERT["vocab_size"], (n, seq), generator=g)
    return ids, (ids == 7).any(1).long()


def run_bert(seed: int, epochs: int, out_dir: Path) -> dict:
    """Same init, same data, same schedule: the HF callbacks and the recipe's stages; widths and int8 agreement."""
    from torch.utils.data import DataLoader

    from compress import PruneConfig, QuantizeConfig, create_model, prune, quantize
    from compress.data import DataBundle
    from compress.data.inputs import Inputs
    from compress.integrations.transformers import PruningCallback, QATCallback
    from compress.runtime.onnx import onnx_run, onnx_session
    from transformers import Trainer, TrainingArguments

    out_dir.mkdir(parents=True, exist_ok=True)
    seq = 16
    splits = {name: _token_rows(n, seq, seed * 10 + k) for k, (name, n) in enumerate([("train", 1024), ("val", 256), ("test", 512)])}

    def compress_rows(name):
        ids, y = splits[name]
        return [(Inputs(input_ids=i, attention_mask=torch.ones(seq, dtype=torch.long)), int(t)) for i, t in zip(ids, y)]

    data = DataBundle.from_loaders(DataLoader(compress_rows("train"), batch_size=32, shuffle=True),
                                   DataLoader(compress_rows("val"), batch_size=64), DataLoader(compress_rows("test"), batch_size=64))
    hf_rows = [{"input_ids": i, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": int(t)}
               for i, t in zip(*splits["train"])]
    torch.manual_seed(seed)
    wrapped = create_model({"name": "hf", "config": BERT}, (seq,), 2)
    hf_model = copy.deepcopy(wrapped.model)
    example = {"input_ids": splits["train"][0][:1], "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    prune_cfg = PruneConfig(method="channel", sparsity=0.5, steps=2, schedule="linear",
                            finetune={"epochs": epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "progress": False},
                            self_distill=False)
    qat_cfg = QuantizeConfig(method="qat", bits=8, finetune={"epochs": epochs, "optimizer": {"name": "adam", "lr": 1e-4},
                                                             "progress": False})

    # the Hugging Face Trainer with the callbacks: `epochs` per pruning step, then `epochs` of QAT
    def args(n, lr, name):
        return TrainingArguments(str(out_dir / name), num_train_epochs=n, per_device_train_batch_size=32, learning_rate=lr,
                                 lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, disable_tqdm=True, seed=seed)

    cb = PruningCallback(prune_cfg, example, epochs_per_step=epochs)
    t0 = time.perf_counter()
    Trainer(model=hf_model, args=args(2 * epochs, 1e-3, "prune"), train_dataset=hf_rows, callbacks=[cb]).train()
    q = QATCallback(qat_cfg, example_inputs=example, onnx_path=out_dir / "hf_qat_int8.onnx")
    Trainer(model=hf_model, args=args(epochs, 1e-4, "qat"), train_dataset=hf_rows, callbacks=[q]).train()
    hf_seconds = time.perf_counter() - t0

    # the recipe's stages on the same initial weights, keeping the layers the callback kept
    keep = ["model." + n for n in cb.pruner.config.ignored_layers]
    t0 = time.perf_counter()
    pruned, pm = prune(wrapped, prune_cfg.model_copy(update={"ignored_layers": keep, "round_to": cb.pruner.config.round_to}), data)
    staged, qm = quantize(pruned, qat_cfg, data, out_dir=out_dir / "stage")
    stage_seconds = time.perf_counter() - t0

    def widths(m):
        return sorted({mod.out_features for n, mod in m.named_modules() if n.endswith("intermediate.dense")})

    test = Inputs(input_ids=splits["test"][0], attention_mask=torch.ones(len(splits["test"][0]), seq, dtype=torch.long))
    y = splits["test"][1]
    with torch.no_grad():
        hf_float = hf_model.eval()(**test).logits.argmax(1)
    hf_int8 = torch.as_tensor(onnx_run(onnx_session(out_dir / "hf_qat_int8.onnx"), test)).argmax(1)
    st_int8 = torch.as_tensor(onnx_run(onnx_session(out_dir / "stage" / "model_qat_int8.onnx"), test)).argmax(1)
    with torch.no_grad():
        st_float = staged.eval()(test).argmax(1)
    return {"seed": seed, "epochs_per_phase": epochs,
            "hf_widths": widths(hf_model), "stage_widths": widths(staged),
            "hf_heads": hf_model.bert.encoder.layer[0].attention.self.query.out_features,
            "stage_heads": staged.model.bert.encoder.layer[0].attention.self.query.out_features,
            "hf_int8_agreement": (hf_int8 == hf_float).float().mean().item(),
            "stage_int8_agreement": (st_int8 == st_float).float().mean().item(),
            "hf_int8_test": (hf_int8 == y).float().mean().item(), "stage_int8_test": (st_int8 == y).float().mean().item(),
            "files_agree": (hf_int8 == st_int8).float().mean().item(),
            "hf_seconds": round(hf_seconds, 1), "stage_seconds": round(stage_seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the recipe's (60)")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs per way; default: the recipe's (30)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of one epoch per way")
    ap.add_argument("--part", choices=["kd", "bert", "all"], default="all")
    ap.add_argument("--bert-epochs", type=int, default=2, help="epochs per pruning step, and of QAT")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("bert", "all"):
        bert = [run_bert(int(s), args.bert_epochs, RESULTS / "loop_integrations" / f"bert_s{s}") for s in args.seeds.split(",")]
        print(markdown_table(["seed", "MLP widths HF / stage", "q width HF / stage", "int8 vs own float HF / stage",
                              "int8 test acc HF / stage", "HF file vs stage file"],
                             [[r["seed"], f"{r['hf_widths']} / {r['stage_widths']}", f"{r['hf_heads']} / {r['stage_heads']}",
                               f"{r['hf_int8_agreement']:.2%} / {r['stage_int8_agreement']:.2%}",
                               f"{r['hf_int8_test']:.2%} / {r['stage_int8_test']:.2%}", f"{r['files_agree']:.2%}"] for r in bert]))
        (RESULTS / "loop_integrations_bert.json").write_text(json.dumps(bert, indent=2))
        if args.part == "bert":
            print(machine_line())
            return
    data_dir()
    rows = [run_seed(int(s), args.teacher_epochs, args.epochs, args.rounds, RESULTS / "loop_integrations")
            for s in args.seeds.split(",")]
    table = [[r["seed"], f"{r['teacher_test']:.4f}", *(f"{r[f'{w}_test']:.4f}" for w in ("stage", "hf", "plain")),
              *(f"{r[f'{w}_overhead']:.2f}x" for w in ("plain", "hf", "stage"))] for r in rows]
    print(markdown_table(["seed", "teacher", "stage test acc", "HF DistillationTrainer", "plain + Distiller",
                          "plain+Distiller / bare epoch", "HF / bare", "stage / bare"], table))
    print(f"teacher epochs {rows[0]['teacher_epochs']}, student epochs {rows[0]['student_epochs']}, "
          f"T={rows[0]['temperature']}, alpha={rows[0]['alpha']}, {args.rounds} timing rounds")
    print(machine_line())
    (RESULTS / "loop_integrations.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
