import base64
import configparser
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import compress
from compress.checkpoint import save_model
from compress.cli import cli
from compress.data import create_data
from compress.runtime.onnx import to_onnx
from compress.models import create_model
from compress.report import format_table, load_report, pareto_front, render_html, write_html


def lat(ms, speedup):
    cell = {"median_ms": ms, "p90_ms": ms * 1.1, "p99_ms": ms * 1.2, "speedup": speedup}
    return {"threads": 1, "runs": 50, "pytorch": {"1": cell}, "onnxruntime": {"1": dict(cell, median_ms=ms / 2)}}


def make_report(name="quick", acc2=0.9, run_dir=None):
    return {
        "recipe": name, "seed": 0, "run_dir": run_dir, "seconds": 1.0,
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "x", "onnxruntime": "y", "gpu": None},
        "stages": [
            {"name": "train", "index": 0, "metrics": {"accuracy": 0.95, "top5": 1.0}, "size_bytes": 4096,
             "zipped_bytes": 3900, "params": 1000, "nonzero_params": 1000, "weight_bits_per_weight": 32.0, "macs": 2_500_000,
             "latency": lat(0.2, 1.0), "layers": [{"name": "fc1", "sparsity": 0.0}, {"name": "fc2", "sparsity": 0.0}]},
            {"name": "prune", "index": 1, "metrics": {"accuracy": acc2, "top5": 0.99}, "size_bytes": 1024,
             "zipped_bytes": 800, "params": 1000, "nonzero_params": 250, "weight_bits_per_weight": 8.0, "macs": 600_000,
             "latency": lat(0.1, 2.0), "layers": [{"name": "fc1", "sparsity": 0.75}, {"name": "fc2", "sparsity": 0.5}]},
        ],
    }


def pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_table_compares_every_stage_with_the_first():
    text = format_table(make_report())
    lines = text.splitlines()[2:]  # below the summary line
    assert lines[0].startswith("| stage | top-1 (top-5) | size | zipped | x smaller vs first | params | non-zero | bits/w | MACs |")
    assert "PyTorch b1 (x faster vs first)" in lines[0] and "ORT b1 (x faster vs first)" in lines[0]
    prune = lines[3]
    assert "| 1: prune | 90.00% (99.0%) | 1.0 KiB | 800 B | 4.00x | 1,000 | 250 | 8.0 | 600.00K |" in prune
    assert "0.100 ms (2.00x)" in prune and "0.050 ms (2.00x)" in prune


def test_lm_rows_show_generation_speed():
    report = make_report()
    gen = {"name": "subject", "runtime": "onnxruntime", "batch": 1, "threads": 1, "prompt_tokens": 128,
           "prefill_ms": 12.5, "decode_ms": 2.0, "clock": "thread", "decode_tokens_per_s": 500.0}
    report["stages"][1]["generation"] = [gen]
    header, *rest = format_table(report).splitlines()[2:]
    assert "| prefill ms (b1) | decode tok/s (b1) |" in header
    assert "| 12.50 | 500.0 |" in rest[2] and "| - | - |" in rest[1]


def test_table_accepts_rows_without_the_new_measures():
    old = {"stages": [{"name": "train", "index": 0, "metrics": {"rmse": 0.91}, "size_bytes": 2048, "params": 10,
                       "nonzero_params": 10}]}
    assert "| 0: train | 0.9100 | 2.0 KiB | - | 1.00x | 10 | 10 | - | - |" in format_table(old)


def test_pareto_front():
    pts = [(1, 80), (2, 90), (3, 85), (4, 95), (5, 95)]
    assert pareto_front(pts) == [(1, 80), (2, 90), (4, 95)]
    assert pareto_front([(1, 0.9), (2, 0.8), (3, 0.85)], maximize=False) == [(1, 0.9), (2, 0.8)]


def test_html_renders_from_a_saved_report_json(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(make_report()))
    page = render_html(load_report(tmp_path))
    images = pngs(page)
    assert len(images) == 4  # accuracy vs size, accuracy vs latency, speed-up, per-layer sparsity
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 5000 for img in images)
    assert "<td>1: prune</td>" in page and "Test CPU" in page and page.startswith("<!doctype html>")


def test_html_without_latency_or_layers_still_has_the_size_plot(tmp_path):
    rep = make_report()
    for r in rep["stages"]:
        del r["latency"], r["layers"]
    assert len(pngs(render_html(rep))) == 1


def test_write_html_skips_unchanged_rows(tmp_path):
    def small(acc2=0.9):
        rep = make_report(acc2=acc2)
        for r in rep["stages"]:
            del r["latency"], r["layers"]
        return rep

    path = write_html(small(), tmp_path / "r.html")
    path.write_text(path.read_text() + "<!-- marker -->")
    write_html({**small(), "seconds": 99.0}, path)
    assert path.read_text().endswith("<!-- marker -->")  # same rows: not re-rendered
    write_html(small(acc2=0.5), path)
    assert "marker" not in path.read_text()


def test_compress_report_compares_two_run_folders(tmp_path):
    for name, acc in (("run-a", 0.9), ("run-b", 0.8)):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps(make_report("quick", acc, str(d))))
    out = tmp_path / "cmp.html"
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "run-a"), str(tmp_path / "run-b"), "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[:2] == [
        "Overall (run-a): 4.0x smaller, 2.00x faster in ONNX Runtime at batch 1, -5.00 points top-1 (1: prune against 0: train).",
        "Overall (run-b): 4.0x smaller, 2.00x faster in ONNX Runtime at batch 1, -15.00 points top-1 (1: prune against 0: train)."]
    assert res.output.splitlines()[3].startswith("| run | stage |")
    assert "| run-a | 1: prune | 90.00%" in res.output and "| run-b | 1: prune | 80.00%" in res.output
    page = out.read_text()
    assert "run-a vs run-b" in page and len(pngs(page)) == 4


def test_compress_report_on_a_folder_without_a_report(tmp_path):
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {tmp_path}: no report.json (is it a run directory of 'compress run'?)"


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "r.yaml").write_text(
        "name: b\ndata: {name: synthetic, num_samples: 64, num_classes: 3, shape: [1, 4, 4]}\nmodel: {name: mlp}\n"
        "stages: [evaluate]\nbenchmark: {runs: 5, warmup: 1, min_sample_ms: 0, batch_sizes: [1], progress: false}\n")
    data = create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [1, 4, 4]})
    big = create_model("mlp", data.input_shape, data.num_outputs, hidden=[64])
    small = create_model("mlp", data.input_shape, data.num_outputs, hidden=[4])
    save_model(big, d / "big.pt")
    to_onnx(small, data.example_input(2), d / "small.onnx")
    return d


def test_compress_bench_an_onnx_file_against_a_checkpoint(bench_files):
    d = bench_files
    res = CliRunner().invoke(cli, ["bench", str(d / "small.onnx"), "--recipe", str(d / "r.yaml"),
                                   "--baseline", str(d / "big.pt"), "--json", str(d / "b.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((d / "b.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["big.pt", "small.onnx"]
    assert rows[1]["params"] == 16 * 4 + 4 + 4 * 3 + 3 and rows[0]["params"] == 16 * 64 + 64 + 64 * 3 + 3
    assert rows[1]["latency"]["onnxruntime"]["1"]["speedup"] > 0 and "pytorch" not in rows[1]["latency"]
    assert "| 1: small.onnx |" in res.output


def test_compress_bench_rejects_a_missing_file(bench_files):
    res = CliRunner().invoke(cli, ["bench", str(bench_files / "nope.pt"), "--recipe", str(bench_files / "r.yaml")])
    assert res.exit_code == 2 and "nope.pt: no such model file" in res.output


def test_a_stage_slower_than_its_input_is_flagged_in_table_and_page():
    rep = make_report()
    quant = dict(rep["stages"][1], name="quantize", index=2, latency=lat(0.15, 1.3),
                 int8_check={"top1_agreement": 0.995, "rel_diff": 0.012, "samples": 144, "split": "val",
                             "cpu": "x86_64 with AVX2", "format": "int8 (7-bit range) weights, uint8 activations"})
    rep["stages"].append(quant)
    table = format_table(rep)
    header = next(line for line in table.splitlines() if line.startswith("| stage"))
    row = next(line for line in table.splitlines() if line.startswith("| 2: quantize"))
    # one baseline per cell: x faster than the first row in the latency columns, its input's speed in its own column
    assert header.endswith("| ORT b1 (x faster vs first) | x speed vs its input | int8 vs float |")
    assert row.endswith("| 0.075 ms (1.30x) | SLOWER: PyTorch b1 0.65x, ORT b1 0.65x | top-1 99.5%, max 1.2% |")
    prune_row = next(line for line in table.splitlines() if line.startswith("| 1: prune"))
    assert "SLOWER" not in prune_row  # faster than its input: not flagged
    assert "2: quantize runs at 0.65x the speed of its input" in table
    page = render_html(dict(rep, machine=dict(rep["machine"], int8_flags=["avx2"], vnni=False)))
    assert 'class="slow"' in page and "int8 features: avx2 (no VNNI)" in page
    assert "SLOWER" not in format_table(make_report())


def test_a_packed_row_shows_raw_file_bits_per_nonzero_and_a_size_waterfall():
    rep = make_report()
    rep["stages"].append({**rep["stages"][-1], "name": "encode", "index": 9, "size_bytes": 512, "packed_bytes": 512,
                          "raw_bytes": 4096, "weight_bits_per_nonzero": 4.25})
    table = format_table(rep)
    header = next(line for line in table.splitlines() if line.startswith("| stage"))
    assert "raw file" in header and "bits/nz" in header
    row = next(line for line in table.splitlines() if line.startswith("| 9: encode |"))
    assert "| 512 B | " in row and "| 4.0 KiB |" in row and "| 4.2 |" in row
    assert len(pngs(render_html(rep))) == len(pngs(render_html(make_report()))) + 1  # the waterfall


def test_waterfall_labels_give_size_ratio_to_the_first_and_the_step():
    from compress.report import waterfall_labels

    assert waterfall_labels([4 << 20, 1 << 20, 1 << 20, 16 << 10, 32 << 10]) == [
        "4.0 MiB (baseline)", "1.0 MiB: 4.0x smaller", "1.0 MiB: 4.0x smaller",
        "16.0 KiB: 256x smaller, 64.0x from the stage above", "32.0 KiB: 128x smaller, 2.0x larger than the stage above"]
    # the packed series: ratios to the first file, steps between its own bars, gaps where nothing was measured
    assert waterfall_labels([2 << 20, 256 << 10, None, 64 << 10], base=4 << 20, prefix="packed: ") == [
        "packed: 2.0 MiB: 2.0x smaller", "packed: 256.0 KiB: 16.0x smaller, 8.0x from the stage above", None,
        "packed: 64.0 KiB: 64.0x smaller, 4.0x from the stage above"]


def test_the_waterfall_shows_the_packed_size_of_earlier_stages():
    rep = make_report()
    rep["stages"].append({**rep["stages"][-1], "name": "encode", "index": 9, "size_bytes": 512, "packed_bytes": 512,
                          "packed_bytes_of_stages": {"0": 4000, "1": 2000}})
    from compress.report import _packed_sizes

    assert _packed_sizes(rep["stages"]) == [4000, 2000] + [None] * (len(rep["stages"]) - 2)
    assert len(pngs(render_html(rep))) == len(pngs(render_html(make_report()))) + 1


# -- a report.json from a stranger -------------------------------------------------------------------

ATTACKS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '"><svg onload=alert(1)>']
HOSTILE = "".join(ATTACKS)
CSP = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:;"""


def small_report():
    """Two rows and no sizes, latency or layers: the page has no plots (fast), unless a case adds them."""
    rep = make_report()
    for r in rep["stages"]:
        for k in ("latency", "layers", "size_bytes", "zipped_bytes"):
            del r[k]
    return rep


def put(doc, path: str, value):
    """Set ``doc`` at a dotted path (list items by index), creating mappings on the way."""
    *parents, last = path.split(".")
    for k in parents:
        doc = doc[int(k)] if isinstance(doc, list) else doc.setdefault(k, {})
    doc[int(last) if isinstance(doc, list) else last] = value


def no_attack_in(page: str):
    for attack in ATTACKS:
        assert attack not in page
    assert "<script" not in page and "onerror=" not in page.replace("onerror=alert(1)&gt;", "")
    assert CSP in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]*)"', page))


# (where in report.json, the hostile value, what compress report must do): "escaped" on the page, or "refused"
HOSTILE_VALUES = [
    ("stages.1.name", HOSTILE, "escaped"),
    ("stages.0.role", HOSTILE, "escaped"),
    ("run_dir", HOSTILE, "escaped"),
    ("machine.cpu", HOSTILE, "escaped"),
    ("machine.gpu", HOSTILE, "escaped"),
    ("machine.torch", HOSTILE, "escaped"),
    ("machine.int8_flags", [HOSTILE], "escaped"),
    ("stages.1.metrics", {HOSTILE: 0.5, "accuracy": 0.9}, "escaped"),  # metric names
    ("stages.1.latency", {"notes": [HOSTILE]}, "escaped"),  # why a backend was not timed
    ("stages.1.int8_check", {"rel_diff": 0.01, "cpu": HOSTILE, "format": HOSTILE, "split": HOSTILE}, "escaped"),
    ("machine.cores", HOSTILE, "refused"),
    ("seconds", HOSTILE, "refused"),
    ("stages.1.params", HOSTILE, "refused"),
    ("stages.1.index", HOSTILE, "refused"),
]


@pytest.mark.parametrize("path,value,expect", HOSTILE_VALUES, ids=[c[0] for c in HOSTILE_VALUES])
def test_compress_report_of_a_hostile_report_json_escapes_or_refuses(tmp_path, path, value, expect):
    rep = small_report()
    put(rep, path, value)
    (tmp_path / "report.json").write_text(json.dumps(rep))
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    page = tmp_path / "report.html"
    if expect == "refused":
        assert res.exit_code == 2 and not page.exists()
        assert res.output.count("\n") == 1 and res.output.startswith(f"error: {tmp_path / 'report.json'}: ")
    else:
        assert res.exit_code == 0, res.output
        no_attack_in(page.read_text())


def test_every_value_on_the_page_is_escaped_even_unchecked_ones():
    """render_html on its own (as `compress run` and `bench` call it): values of any type come out as text."""
    rep = make_report(run_dir=HOSTILE)
    rep.update(seconds=HOSTILE, machine={"cpu": HOSTILE, "cores": HOSTILE, "gpu": HOSTILE, "int8_flags": [HOSTILE],
                                         "vnni": HOSTILE, "torch": HOSTILE, "onnxruntime": HOSTILE})
    rep["stages"][1].update(name=HOSTILE, role=HOSTILE, index=HOSTILE)
    rep["stages"][1]["latency"]["pytorch"]["1"]["clock"] = HOSTILE
    page = render_html(rep)
    no_attack_in(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and len(pngs(page)) == 4


def test_names_that_look_like_mathtext_do_not_break_the_plots(tmp_path):
    rep = make_report()
    rep["stages"][1]["name"] = "$\\frac{$"  # matplotlib would parse '$...$' as a formula and fail to draw it
    rep["stages"][1]["layers"][0]["name"] = "$^^$"
    (tmp_path / "report.json").write_text(json.dumps(rep))
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert len(pngs((tmp_path / "report.html").read_text())) == 4


DEEP = "[" * 100_000 + "]" * 100_000
MALFORMED = {
    "stage not a mapping": '{"stages": [1]}',
    "size a string": '{"stages": [{"name": "a", "size_bytes": "big"}]}',
    "size infinite": '{"stages": [{"name": "a", "size_bytes": 1e400}, {"name": "b", "size_bytes": 10}]}',
    "accuracy NaN": '{"stages": [{"name": "a", "metrics": {"accuracy": NaN}, "size_bytes": 10}]}',
    "latency cell without a median": '{"stages": [{"latency": {"pytorch": {"1": {"speedup": 2}}}}]}',
    "latency batch not a number": '{"stages": [{"latency": {"pytorch": {"\u00b2": {"median_ms": 1}}}}]}',
    "int8 check without rel_diff": '{"stages": [{"int8_check": {"samples": 3, "split": "val", "cpu": "x"}}]}',
    "layer sparsity a string": '{"stages": [{"layers": [{"name": "a", "sparsity": "x"}]}, {"layers": []}]}',
    "machine a list": '{"machine": ["x"], "stages": []}',
    "nested 100,000 deep": '{"stages": [], "x": ' + DEEP + "}",
    "not UTF-8": b'{"stages": [], "recipe": "\xff"}',
    "too many stages": json.dumps({"stages": [{"name": "s"}] * 10_000}),
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_compress_report_of_a_malformed_report_json_is_one_line(tmp_path, content):
    f = tmp_path / "report.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    res = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith(f"error: {f}: ")
    assert not (tmp_path / "report.html").exists()


def test_a_one_line_summary_of_the_whole_chain_tops_table_and_page():
    rep = make_report()
    rep["stages"].append(dict(rep["stages"][1], name="quantize", index=2, size_bytes=256, latency=lat(0.15, 1.3),
                              metrics={"accuracy": 0.946}))
    line = "Overall: 16.0x smaller, 1.30x faster in ONNX Runtime at batch 1, -0.40 points top-1 (2: quantize against 0: train)."
    assert format_table(rep).splitlines()[0] == line
    assert f'<p class="summary"><strong>{line}</strong></p>' in render_html(rep)
    slower = dict(rep, stages=[rep["stages"][0], dict(rep["stages"][2], latency=lat(0.3, 0.5), metrics={"rmse": 0.5})])
    slower["stages"][0] = dict(slower["stages"][0], metrics={"rmse": 0.25})
    assert format_table(slower).splitlines()[0] == (
        "Overall: 16.0x smaller, 2.00x slower in ONNX Runtime at batch 1, +0.2500 RMSE (2: quantize against 0: train).")


def test_the_layer_plot_names_layers_by_module_path_and_leaves_out_untouched_ones():
    rep = make_report()
    rep["stages"][1]["layers"] = [
        {"name": "features.0", "type": "Conv2d", "shape": [6, 1, 5, 5], "sparsity": 0.5},
        {"name": "classifier.1", "type": "Linear", "shape": [10, 84], "sparsity": 0.0}]
    page = render_html(rep)
    assert ('alt="Per-layer sparsity; not shown, 0% in every row: classifier.1 (Linear 10x84); '
            'layers: features.0 (Conv2d 6x1x5x5)"') in page


def test_the_page_templates_ship_with_the_package():
    cfg = configparser.ConfigParser()
    cfg.read(Path(compress.__file__).parents[1] / "setup.cfg")
    patterns = cfg["options.package_data"]["compress"].split()
    templates = sorted((Path(compress.__file__).parent / "templates").iterdir())
    assert {"base.html", "report.html", "search.html"} <= {t.name for t in templates}
    assert all(any(t.match(f"compress/{p}") for p in patterns) for t in templates)
