"""``compress quantize`` on an existing ONNX file vs ONNX Runtime's ``quantize_static`` with its documented
defaults vs NNCF's ``nncf.quantize``: a torchvision resnet18 (3x32x32: MNIST padded to 32 px, channels
repeated; trained ``--epochs`` on the 8,000-image split of the t10k set), exported to ONNX, quantized by each
from the same calibration samples (the first ``--samples`` training images), then scored on the 2,000 held-out
MNIST test images (accuracy, top-1 agreement with the fp32 file) and timed side by side: all files interleaved
in one process (compress.measure.latency.interleaved_latency), ONNX Runtime, 1 thread, batch 1 and 32.

    .venv/bin/python -m benchmarks.quantize_onnx                # ~5-10 min on 2 busy cores
    .venv/bin/python -m benchmarks.quantize_onnx --epochs 0     # random init: agreement only (smoke)

NNCF is optional (``pip install nncf``): without it its row says so.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, data_dir, machine_info, machine_line, markdown_table
from compress import QuantizeConfig, TrainConfig, create_data, quantize, train
from compress.data import DataBundle
from compress.measure.config import BenchmarkConfig
from compress.measure.latency import interleaved_latency
from compress.quant.ptq_onnx import LoaderReader
from compress.runtime.onnx import onnx_session, to_onnx


def _images(data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as a torchvision classifier takes it: 3 x 32 x 32 (2 px padding, the channel repeated)."""
    xs, ys = zip(*data.loader(split, shuffle=False))
    x = F.pad(torch.cat(xs), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    return x, torch.cat(ys)


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    s = onnx_session(path, None)
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 250]})[0] for i in range(0, len(x), 250)])


def _ort_defaults(fp32: Path, out: Path, cal: torch.Tensor) -> Path:
    """ONNX Runtime's quantize_static as its documentation calls it: model, output, reader, nothing else."""
    from onnxruntime.quantization import quantize_static

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(cal), batch_size=64)
    quantize_static(str(fp32), str(out), LoaderReader(loader, len(loader)))
    return out


def _nncf(fp32: Path, out: Path, cal: torch.Tensor):
    """NNCF's post-training quantization of the ONNX model (its defaults), or the reason it did not run."""
    try:
        import nncf
        import onnx
    except ImportError as exc:
        return f"not installed ({exc.name})"
    batches = [{"input": cal[i:i + 64].numpy()} for i in range(0, len(cal), 64)]
    q = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(batches), subset_size=len(batches))  # counts items: batches
    onnx.save(q, str(out))
    return out


@click.command()
@click.option("--epochs", default=1, show_default=True, help="fp32 training epochs (0: random init, agreement only)")
@click.option("--samples", default=512, show_default=True, help="calibration samples, the same for every quantizer")
@click.option("--seed", default=0, show_default=True)
def main(epochs: int, samples: int, seed: int) -> None:
    import torchvision

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    out = ROOT / "benchmarks" / "results" / "quantize_onnx"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()
    mnist = create_data({"name": "mnist", "root": str(data_dir() / "mnist-t10k"), "test_size": 2000, "batch_size": 64})
    splits = {s: _images(mnist, s) for s in ("train", "val", "test")}
    loaders = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*splits[s]), batch_size=64, shuffle=s == "train")
               for s in ("train", "val", "test")]
    model = torchvision.models.resnet18(num_classes=10)
    if epochs:
        model, _ = train(model, TrainConfig(epochs=epochs, optimizer={"name": "adam", "lr": 1e-3}, progress=False),
                         DataBundle.from_loaders(*loaders), seed=seed)
    model.eval()
    print(f"resnet18 trained {epochs} epoch(s) in {time.time() - t0:.0f}s", flush=True)
    fp32 = to_onnx(model, splits["test"][0][:1], out / "resnet18.onnx")
    cal = splits["train"][0][:samples]
    held = splits["train"][0][samples:samples + 256]  # compress's own check: held-out training images
    np.savez(out / "calibration.npz", input=torch.cat([cal, held]).numpy())

    files: dict[str, object] = {"fp32 (input)": fp32}
    t = time.time()
    _, m = quantize(fp32, QuantizeConfig(method="ptq_static", calibration={"samples": samples}),
                    data=out / "calibration.npz", out=out / "compress_int8.onnx", benchmark=BenchmarkConfig(latency=False))
    files["compress quantize (defaults)"] = out / "compress_int8.onnx"
    made = {"compress quantize (defaults)": time.time() - t}
    t = time.time()
    files["ORT quantize_static, documented defaults"] = _ort_defaults(fp32, out / "ort_defaults_int8.onnx", cal)
    made["ORT quantize_static, documented defaults"] = time.time() - t
    t = time.time()
    files["NNCF nncf.quantize (defaults)"] = _nncf(fp32, out / "nncf_int8.onnx", cal)
    made["NNCF nncf.quantize (defaults)"] = time.time() - t
    print(f"quantized in {time.time() - t0:.0f}s", flush=True)

    x, y = splits["test"][0].numpy(), splits["test"][1].numpy()
    paths = {k: v for k, v in files.items() if isinstance(v, Path)}
    logits = {k: _predict(p, x) for k, p in paths.items()}
    ref = logits["fp32 (input)"].argmax(1)
    lat = {bs: interleaved_latency(paths, x[:bs], threads=1) for bs in (1, 32)}
    print(f"timed in {time.time() - t0:.0f}s", flush=True)
    rows, records = [], []
    for name, f in files.items():
        if not isinstance(f, Path):
            rows.append([name, "-", "-", "-", "-", "-", f])
            records.append({"quantizer": name, "skipped": f})
            continue
        pred = logits[name].argmax(1)
        speed = {bs: lat[bs]["fp32 (input)"] / lat[bs][name] for bs in lat}
        rec = {"quantizer": name, "accuracy": float((pred == y).mean()), "top1_agreement": float((pred == ref).mean()),
               "bytes": f.stat().st_size, "ms_b1": lat[1][name], "ms_b32": lat[32][name],
               "speedup_b1": speed[1], "speedup_b32": speed[32], "seconds_to_make": made.get(name)}
        records.append(rec)
        rows.append([name, f"{100 * rec['accuracy']:.2f}", f"{100 * rec['top1_agreement']:.2f}",
                     f"{f.stat().st_size / 2**20:.1f} MiB", f"{lat[1][name]:.3f} ms ({speed[1]:.2f}x)",
                     f"{lat[32][name]:.2f} ms ({speed[32]:.2f}x)", f"{made[name]:.0f}s to make" if name in made else ""])
    header = ["file", "test acc %", "top-1 agreement %", "size", "batch 1 (x faster than fp32)", "batch 32", "note"]
    print()
    print(f"torchvision resnet18, 3x32x32 MNIST, {epochs} epoch(s); {samples} calibration samples for every quantizer; "
          f"2,000 MNIST test images; ONNX Runtime, 1 thread, all files interleaved; compress's own check: "
          f"top-1 agreement {100 * m['int8_check']['top1_agreement']:.2f}% on {m['held_out_samples']} held-out samples")
    print(markdown_table(header, rows))
    print(machine_line())
    (ROOT / "benchmarks" / "results" / "quantize_onnx.json").write_text(json.dumps(
        {"rows": records, "epochs": epochs, "samples": samples, "seed": seed, "compress_check": m["int8_check"],
         "machine": machine_info(), "seconds": round(time.time() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
