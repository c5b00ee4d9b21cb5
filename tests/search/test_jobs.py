"""``--jobs 2``: two worker processes on one study give the trials one worker gives, for the random sampler.

What is guaranteed: the k-th trial asked gets the k-th sampler seed (asking is serialised by a lock), so a
sampler whose proposal depends only on its seed (``random``; TPE and NSGA-II during their first, random
trials) proposes the same values whatever the number of workers. What is not: TPE and NSGA-II after those
condition on the trials *finished* when a trial is asked, and with two workers the other's trial is often
still running; fidelity promotion likewise compares with the full-budget trials finished so far. Optuna
says the same of its samplers under parallel optimization.
"""
import json

import pytest

from compress.search.engine import search

pytest.importorskip("optuna")


def _trials(res):
    return sorted((json.dumps(r["params"], sort_keys=True), round(r["accuracy"], 6), r["size"]) for r in res.rows)


def test_two_workers_run_the_trials_one_worker_runs(search_doc, tmp_path):
    search_doc["search"].update(trials=3, sampler="random", fidelity={"enabled": False})
    one = search(search_doc, out=tmp_path / "one", log=lambda *_: None)
    two = search(search_doc, out=tmp_path / "two", jobs=2, log=lambda *_: None)
    assert len(two.rows) == 3 and _trials(two) == _trials(one)
    assert two.reuse["stage_runs"].get("0:train") == 1 and two.reuse["hits"] >= 4  # 3 trials + the worker's baseline: both load the teacher
    assert not list((tmp_path / "two" / "cache").glob(".*"))  # no half-written cache entry left behind
