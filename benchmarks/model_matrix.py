"""Users' architectures x compress's stages: does every stage run on torchvision, timm and transformers models?

Every model is built from its config with random weights and every stage runs a few steps on tiny synthetic
data (accuracy is not the point: whether the stage works, and what it buys). Images are small so the
machine can afford the big models (64 px; vit_b_16 at 32 px, its 16 px patches giving 4 tokens + class).
A cell is ``ok`` or the one-line reason the stage cannot run. Prune and quantize cells also give MACs
before -> after and the ONNX Runtime speed-up against the fp32 ONNX of the same unpruned model, timed
interleaved (compress.measure.latency), one thread, at batch 1 and 32. Channel pruning stops at half the
MACs (a ``macs`` budget with ``reduction: 2``, checked after each of up to 8 linear steps of 10% of the
channels, every layer alike, widths multiples of 8: ``--round-to 1`` shows what odd widths cost in ORT).
Distill is logit KD plus one hidden-state hint from a torchvision resnet18 teacher (its ``layer4`` maps to
each image student's last features: CNN maps and ViT tokens alike, pooled where layouts differ); the text
model distils from a copy of itself.

    .venv/bin/python -m benchmarks.model_matrix [--rows tv_resnet18 hf_bert] [--cols channel ptq_dynamic] [--quick]
    .venv/bin/python -m benchmarks.model_matrix --defaults --cols channel [--scope layer|global]

``--defaults``: the channel cell as a user writes it, ``{method: channel, budget: {kind: macs, reduction: 2}}``
and nothing else (round_to from the latency backends, the default scope, one step shrunk to land on the
budget); realized/ideal = ORT speed-up / MACs reduction (issue 25's bar: >= 0.85 at batch 32).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from benchmarks.common import ROOT, machine_line, markdown_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 64}
HF_VIT = {"model_type": "vit", "image_size": 64, "patch_size": 8, "num_channels": 3, "hidden_size": 96,
          "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384}
SEQ = 32

# name -> (model spec, input shape, kind, hint layer); kind: cnn | vit | text (the 1.5x channel-pruning target
# is for cnn + vit). The hint layer's output is matched to the teacher's (resnet18 ``layer4`` for images).
ROWS: dict[str, tuple[dict, tuple, str, str]] = {
    "tv_resnet18": ({"name": "torchvision:resnet18"}, (3, 64, 64), "cnn", "layer4"),
    "tv_mobilenet_v3_small": ({"name": "torchvision:mobilenet_v3_small"}, (3, 64, 64), "cnn", "features"),
    "tv_efficientnet_b0": ({"name": "torchvision:efficientnet_b0"}, (3, 64, 64), "cnn", "features"),
    "tv_convnext_tiny": ({"name": "torchvision:convnext_tiny"}, (3, 64, 64), "cnn", "features"),
    "tv_vit_b_16": ({"name": "torchvision:vit_b_16", "kwargs": {"image_size": 32}}, (3, 32, 32), "vit", "encoder"),
    "timm_deit_tiny": ({"name": "timm:deit_tiny_patch16_224", "kwargs": {"img_size": 64}}, (3, 64, 64), "vit", "blocks"),
    "timm_convnext_atto": ({"name": "timm:convnext_atto"}, (3, 64, 64), "cnn", "stages"),
    "hf_bert": ({"name": "hf", "config": BERT}, (SEQ,), "text", "model.bert.encoder.layer.1"),
    "hf_vit": ({"name": "hf", "config": HF_VIT}, (3, 64, 64), "vit", "model.vit.layernorm"),
}
TEACHER_HINT = "layer4"
COLS = ["distill", "magnitude", "channel", "ptq_static", "ptq_dynamic", "qat", "weight_only", "export"]
CLASSES = 10
# Random weights give near-tied logits and untrained activation ranges: the int8 files' agreement with
# float is no measure of anything here, so their checks only catch broken files (the diff is in the json).
INT8_CHECK = {"max_rel_diff": 2.0, "min_top1_agreement": 0.0, "max_kernel_diff": 1.0}


def make_data(shape: tuple, n: int, batch: int):
    """Synthetic images (compress's ``synthetic`` dataset) or random token ids with attention masks."""
    from compress.data import DataBundle, create_data
    from compress.data.inputs import Inputs

    if len(shape) == 3:
        return create_data({"name": "synthetic", "num_samples": n, "num_classes": CLASSES, "shape": list(shape),
                            "batch_size": batch, "eval_batch_size": batch, "val_fraction": 0.25, "test_fraction": 0.25})
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        mask = torch.ones(shape[0], dtype=torch.long)
        mask[int(torch.randint(shape[0] // 2, shape[0] + 1, (1,), generator=g)):] = 0  # padded tails
        rows.append((Inputs(input_ids=torch.randint(0, BERT["vocab_size"], shape, generator=g), attention_mask=mask),
                     i % CLASSES))
    k = n // 2
    loader = lambda part: DataLoader(part, batch_size=batch)  # noqa: E731
    return DataBundle.from_loaders(loader(rows[:k]), loader(rows[k:k + n // 4]), loader(rows[k + n // 4:]))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class Row:
    """One architecture: its model, data, fp32 ONNX and the cells measured against them."""

    def __init__(self, name: str, args, tmp: Path):
        from compress.models import create_model
        from compress.measure.size import count_macs
        from compress.measure.subject import batch_of
        from compress.runtime.onnx import to_onnx

        self.name, (self.spec, self.shape, self.kind, self.hint) = name, ROWS[name]
        self.args, self.tmp = args, tmp / name
        self.tmp.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        self.data = make_data(self.shape, args.samples, args.batch)
        self.base = create_model(self.spec, self.shape, CLASSES).eval()
        self.x1 = batch_of(self.data, 1)
        self.macs = count_macs(self.base, self.x1)[0]
        self.params = sum(p.numel() for p in self.base.parameters())
        self.fp32_onnx = to_onnx(self.base, self.x1, self.tmp / "fp32.onnx")

    def model(self):
        return copy.deepcopy(self.base).train()

    def train_cfg(self) -> dict:
        return {"epochs": 1, "progress": False, "batch_size": self.args.batch, "device": "cpu"}

    def latency(self, onnx: Path) -> dict:
        """ORT speed-up of ``onnx`` over the fp32 ONNX, interleaved (compress.measure.latency)."""
        from compress.measure.config import BenchmarkConfig
        from compress.measure.latency import measure_latency
        from compress.measure.subject import Subject

        if self.args.no_latency:
            return {}
        cfg = BenchmarkConfig(backends=["onnxruntime"], batch_sizes=self.args.batches, runs=self.args.runs,
                              warmup=1, threads=1, max_seconds=self.args.max_seconds, gpu=False, progress=False)
        res = measure_latency(Subject(onnx=Path(onnx)), self.data, cfg, Subject(onnx=self.fp32_onnx))
        return {f"speedup_bs{bs}": res.get("onnxruntime", {}).get(str(bs), {}).get("speedup") for bs in self.args.batches}

    def measured(self, model, onnx: Path | None = None, prune: bool = False, **extra) -> dict:
        from compress.measure.size import count_macs
        from compress.runtime.onnx import to_onnx

        # quantization keeps the MACs (they get cheaper, not fewer); pruning changes them
        macs = count_macs(model, self.x1)[0] if prune else self.macs
        if onnx is None:
            onnx = to_onnx(model.eval(), self.x1, self.tmp / "cell.onnx")
        return {"macs_before": self.macs, "macs_after": macs, **self.latency(onnx), **extra}

    # -- cells ---------------------------------------------------------------------------------------
    def distill(self, teachers: dict) -> dict:
        from compress.stages.distill import DistillConfig, distill

        teacher = teachers.get(self.shape)
        hint = {"student": self.hint, "teacher": TEACHER_HINT if teacher is not None else self.hint}
        teacher = teacher if teacher is not None else self.model().eval()
        _, m = distill(self.model(), teacher, DistillConfig(hints=[hint], **self.train_cfg()), self.data)
        return {"teacher": getattr(teacher, "matrix_name", "itself"), "hint": f"{hint['teacher']} -> {hint['student']}",
                "teacher_cache": m.get("teacher_cache")}

    def _prune(self, method: str, **opts) -> dict:
        from compress.stages.prune import PruneConfig, prune

        cfg = PruneConfig(method=method, finetune=self.train_cfg(), **opts)
        model, m = prune(self.model(), cfg, self.data)
        extra = {"macs_reduction": m.get("macs_reduction")}
        if method == "channel":
            extra.update(steps=m.get("steps_done"), reload=self._reloads(model))
        return self.measured(model, prune=True, **extra)

    def _reloads(self, model) -> bool:
        from compress.checkpoint import load_model, save_model

        save_model(model, self.tmp / "pruned.pt")
        again = load_model(self.tmp / "pruned.pt").eval()
        with torch.no_grad():
            return bool(torch.allclose(again(self.x1), model.eval()(self.x1), atol=1e-4))

    def magnitude(self) -> dict:
        return self._prune("magnitude", sparsity=0.5, steps=1)

    def channel(self) -> dict:
        scope = {"scope": self.args.scope} if self.args.scope else {}
        if self.args.defaults:  # what a user gets from `{method: channel, budget: {kind: macs, reduction: 2}}`
            cell = self._prune("channel", budget={"kind": "macs", "reduction": 2}, **scope)
        else:
            cell = self._prune("channel", sparsity=0.8, steps=8, schedule="linear", **{"scope": "layer", **scope},
                               round_to=self.args.round_to, budget={"kind": "macs", "reduction": 2})
        for bs in self.args.batches:  # speed-up / MACs ratio: 1.0 when the runtime turns every MAC saved into time
            if cell.get(f"speedup_bs{bs}") and cell.get("macs_reduction"):
                cell[f"realized_ideal_bs{bs}"] = round(cell[f"speedup_bs{bs}"] / cell["macs_reduction"], 3)
        return cell

    def _quantize(self, method: str, **opts) -> dict:
        from compress.stages.quantize import QuantizeConfig, quantize

        model, m = quantize(self.model(), QuantizeConfig(method=method, **opts), self.data, out_dir=self.tmp / method)
        onnx = m.get("artifact") or m.get("onnx")
        check = m.get("int8_check") or {}
        extra = {k: check[k] for k in ("max_rel_diff", "top1_agreement") if k in check}
        return self.measured(None if onnx else model, Path(onnx) if onnx else None, **extra)

    def ptq_static(self) -> dict:
        return self._quantize("ptq_static", calibration={"batches": 2}, check=INT8_CHECK)

    def ptq_dynamic(self) -> dict:
        return self._quantize("ptq_dynamic", check=INT8_CHECK)

    def qat(self) -> dict:
        return self._quantize("qat", finetune=self.train_cfg(), calibration_batches=2, check=INT8_CHECK)

    def weight_only(self) -> dict:
        return self._quantize("weight_only", bits=4)

    def export(self) -> dict:
        from compress.stages.export import ExportConfig, export

        _, m = export(self.model().eval(), ExportConfig(), self.data, path=self.tmp / "export.onnx")
        return {"parity": m.get("max_abs_diff", m.get("parity"))}


def run_row(row: Row, cols: list[str], teachers: dict) -> dict:
    cells = {}
    for col in cols:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn: Callable[..., dict] = getattr(row, col)
                res = fn(teachers) if col == "distill" else fn()
            cell = {"status": "ok", **res}
        except Exception as exc:  # a cell's failure is its result: the reason, in one line
            cell = {"status": "fail", "reason": one_line(exc)}
            if row.args.verbose:
                traceback.print_exc()
        cell["seconds"] = round(time.perf_counter() - t0, 1)
        cells[col] = cell
        if cell["status"] != "ok":
            print(f"{row.name} {col}: {cell['reason']}", flush=True)
        print(f"{row.name:24s} {col:12s} {cell['status']:4s} {cell.get('reason', '')} "
              f"{ {k: v for k, v in cell.items() if k not in ('status', 'reason')} }", flush=True)
    return cells


def cell_text(cell: dict, batches: list[int]) -> str:
    """``ok``, MACs before -> after, the speed-ups per batch size and (channel) realized/ideal at the largest."""
    if cell["status"] != "ok":
        return f"no: {cell['reason'][:160]}"
    parts = ["ok"]
    if "macs_after" in cell:
        b, a = cell["macs_before"], cell["macs_after"]
        if a != b:
            parts.append(f"{b / 1e6:.0f}->{a / 1e6:.0f}M MACs")
        ups = [f"{cell[f'speedup_bs{bs}']:.2f}x" for bs in batches if cell.get(f"speedup_bs{bs}")]
        if ups:
            parts.append("/".join(ups))
        if cell.get(f"realized_ideal_bs{batches[-1]}"):
            parts.append(f"(realized/ideal {cell[f'realized_ideal_bs{batches[-1]}']:.2f})")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--cols", nargs="+", choices=COLS, default=COLS)
    ap.add_argument("--quick", action="store_true", help="no latency, batch 1 only: only whether each cell runs")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--runs", type=int, default=10, help="interleaved timed samples (fewer for slow models: --max-seconds)")
    ap.add_argument("--max-seconds", type=float, default=4.0)
    ap.add_argument("--round-to", type=int, default=8, help="channel pruning's round_to (1: off)")
    ap.add_argument("--defaults", action="store_true",
                    help="channel cell with default settings and a 2x MACs budget only (round_to from the backends)")
    ap.add_argument("--scope", choices=["layer", "global"], default=None, help="channel pruning's scope (default: layer, "
                    "or the PruneConfig default with --defaults)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_matrix"))
    args = ap.parse_args(argv)
    if args.quick:
        args.no_latency, args.batches = True, [1]
    torch.set_num_threads(1)

    from compress.models import create_model

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        teachers: dict = {}  # a torchvision resnet18 teaches every image model of its input size: a cross-family KD
        t_start = time.perf_counter()
        for name in args.rows:
            shape = ROWS[name][1]
            if "distill" in args.cols and len(shape) == 3 and shape not in teachers:
                teachers[shape] = create_model({"name": "torchvision:resnet18"}, shape, CLASSES).eval()
                teachers[shape].matrix_name = "tv_resnet18"
            try:
                row = Row(name, args, Path(tmp))
            except Exception as exc:
                results[name] = {"error": one_line(exc)}
                print(f"{name}: cannot build: {one_line(exc)}", flush=True)
                continue
            results[name] = {"params": row.params, "macs": row.macs, "shape": list(row.shape), "kind": row.kind,
                             "cells": run_row(row, args.cols, teachers)}
        total = round(time.perf_counter() - t_start)

    header = ["model", "input", "params", "MACs"] + args.cols
    table = []
    for name, r in results.items():
        if "error" in r:
            table.append([name, "", "", ""] + [f"no: {r['error']}"] * len(args.cols))
            continue
        table.append([name, "x".join(map(str, r["shape"])), f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e6:.0f}M"]
                     + [cell_text(r["cells"][c], args.batches) for c in args.cols])
    md = markdown_table(header, table)
    note = (f"Random weights, synthetic data, 1 epoch of {args.samples // 2} samples per training stage; "
            f"speed-ups: ONNX Runtime, 1 thread, vs the fp32 ONNX of the same model, interleaved, batch "
            f"{'/'.join(map(str, args.batches))}; measured on a shared machine; {total} s in all.")
    print("\n" + md + "\n\n" + note + "\n" + machine_line())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # only a full, timed matrix replaces the results the README quotes
    full = set(args.rows) == set(ROWS) and set(args.cols) == set(COLS) and args.round_to == 8 and not args.scope
    if full and not args.no_latency and not args.defaults:
        out.with_suffix(".md").write_text(f"{md}\n\n{note}\n\n{machine_line()}\n\nCommand: python -m benchmarks.model_matrix"
                                          "\n")
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": results, "machine": machine_line()},
                                                       indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
