"""Two cryoFormer runs of the same suite data, epoch by epoch: does a change learn as well per epoch?

For every dataset in both result files (``suite_<tag>.json`` from ``bench_vs_cryodrgn.py``), the epoch
at which the latent first finds the motion (|Spearman(PC1, t)| >= 0.3; >= 0.8 on adenylate kinase, whose
PC1 follows it early; kNN state accuracy >= 0.6 on the assembly, which has no single coordinate), the
last epoch's scores, and per score the largest shortfall and the largest lead of B against A over the
epochs, with when (the most negative and the most positive B - A).
Scores only, no times: runs measured two at a time differ in seconds, not in what an epoch learns.

    python bench/suite/compare_epochs.py A.json B.json --labels fp32 bf16 --out bench/results/X.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCORES = ["spearman", "cv_r2", "knn_accuracy", "moving_corr", "fsc_auc"]
SHORT = {"spearman": "Spearman", "cv_r2": "CV R²", "knn_accuracy": "kNN", "moving_corr": "moving CC", "fsc_auc": "FSC-AUC"}


def cryoformer_runs(path: Path) -> dict[str, dict]:
    return {r["dataset"]: r for r in json.loads(path.read_text())["runs"] if r["method"] == "cryoformer"}


def onset(run: dict) -> int | None:
    kind = run["dataset"][0]
    score, bar = ("knn_accuracy", 0.6) if kind == "b" else ("spearman", 0.8 if kind == "e" else 0.3)
    return next((e["epoch"] for e in run["epochs"] if (e.get(score) or 0) >= bar), None)


def last(run: dict) -> str:
    e = run["epochs"][-1]
    return " / ".join("-" if e.get(k) is None else f"{e[k]:.3f}" for k in SCORES)


def extremes(a: dict, b: dict, pick=min) -> str:
    """Per score, the most negative (``min``) or most positive (``max``) B - A over the epochs, and when."""
    parts = []
    for k in SCORES:
        diffs = [(eb[k] - ea[k], ea["epoch"]) for ea, eb in zip(a["epochs"], b["epochs"])
                 if ea.get(k) is not None and eb.get(k) is not None]
        if diffs:
            worst = pick(diffs)
            parts.append(f"{SHORT[k]} {worst[0]:+.3f} ({worst[1]})")
    return "; ".join(parts)


def table(a_path: Path, b_path: Path, labels: tuple[str, str]) -> str:
    a_runs, b_runs = cryoformer_runs(a_path), cryoformer_runs(b_path)
    la, lb = labels
    lines = [f"A = {la} (`{a_path.name}`), B = {lb} (`{b_path.name}`); last epoch: "
             + " / ".join(SHORT[k] for k in SCORES), "",
             f"| dataset | onset epoch {la} / {lb} | last epoch {la} | last epoch {lb} | largest shortfall of {lb} "
             f"(epoch) | largest lead of {lb} (epoch) |", "|---|---|---|---|---|---|"]
    for ds in sorted(set(a_runs) & set(b_runs)):
        a, b = a_runs[ds], b_runs[ds]
        lines.append(f"| {ds} | {onset(a)} / {onset(b)} | {last(a)} | {last(b)} | {extremes(a, b)} "
                     f"| {extremes(a, b, max)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--labels", nargs=2, default=("A", "B"))
    p.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = p.parse_args()
    text = table(args.a, args.b, tuple(args.labels))
    print(text)
    if args.out is not None:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
