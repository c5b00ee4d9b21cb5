"""Is int8 faster than fp32 in ONNX Runtime for small MLPs? The quickstart's student (MLP on digits) and wider ones,
static PTQ (default portable format) of all ops or of Gemm/MatMul only, random init (latency does not depend on
the weights' values). Ratio = fp32 ms / int8 ms, interleaved, 1 thread, batch 1 and 32.

    .venv/bin/python -m benchmarks.int8_mlp_widths          # about 1 minute on 2 cores
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine_line, markdown_table
from compress import QuantizeConfig, create_data, create_model, quantize
from compress.measure.latency import interleaved_latency


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = create_data({"name": "digits", "batch_size": 64})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in ([64], [128], [256], [256, 256]):
            model = create_model({"name": "mlp", "hidden": hidden}, data.input_shape, data.num_outputs)
            for label, opts in (("all ops", {}), ("Gemm/MatMul only", {"op_types": ["Gemm", "MatMul"]})):
                d = Path(tmp) / f"{'x'.join(map(str, hidden))}-{len(opts)}"
                # random weights: near-tied logits flip classes, which is not what this measures
                cfg = QuantizeConfig(calibration={"batches": 2}, check={"min_top1_agreement": 0.0}, **opts)
                _, m = quantize(model, cfg, data, out_dir=d)
                ratios = []
                for bs in (1, 32):
                    lat = interleaved_latency({"fp32": Path(m["fp32_onnx"]), "int8": Path(m["artifact"])},
                                              data.example_input(bs).numpy(), rounds=30, reps=20)
                    ratios.append(lat["fp32"] / lat["int8"])
                rows.append([f"MLP {hidden}", label, f"{ratios[0]:.2f}x", f"{ratios[1]:.2f}x"])
                print(rows[-1], flush=True)
    print(markdown_table(["model", "int8 ops", "int8 x faster b1", "int8 x faster b32"], rows))
    print(machine_line())


if __name__ == "__main__":
    main()
