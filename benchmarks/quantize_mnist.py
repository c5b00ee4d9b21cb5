"""Quantization on MNIST (8,000/2,000 split of the t10k set), LeNet-5 4x wide: int8 PTQ in ONNX
Runtime, weight-only k-bit, QAT 8/4/2 bits, BinaryConnect and XNOR-Net.

    .venv/bin/python -m benchmarks.quantize_mnist            # full run (about 20-30 min on 2 busy cores)
    .venv/bin/python -m benchmarks.quantize_mnist --epochs 1 --qat-epochs 1 --binary-epochs 1 --train-subset 512  # smoke
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.common import ROOT, data_dir, machine_info, machine_line, markdown_table
from compress import TrainConfig, create_data, create_model, evaluate, load_model, save_model, train
from compress.measure.latency import interleaved_latency
from compress.quant.ptq_onnx import op_counts
from compress.stages.quantize import QuantizeConfig, quantize


def _acc(metrics: dict) -> float:
    return round(100 * metrics["accuracy"], 2)


@click.command()
@click.option("--epochs", default=6, show_default=True, help="fp32 training epochs")
@click.option("--qat-epochs", default=3, show_default=True, help="fine-tuning epochs for QAT and weight-only")
@click.option("--binary-epochs", default=8, show_default=True, help="fine-tuning epochs for binary nets")
@click.option("--threads", default=1, show_default=True, help="ONNX Runtime intra-op threads for timing")
@click.option("--seed", default=0, show_default=True)
@click.option("--train-subset", default=0, help="use only this many training images (smoke runs)")
@click.option("--reuse/--retrain", default=False, show_default=True,
              help="reuse the fp32 model of an earlier run with the same epochs and seed")
def main(epochs: int, qat_epochs: int, binary_epochs: int, threads: int, seed: int, train_subset: int,
         reuse: bool) -> None:
    root = data_dir() / "mnist-t10k"
    torch.manual_seed(seed)
    # One thread: on a small, shared CPU two OpenMP threads spin against each other and train ~10x slower.
    torch.set_num_threads(1)
    data = create_data({"name": "mnist", "root": str(root), "test_size": 2000, "batch_size": 64})
    if train_subset:
        data.train = torch.utils.data.Subset(data.train, range(train_subset))
    out = ROOT / "benchmarks" / "results" / "quantize_mnist"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    key = {"epochs": epochs, "seed": seed, "train_subset": train_subset}
    cached = out / "fp32.pt"
    if reuse and cached.is_file() and torch.load(cached, weights_only=True)["meta"] == key:
        fp32 = load_model(cached)
        base = evaluate(fp32, data, "test")
    else:
        fp32 = create_model({"name": "lenet5", "width": 4}, data.input_shape, data.num_outputs)
        fp32, base = train(fp32, TrainConfig(epochs=epochs, optimizer={"name": "adam", "lr": 1e-3},
                                             scheduler={"name": "cosine"}, progress=False), data, seed=seed)
        save_model(fp32, cached, meta=key)
    print(f"fp32 trained in {time.time() - t0:.0f}s: {_acc(base)}%")
    rows, records = [], []

    def add(name, metrics, size_bytes, ratio, note=""):
        drop = round(_acc(base) - _acc(metrics), 2)
        rows.append([name, f"{_acc(metrics):.2f}", f"{drop:+.2f}", f"{size_bytes / 1024:.1f} KiB", f"{ratio:.2f}x", note])
        records.append({"name": name, "accuracy": metrics["accuracy"], "drop_points": drop, "bytes": size_bytes,
                        "ratio": ratio, "note": note})
        print(rows[-1], flush=True)

    def ft(n):
        return {"epochs": n, "optimizer": {"name": "adam", "lr": 5e-4}, "scheduler": {"name": "cosine"},
                "progress": False}

    # -- int8 post-training quantization in ONNX Runtime --------------------------------------------
    latency = {}
    for method in ("minmax", "entropy", "percentile"):
        d = out / f"ptq_static_{method}"
        _, m = quantize(copy.deepcopy(fp32), QuantizeConfig(method="ptq_static", calibration={"method": method, "batches": 16}),
                        data, out_dir=d)
        if method == "minmax":
            fp32_onnx = Path(m["fp32_onnx"])
            add("fp32 ONNX (reference)", m["fp32_onnx_metrics"], m["fp32_onnx_bytes"], 1.0)
            x = data.example_input(32).numpy().astype(np.float32)
            latency = interleaved_latency({"fp32": fp32_onnx, "int8": Path(m["artifact"])}, x, threads=threads)
            ops = op_counts(m["artifact"], optimized=True)
            note = (f"ORT batch 32, {threads} thread: {latency['fp32']:.2f} ms fp32 vs {latency['int8']:.2f} ms int8 "
                    f"= **{latency['fp32'] / latency['int8']:.2f}x** faster; kernels: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith(("QLinear", "QGemm"))))
        else:
            note = ""
        add(f"int8 PTQ static QDQ, {method}", m, m["int8_onnx_bytes"], m["size_ratio"], note)
    _, m = quantize(copy.deepcopy(fp32), QuantizeConfig(method="ptq_dynamic"), data, out_dir=out / "ptq_dynamic")
    add("int8 PTQ dynamic", m, m["int8_onnx_bytes"], m["size_ratio"])

    # -- PyTorch-side: weight-only, QAT, binary (sizes are the stored weights: packed codes + scales) --
    def torch_side(name, cfg, note=""):
        t = time.time()
        model, m = quantize(copy.deepcopy(fp32), QuantizeConfig(**cfg), data, out_dir=out / name.replace(" ", "_"))
        path = save_model(model, out / f"{name.replace(' ', '_').replace(',', '')}.pt")
        extra = f"checkpoint {path.stat().st_size / 1024:.0f} KiB; {time.time() - t:.0f}s"
        if "onnx_metrics" in m:
            extra += f"; QDQ ONNX in ORT: {_acc(m['onnx_metrics']):.2f}%"
        add(name, m, m["weight_bytes"], m["weight_compression"], "; ".join(filter(None, [note, extra])))
        return model, m

    for bits in (8, 4, 2):
        torch_side(f"weight-only {bits}-bit, no fine-tune", {"method": "weight_only", "bits": bits})
    torch_side("weight-only 2-bit, 2 rounds", {"method": "weight_only", "bits": 2, "rounds": 2,
                                                "finetune": ft(max(qat_epochs // 2, 1))})
    qat8, m8 = torch_side("QAT W8A8 (EMA)", {"method": "qat", "bits": 8, "finetune": ft(qat_epochs)})
    torch_side("QAT W4A4 (LSQ)", {"method": "qat", "bits": 4, "observer": "lsq", "finetune": ft(qat_epochs)})
    torch_side("QAT W2A2 (LSQ)", {"method": "qat", "bits": 2, "observer": "lsq", "finetune": ft(qat_epochs)})
    torch_side("QAT W2A8 (LSQ)", {"method": "qat", "bits": 2, "activation_bits": 8, "observer": "lsq",
                                  "finetune": ft(qat_epochs), "export_onnx": False})
    bft = {**ft(binary_epochs), "optimizer": {"name": "adam", "lr": 1e-3}}
    torch_side("BinaryConnect", {"method": "binary", "binary": "binaryconnect", "finetune": bft},
               "first/last layer fp32")
    torch_side("XNOR-Net", {"method": "binary", "binary": "xnor", "finetune": bft}, "first/last layer fp32")

    header = ["model", "test acc %", "drop (points)", "size", "vs fp32", "notes"]
    table = markdown_table(header, rows)
    print()
    print(f"fp32 PyTorch LeNet-5 4x: {_acc(base):.2f}% on 2,000 test images; ONNX PTQ sizes are .onnx files, "
          "PyTorch-side sizes are stored weight bytes (packed codes + fp32 scales) vs fp32 weights")
    print(table)
    print(machine_line())
    result = {"fp32_accuracy": base["accuracy"], "rows": records, "latency_ms": latency, "threads": threads,
              "epochs": epochs, "qat_epochs": qat_epochs, "binary_epochs": binary_epochs,
              "machine": machine_info(), "seconds": round(time.time() - t0, 1)}
    (ROOT / "benchmarks" / "results" / "quantize_mnist.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
