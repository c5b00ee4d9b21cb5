"""Text data on real, offline text: MovieLens-100K titles -> "is it a Drama", through recipes/text_bert_tiny.yaml.

    .venv/bin/python -m benchmarks.movielens_titles [--seeds 0 1 2] [--threads 1]

The recipe's ``movielens_titles`` dataset reads u.item in place (text = the title, label = Drama / other).
This script runs the recipe once per seed and prints its report table plus two baselines on the same
test split: the training split's majority class (always answered), and scikit-learn's TF-IDF + logistic
regression (what the titles say about the genre without a transformer).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import ROOT, data_dir, machine_line, markdown_table
from compress.data import create_data
from compress.data.bundle import split_rows
from compress.data.text import read_titles
from compress.pipeline import Pipeline
from compress.report import format_table

OUT = ROOT / "runs" / "movielens_titles"


def majority_baseline(data) -> float:
    """Test accuracy of always answering the training split's most common class (the test labels pick nothing)."""
    train = [int(data.train[i][1]) for i in range(len(data.train))]
    common = max(set(train), key=train.count)
    return sum(int(data.test[i][1]) == common for i in range(len(data.test))) / len(data.test)


def tfidf_baseline(spec) -> float:
    """Test accuracy of scikit-learn's TF-IDF (character 2-4-grams) + logistic regression on the recipe's
    own split, C picked on the validation split: what a title says about the genre without a transformer."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    rows = read_titles(spec.path, spec.genre)[0]
    train, val, test = split_rows(len(rows), spec)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4))
    fit = vec.fit_transform([texts[i] for i in train])

    def score(model, idx):
        return model.score(vec.transform([texts[i] for i in idx]), [labels[i] for i in idx])

    models = [LogisticRegression(C=c, max_iter=2000).fit(fit, [labels[i] for i in train]) for c in (0.3, 1.0, 3.0)]
    return score(max(models, key=lambda m: score(m, val)), test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads thrash and run far slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_dir()  # exports COMPRESS_DATA_DIR, which the recipe's data.path names
    summary = []
    for seed in args.seeds:
        overrides = [f"seed={seed}", f"data.split_seed={seed}"]
        pipe = Pipeline.from_yaml(ROOT / "recipes" / "text_bert_tiny.yaml", overrides)
        data = create_data(pipe.recipe.data)
        majority = majority_baseline(data)
        t0 = time.time()
        report = pipe.run(OUT / f"seed{seed}", force=True)
        print(format_table(report))
        accs = [r["metrics"]["accuracy"] for r in report["stages"]]
        summary.append([seed, f"{100 * majority:.1f}%", f"{100 * tfidf_baseline(pipe.recipe.data):.1f}%"] + [f"{100 * a:.1f}%" for a in accs] + [f"{time.time() - t0:.0f} s"])
        names = [f"{r['index']}: {r['name']}" for r in report["stages"]]
    print()
    print(f"{len(data.test)} test titles; data.vocab_size {data.vocab_size}; classes {data.classes}")
    print(markdown_table(["seed", "majority class (train)", "TF-IDF + LR"] + names + ["run"], summary))
    print(machine_line())


if __name__ == "__main__":
    main()
