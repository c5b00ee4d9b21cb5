"""``compress pack MODEL``: write a saved model (``.pt`` checkpoint, ``.onnx`` or ``.cpk``) as a packed file and show
what each tensor became (``compress.packfile``); ``compress.load_model`` reads the result back."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from compress.cli_options import allow_import_opt, friendly_errors


@click.command("pack")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Packed file to write (default: MODEL with suffix .cpk).")
@click.option("--layers/--no-layers", default=False, help="Print one line per tensor: encoding, bits, coders.")
@allow_import_opt
@friendly_errors
def pack(model, out, layers, allow_import):
    """Pack MODEL (sparse indices, codebooks, entropy coding); checks that it reads back bit-exact."""
    from compress.checkpoint import load_model
    from compress.errors import CompressError
    from compress.report import fmt_bytes
    from compress.safety import allowing_imports
    from compress.stages.encode import encode, encode_onnx

    out = out or model.with_suffix(".cpk")
    if out.resolve() == model.resolve():
        raise CompressError(f"{out}: would overwrite the input; give another --out")
    if model.suffix == ".onnx":  # an ONNX model (int8 PTQ): initializers packed, the graph kept as it is
        _, facts = encode_onnx(model, out=out)
    else:
        with allowing_imports(allow_import or None):  # the opt-in holds for the read-back of the packed file too
            m = load_model(model)
            if getattr(m, "model_bytes", None) is not None:  # a packed ONNX model, repacked
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "m.onnx").write_bytes(m.model_bytes)
                    _, facts = encode_onnx(Path(tmp) / "m.onnx", out=out)
            else:
                _, facts = encode(m, out=out)
    raw = model.stat().st_size
    click.echo(f"{out}: {fmt_bytes(facts['packed_bytes'])} ({raw / facts['packed_bytes']:.1f}x smaller than "
               f"{model.name}, {fmt_bytes(raw)}); weights: {facts['weight_bits_per_weight']} bits each, "
               f"{facts['weight_bits_per_nonzero']} per non-zero; coders won: "
               + ", ".join(f"{k} {v}" for k, v in sorted(facts["coders"].items())))
    if layers:
        import json

        for t in json.loads((out.parent / f"{out.stem}.layers.json").read_text()):
            book = f" {t['bits']}-bit codebook" if t["values"] == "codebook" else " raw values"
            click.echo(f"  {t['name']}: {t['numel']:,} ({t['nnz']:,} non-zero) {t['sparse']}{book}, "
                       f"{fmt_bytes(t['bytes'])}; " + ", ".join(f"{k}={v}" for k, v in t["coders"].items()))
