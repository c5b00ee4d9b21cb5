"""``compress quantize MODEL.onnx --data ...``: compress's int8 for a float ONNX file you already have, checked
against it and timed beside it (``compress.quantize`` given a path does the work); for a language model's file
with a key-value cache, int4/int8 weight-only or int8 dynamic MatMuls, checked by perplexity and timed
generating."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from compress.cli_options import check_output, friendly_errors

DATA_HELP = ("Calibration and held-out samples: a recipe's data: block as YAML (a file, a recipe file, or inline: "
             "'{name: mnist, root: data/mnist-t10k}'), or an .npz of inputs (the array named like the model's input, "
             "or its only array; labels 'y' optional). For nbits/lm_dynamic: an lm data block (token blocks), or an "
             ".npz of token blocks named by split (train, val).")
LM_METHODS = ("nbits", "lm_dynamic")


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", required=True, metavar="DATA", help=DATA_HELP)
@click.option("--method", type=click.Choice(["ptq_static", "ptq_dynamic", *LM_METHODS]), default="ptq_static",
              show_default=True,
              help="ptq_static: calibrated int8 activations (CNNs); ptq_dynamic: activations quantized at run time "
                   "(Linear/RNN-heavy models). A language model's file with a key-value cache: nbits (weight-only "
                   "int4/int8 MatMulNBits; --set bits=4 --set block_size=32 --set algorithm=rtn) or lm_dynamic "
                   "(int8 dynamic MatMuls), checked by perplexity on validation token blocks.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Quantized file to write (default: MODEL_int8.onnx, or MODEL_int4.onnx for nbits, beside MODEL).")
@click.option("--samples", type=click.IntRange(min=1),
              help="Calibration samples (default 512: the quantize stage's 8 batches of 64; from an .npz: 3/4 of it "
                   "at most); the check uses held-out samples.")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="Another option of the recipe's quantize: section, e.g. calibration.method=entropy, "
                   "target_cpu=vnni, check.min_top1_agreement=0.8; nbits: bits=8, lm_head=true, check.blocks=32 "
                   "(repeatable).")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time the quantized file against MODEL at batch 1 and 32 (ONNX Runtime, 1 thread, interleaved); "
                   "a language model: prefill of a 128-token prompt and decode tokens/s at batch 1.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@friendly_errors
def quantize(model, data, method, out, samples, options, latency, force):
    """Quantize a float ONNX MODEL with compress's settings; print its agreement with MODEL and both latencies
    (a language model: both perplexities and generation speeds)."""
    from compress.config import validate
    from compress.errors import CompressError
    from compress.measure.config import BenchmarkConfig
    from compress.recipe import apply_override
    from compress.stages.quantize import QuantizeConfig, quantize as quantize_file

    lm = _check_fits(model, method)
    doc: dict = {"method": method}
    for o in options:
        apply_override(doc, o)
    if samples and method == "ptq_dynamic":
        raise CompressError("--samples: ptq_dynamic needs no calibration samples")
    if samples and lm:
        raise CompressError(f"--samples: {method} counts token blocks: --set check.blocks=N (and "
                            "calibration.blocks=N for algorithm=gptq)")
    if samples:
        doc["calibration"] = {**(doc.get("calibration") or {}), "samples": samples}
    cfg = validate(QuantizeConfig, doc, "quantize")
    out = out or model.with_name(f"{model.stem}_int{cfg.weight_bits}.onnx")
    check_output("--out", out)
    if out.resolve() == model.resolve():
        raise CompressError(f"{out}: would overwrite the input; give another --out")
    if out.exists() and not force:
        raise CompressError(f"{out}: exists; pass --force to replace it, or give another --out")
    with tempfile.TemporaryDirectory(prefix="compress-quantize-") as scratch:
        _, metrics = quantize_file(model, cfg, _data(data), out_dir=scratch, out=out,
                                   benchmark=BenchmarkConfig(latency=latency, progress=False))
    if lm:
        from compress.measure.generation import measure_generation

        speed = measure_generation({"in": model, "out": out}, baseline="in") if latency else []
        click.echo(lm_table(model, out, metrics, speed))
    else:
        click.echo(table(model, out, metrics))


def _check_fits(model: Path, method: str) -> bool:
    """Whether ``method`` quantizes a language model's file; one line when the file is not of its kind (a
    missing file is the handler's error)."""
    from compress.errors import CompressError
    from compress.runtime.lm_export import is_lm_file

    lm_method = method in LM_METHODS
    if not model.is_file() or is_lm_file(model) == lm_method or (lm_method and not _is_onnx(model)):
        return lm_method  # (not ONNX at all: the handler's one line says so)
    if lm_method:
        raise CompressError(f"{model}: no key-value cache (no past_key_values.* inputs), so not a language model file "
                            f"for --method {method}; a float model file takes --method ptq_static or ptq_dynamic")
    raise CompressError(f"{model}: a language model file with a key-value cache; --method {method} does not fit it: "
                        "use --method nbits (int4/int8 weight-only) or lm_dynamic (int8 dynamic MatMuls)")


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
            rows.append((f"latency, batch {bs}", f"{r['baseline_median_ms']:.3f} ms",
                         f"{r['median_ms']:.3f} ms ({_faster(r['speedup'])})"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{model} -> {out} ({m['method']}: {how}{check['format']}, target_cpu {check['target_cpu']})"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"checked on {m['held_out_samples']} held-out samples of {m['data']}"
                 + ("; latency: ONNX Runtime, 1 thread, interleaved medians" if m.get("latency") else "")
                 + f"; CPU: {check['cpu']}")
    return "\n".join(lines)


def _is_onnx(path: Path) -> bool:
    import onnx

    try:
        return bool(onnx.load(str(path), load_external_data=False).graph.node)
    except Exception:
        return False


def lm_table(model: Path, out: Path, m: dict, speed: list) -> str:
    """A language model's quantized file beside its input: size, perplexity and its check, generation speed
    (``measure_generation`` of "in" and "out")."""
    from compress.runtime.cpu import cpu_model
    from compress.report import fmt_bytes

    check = m["perplexity_check"]
    what = (f"int{m['bits']} {m['algorithm']}, block {m['block_size']}" if m["method"] == "nbits" else "int8 dynamic")
    ops = ", ".join(f"{n} {k}" for k, n in m["ops"].items() if k != "MatMul")
    rows = [("", model.name, out.name),
            ("size", fmt_bytes(m["fp32_onnx_bytes"]),
             f"{fmt_bytes(m['quantized_onnx_bytes'])} ({m['size_ratio']:.2f}x smaller)"),
            ("perplexity, val split", f"{m['fp32_onnx_metrics']['perplexity']:.2f}", f"{m['perplexity']:.2f}"),
            (f"perplexity check, {check['blocks']} blocks", f"{check['float_perplexity']:.2f}",
             f"{check['perplexity']:.2f} ({check['ratio']:.3f}x, max {check['max_ratio']:g})")]
    if speed:
        a, b = (next(s for s in speed if s.name == n) for n in ("in", "out"))
        rows.append((f"prefill {a.prompt_tokens} tokens", f"{a.prefill_ms:.2f} ms",
                     f"{b.prefill_ms:.2f} ms ({_faster(b.prefill_speedup)})"))
        rows.append(("decode, batch 1", f"{a.decode_tokens_per_s:.1f} tok/s",
                     f"{b.decode_tokens_per_s:.1f} tok/s ({_faster(b.decode_speedup)})"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{model} -> {out} ({m['method']}: {what}, LM head {'quantized' if m['lm_head'] else 'float'}; {ops})"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("perplexity on the validation token blocks"
                 + ("; generation: ONNX Runtime, 1 thread, interleaved medians" if speed else "")
                 + f"; CPU: {cpu_model()}")
    return "\n".join(lines)


def _faster(x: float) -> str:
    return f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"
