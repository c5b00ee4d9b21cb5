"""The quickstart's report: the summary line and table ``make demo`` (compress run recipes/quickstart.yaml) prints.

    .venv/bin/python -m benchmarks.report_quickstart

Runs ``recipes/quickstart.yaml`` as it is (train -> distill -> prune -> quantize), prints the summary line and
the table ``compress run`` prints, and writes the run (report.json, report.html) under
``benchmarks/results/report_quickstart/``. Latencies depend on the CPU (printed last).
"""
from __future__ import annotations

import time

from benchmarks.common import ROOT, machine_line
from compress.pipeline import Pipeline
from compress.recipe import read_yaml
from compress.report import format_table


def main() -> None:
    doc = read_yaml(ROOT / "recipes" / "quickstart.yaml")
    out = ROOT / "benchmarks" / "results" / "report_quickstart"
    t0 = time.time()
    report = Pipeline.from_dict(doc).run(out, force=True)
    print(format_table(report))
    print(f"\nrun: {time.time() - t0:.0f} s in all, of it in the stages: "
          + ", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in report["stages"]))
    print(f"report: {out / 'report.json'}, {out / 'report.html'}")
    print(machine_line())


if __name__ == "__main__":
    main()
