import re
from pathlib import Path
from types import SimpleNamespace

from compress.search.page import write_page

ATTACKS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '"><svg onload=alert(1)>']
HOSTILE = "$\\frac{$" + "".join(ATTACKS)  # '$...$': matplotlib would parse it as a formula in the plot labels


def test_search_page_escapes_every_value_from_the_study_and_forbids_scripts(tmp_path):
    row = {"trial": HOSTILE, "fidelity": "full", "accuracy": 0.9, "latency": 1.5, "size": 2048, "feasible": HOSTILE,
           "misses": [HOSTILE], "params": {HOSTILE: HOSTILE}}
    res = SimpleNamespace(out=Path(HOSTILE), rows=[row], front=[row], chosen=None, closest=[row], test={"x": HOSTILE},
                          compare=None, baseline={"higher_better": True, "accuracy": 0.95, "metric": HOSTILE},
                          reuse={HOSTILE: 1}, seconds=HOSTILE, message=HOSTILE)
    cfg = SimpleNamespace(backend=SimpleNamespace(name="onnxruntime", batch_size=1),
                          constraints=SimpleNamespace(max_drop=None, speedup=None, max_latency_ms=None, max_size=None))
    page = write_page(res, cfg, tmp_path / "search.html").read_text()
    for attack in ATTACKS:
        assert attack not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert ("""<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; """
            """style-src 'unsafe-inline';""") in page
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(srcs) == 2 and all(src.startswith("data:image/png;base64,") for src in srcs)  # latency and size plots
