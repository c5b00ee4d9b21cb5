"""The quickstart recipe plus an ONNX export stage: the report table every run prints.

    .venv/bin/python -m benchmarks.report_quickstart

Runs ``recipes/quickstart.yaml`` with ``export: {opset: 17}`` appended (train -> evaluate -> export),
prints the table ``compress run`` prints, and writes the run (report.json, report.html) under
``benchmarks/results/report_quickstart/``.
"""
from __future__ import annotations

import time

from benchmarks.common import ROOT, machine_line
from compress.pipeline import Pipeline
from compress.recipe import read_yaml
from compress.report import format_table


def main() -> None:
    doc = read_yaml(ROOT / "recipes" / "quickstart.yaml")
    doc["stages"] = list(doc["stages"]) + [{"export": {"opset": 17}}]
    out = ROOT / "benchmarks" / "results" / "report_quickstart"
    t0 = time.time()
    report = Pipeline.from_dict(doc).run(out, force=True)
    print(format_table(report))
    measured = sum(r["seconds"] for r in report["stages"][1:])
    print(f"\nrun: {time.time() - t0:.0f} s in all; stages after training (evaluate, export, each measured): {measured:.0f} s")
    print(f"report: {out / 'report.json'}, {out / 'report.html'}")
    print(machine_line())


if __name__ == "__main__":
    main()
