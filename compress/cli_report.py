"""``compress bench`` (measure one model file) and ``compress report`` (compare saved runs)."""
from __future__ import annotations

from pathlib import Path

import click

from compress.cli_options import allow_import_opt, check_output, friendly_errors, set_opt


@click.command()
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe whose data (test split) and benchmark: section are used (optional for a language model's "
                   ".onnx file with a cache: its generation speed needs no data).")
@set_opt
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path),
              help="Another .pt/.onnx to interleave with: latency is reported as a ratio to it.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON here.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), help="Write an HTML page here.")
@allow_import_opt
@friendly_errors
def bench(model_file, recipe, overrides, baseline, json_out, html_out, allow_import):
    """Measure MODEL_FILE (a compress .pt checkpoint or an .onnx file) on RECIPE's data; a language model's .onnx
    file with a cache alone: prefill and decode speed at batch 1 and 4, one thread and all."""
    from compress.data import create_data
    from compress.measure.config import BenchmarkConfig
    from compress.measure.machine import machine_info
    from compress.measure.row import measure
    from compress.measure.subject import Subject
    from compress.recipe import load_recipe
    from compress.report import format_table, write_html
    from compress.safety import allowing_imports
    from compress.utils import write_json

    check_output("--json", json_out)
    check_output("--html", html_out)
    if recipe is None:
        from compress.cli_generate import bench_lm

        return bench_lm(model_file, baseline, json_out)
    r = load_recipe(recipe, overrides)
    with allowing_imports(allow_import):  # the checkpoints' specs: only the recipe's data is used here
        subject = Subject.load(model_file)
        base = Subject.load(baseline) if baseline else None
    data = create_data(r.data)
    cfg = r.benchmark or BenchmarkConfig()
    rows = []
    if base is not None:
        rows.append({"name": baseline.name, "index": 0, "artifact": str(baseline),
                     **measure(base, data, cfg, desc=baseline.name)})
    rows.append({"name": model_file.name, "index": len(rows), "artifact": str(model_file),
                 **measure(subject, data, cfg, baseline=base, desc=model_file.name)})
    report = {"recipe": r.name, "run_dir": None, "stages": rows, "machine": machine_info()}
    click.echo(format_table(report))
    if json_out:
        write_json(json_out, report)
    if html_out:
        write_html(report, html_out)
        click.echo(f"\nHTML: {html_out}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: RUN_DIR/report.html for one run, ./compare.html for several).")
@friendly_errors
def report(run_dirs, html_out):
    """Print one table and write one HTML page for RUN_DIR(s), from their report.json only."""
    from compress.report import format_table, load_report, write_html

    check_output("--html", html_out)
    reports = [load_report(d) for d in run_dirs]
    for rep, d in zip(reports, run_dirs):
        rep.setdefault("run_dir", str(d))
        rep["run_dir"] = rep["run_dir"] or str(d)
    click.echo(format_table(reports if len(reports) > 1 else reports[0]))
    if html_out is None:
        html_out = (run_dirs[0] / "report.html") if len(run_dirs) == 1 and run_dirs[0].is_dir() else Path("compare.html")
    write_html(reports if len(reports) > 1 else reports[0], html_out, force=True)
    click.echo(f"\nHTML: {html_out}")
