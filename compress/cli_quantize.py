"""``compress quantize MODEL.onnx --data ...``: compress's int8 for a float ONNX file you already have, checked
against it and timed beside it (``compress.quantize`` given a path does the work)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from compress.cli_options import check_output, friendly_errors

DATA_HELP = ("Calibration and held-out samples: a recipe's data: block as YAML (a file, a recipe file, or inline: "
             "'{name: mnist, root: data/mnist-t10k}'), or an .npz of inputs (the array named like the model's input, "
             "or its only array; labels 'y' optional).")


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", required=True, metavar="DATA", help=DATA_HELP)
@click.option("--method", type=click.Choice(["ptq_static", "ptq_dynamic"]), default="ptq_static", show_default=True,
              help="ptq_static: calibrated int8 activations (CNNs); ptq_dynamic: activations quantized at run time "
                   "(Linear/RNN-heavy models).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="int8 file to write (default: MODEL_int8.onnx beside MODEL).")
@click.option("--samples", type=click.IntRange(min=1),
              help="Calibration samples (default 512: the quantize stage's 8 batches of 64; from an .npz: 3/4 of it "
                   "at most); the check uses held-out samples.")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="Another option of the recipe's quantize: section, e.g. calibration.method=entropy, "
                   "target_cpu=vnni, check.min_top1_agreement=0.8 (repeatable).")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time the int8 file against MODEL at batch 1 and 32 (ONNX Runtime, 1 thread, interleaved).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@friendly_errors
def quantize(model, data, method, out, samples, options, latency, force):
    """Quantize a float ONNX MODEL to int8 with compress's settings; print its agreement with MODEL and both latencies."""
    from compress.config import validate
    from compress.errors import CompressError
    from compress.measure.config import BenchmarkConfig
    from compress.recipe import apply_override
    from compress.stages.quantize import QuantizeConfig, quantize as quantize_file

    out = out or model.with_name(f"{model.stem}_int8.onnx")
    check_output("--out", out)
    if out.resolve() == model.resolve():
        raise CompressError(f"{out}: would overwrite the input; give another --out")
    if out.exists() and not force:
        raise CompressError(f"{out}: exists; pass --force to replace it, or give another --out")
    doc: dict = {"method": method}
    for o in options:
        apply_override(doc, o)
    if samples and method == "ptq_dynamic":
        raise CompressError("--samples: ptq_dynamic needs no calibration samples")
    if samples:
        doc["calibration"] = {**(doc.get("calibration") or {}), "samples": samples}
    cfg = validate(QuantizeConfig, doc, "quantize")
    with tempfile.TemporaryDirectory(prefix="compress-quantize-") as scratch:
        _, metrics = quantize_file(model, cfg, _data(data), out_dir=scratch, out=out,
                                   benchmark=BenchmarkConfig(latency=latency, progress=False))
    click.echo(table(model, out, metrics))


def _data(text: str):
    """--data: an .npz as a Path; a YAML file (a data block or a recipe) or inline YAML as a data block or name."""
    import yaml

    from compress import yamlsafe
    from compress.errors import CompressError

    from compress.recipe import interpolate, read_yaml

    path = Path(text)
    if path.suffix.lower() in (".npz", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise CompressError(f"--data: no such file '{text}'")
        if path.suffix.lower() == ".npz":
            return path
        value = read_yaml(path)
        value = value["data"] if isinstance(value.get("data"), dict) else value  # a recipe: its data: section
    else:
        try:
            value = yamlsafe.loads(text)
        except yaml.YAMLError:
            value = None
    if not isinstance(value, (dict, str)):
        raise CompressError(f"--data: expected a YAML or .npz file, or an inline data block like "
                            f"'{{name: mnist, root: data/mnist-t10k}}', got '{text}'")
    return interpolate(value, path="data")  # ${COMPRESS_DATA_DIR} and the like, as in a recipe


def table(model: Path, out: Path, m: dict) -> str:
    """The int8 file beside its input: size, task metric, agreement, latency per batch size."""
    from compress.report import fmt_bytes

    check = m["int8_check"]
    how = f"{m.get('calibration', 'no')} calibration on {m['calibration_samples']} samples; " if m["calibration_samples"] else ""
    rows = [("", model.name, out.name),
            ("size", fmt_bytes(m["fp32_onnx_bytes"]), f"{fmt_bytes(m['int8_onnx_bytes'])} ({m['size_ratio']:.2f}x smaller)")]
    for key in ("accuracy", "rmse"):
        if key in m:
            pct = key == "accuracy"
            rows.append((key, *(f"{100 * v:.2f}%" if pct else f"{v:.4g}" for v in (m["fp32_onnx_metrics"][key], m[key]))))
    if check["top1_agreement"] is not None:
        rows.append(("top-1 agreement", "", f"{100 * check['top1_agreement']:.2f}%"))
    rows.append(("largest |difference|", "", f"{100 * check['rel_diff']:.2f}% of the output range"))
    for bs, r in (m.get("latency") or {}).items():
        if isinstance(r, dict):
            x = r["speedup"]
            faster = f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"
            rows.append((f"latency, batch {bs}", f"{r['baseline_median_ms']:.3f} ms", f"{r['median_ms']:.3f} ms ({faster})"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{model} -> {out} ({m['method']}: {how}{check['format']}, target_cpu {check['target_cpu']})"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"checked on {m['held_out_samples']} held-out samples of {m['data']}"
                 + ("; latency: ONNX Runtime, 1 thread, interleaved medians" if m.get("latency") else "")
                 + f"; CPU: {check['cpu']}")
    return "\n".join(lines)
