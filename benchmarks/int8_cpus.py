"""int8 on every CPU: the same LeNet-5 4x (MNIST 8,000/2,000 split of the t10k set) quantized in each int8
format, scored in ONNX Runtime's kernels on this CPU, on an emulated AVX2-only CPU (QEMU's Haswell: no
AVX-512, no VNNI, so ORT runs its AVX2 U8S8 kernels), and in ORT's float simulation of the same file.

    .venv/bin/python -m benchmarks.int8_cpus               # ~10 min on 2 cores (QEMU emulation is the slow part)
    .venv/bin/python -m benchmarks.int8_cpus --epochs 1 --qat-epochs 1   # smoke

Latency ratios (int8 / fp32, interleaved, 1 thread) are measured on the host CPU only: emulated timings
mean nothing. QEMU (Debian: qemu-user) is optional; without it the AVX2 column is empty.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.common import ROOT, data_dir, machine_info, machine_line, markdown_table
from compress import TrainConfig, create_data, create_model, train
from compress.measure.latency import interleaved_latency
from compress.quant.int8 import saturation_risk
from compress.stages.quantize import QuantizeConfig, quantize

# Scores a list of ONNX files on saved inputs; run under `qemu-x86_64 -cpu Haswell` for the AVX2 column.
_SCORE = r'''
import json, sys, numpy as np, onnxruntime as ort
d = np.load(sys.argv[1]); x, y = d["x"], d["y"]
out = {}
for p in sys.argv[2:]:
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    pred = np.concatenate([s.run(None, {"input": x[i:i + 250]})[0].argmax(1) for i in range(0, len(x), 250)])
    out[p] = float((pred == y).mean())
print(json.dumps(out))
'''


def _score(files: list[Path], inputs: Path, emulate: bool) -> dict[str, float]:
    cmd = [sys.executable, "-c", _SCORE, str(inputs), *map(str, files)]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", "Haswell", *cmd]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def _sim_score(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from compress.runtime.onnx import onnx_session

    s = onnx_session(path, 1, optimize=False)
    pred = np.concatenate([s.run(None, {"input": x[i:i + 250]})[0].argmax(1) for i in range(0, len(x), 250)])
    return float((pred == y).mean())


@click.command()
@click.option("--epochs", default=6, show_default=True, help="fp32 training epochs")
@click.option("--qat-epochs", default=2, show_default=True, help="QAT W8A8 fine-tuning epochs")
@click.option("--seed", default=0, show_default=True)
def main(epochs: int, qat_epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = create_data({"name": "mnist", "root": str(data_dir() / "mnist-t10k"), "test_size": 2000, "batch_size": 64})
    out = ROOT / "benchmarks" / "results" / "int8_cpus"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()
    fp32 = create_model({"name": "lenet5", "width": 4}, data.input_shape, data.num_outputs)
    fp32, base = train(fp32, TrainConfig(epochs=epochs, optimizer={"name": "adam", "lr": 1e-3},
                                         scheduler={"name": "cosine"}, progress=False), data, seed=seed)
    print(f"fp32 trained in {time.time() - t0:.0f}s: {100 * base['accuracy']:.2f}%", flush=True)
    xs, ys = zip(*[(b[0].numpy(), b[1].numpy()) for b in data.loader("test", shuffle=False)])
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys)
    inputs = out / "test.npz"
    np.savez(inputs, x=x, y=y)

    variants = {  # name -> quantize options (the first is the default: right on any CPU)
        "static, target_cpu any (default: 7-bit int8 weights)": {"method": "ptq_static"},
        "static, weight_type uint8 (U8U8)": {"method": "ptq_static", "weight_type": "uint8"},
        "static, target_cpu vnni (full 8-bit int8 weights: the old default)": {"method": "ptq_static", "target_cpu": "vnni"},
        "dynamic, target_cpu any": {"method": "ptq_dynamic"},
        "dynamic, target_cpu vnni (old default)": {"method": "ptq_dynamic", "target_cpu": "vnni"},
        "QAT W8A8, target_cpu any (7-bit weight grid)": {"method": "qat", "bits": 8},
        "QAT W8A8, weight_type uint8": {"method": "qat", "bits": 8, "weight_type": "uint8"},
    }
    ft = {"epochs": qat_epochs, "optimizer": {"name": "adam", "lr": 5e-4}, "scheduler": {"name": "cosine"}, "progress": False}
    files, torch_acc, fp32_onnx = {}, {}, None
    for name, opts in variants.items():
        d = out / f"v{len(files)}"
        extra = {"finetune": ft} if opts["method"] == "qat" else {"calibration": {"batches": 16}} if opts["method"] == "ptq_static" else {}
        if opts.get("target_cpu") == "vnni":  # on a host without VNNI its check would (rightly) refuse it: measure it anyway
            extra["check"] = {"max_rel_diff": 10.0, "min_top1_agreement": 0.0, "max_kernel_diff": 10.0}
        cfg = QuantizeConfig(**opts, **extra)
        model, m = quantize(copy.deepcopy(fp32), cfg, data, out_dir=d)
        files[name] = Path(m.get("artifact") or m["onnx"])
        torch_acc[name] = m["accuracy"] if opts["method"] == "qat" else None
        if fp32_onnx is None and "fp32_onnx" in m:
            fp32_onnx = Path(m["fp32_onnx"])
        print(f"{name}: made in {time.time() - t0:.0f}s", flush=True)
    host = _score([fp32_onnx, *files.values()], inputs, emulate=False)
    avx2 = _score([fp32_onnx, *files.values()], inputs, emulate=True) if shutil.which("qemu-x86_64") else {}
    print(f"scored in {time.time() - t0:.0f}s", flush=True)
    rows, records = [], []
    fp32_bytes = fp32_onnx.stat().st_size
    for name, f in files.items():
        lat = {bs: interleaved_latency({"fp32": fp32_onnx, "int8": f}, data.example_input(bs).numpy(), threads=1)
               for bs in (1, 32)}
        ratio = {bs: lat[bs]["fp32"] / lat[bs]["int8"] for bs in lat}
        sim = _sim_score(f, x, y)
        ref = torch_acc[name] if torch_acc[name] is not None else host[str(fp32_onnx)]
        rec = {"variant": name, "reference_accuracy": ref, "host_accuracy": host[str(f)],
               "avx2_emulated_accuracy": avx2.get(str(f)), "float_simulation_accuracy": sim,
               "portable": not saturation_risk(f), "size_ratio": fp32_bytes / f.stat().st_size,
               "speedup_b1": ratio[1], "speedup_b32": ratio[32]}
        records.append(rec)
        a2 = f"{100 * rec['avx2_emulated_accuracy']:.2f}" if rec["avx2_emulated_accuracy"] is not None else "-"
        rows.append([name, f"{100 * ref:.2f}", f"{100 * rec['host_accuracy']:.2f}", a2, f"{100 * sim:.2f}",
                     "yes" if rec["portable"] else "no", f"{rec['size_ratio']:.2f}x", f"{ratio[1]:.2f}x", f"{ratio[32]:.2f}x"])
        print(rows[-1], flush=True)
    header = ["int8 file", "reference acc % (fp32 ONNX; QAT: PyTorch)", "ORT int8, this CPU", "ORT int8, emulated AVX2",
              "ORT float simulation", "portable", "vs fp32 size", "x faster b1", "x faster b32"]
    print()
    print(f"LeNet-5 4x, {epochs} epochs, 2,000 MNIST test images; fp32 ONNX {100 * host[str(fp32_onnx)]:.2f}%")
    print(markdown_table(header, rows))
    print(machine_line() + "; 'emulated AVX2' = qemu-x86_64 -cpu Haswell (accuracy only)")
    (ROOT / "benchmarks" / "results" / "int8_cpus.json").write_text(json.dumps(
        {"fp32_accuracy": base["accuracy"], "rows": records, "epochs": epochs, "qat_epochs": qat_epochs,
         "machine": machine_info(), "seconds": round(time.time() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
