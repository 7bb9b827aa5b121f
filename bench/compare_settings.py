"""Side by side: cryoFormer runs of the suite with different job settings, per epoch and in wall time.

Each input is a ``suite_<tag>.json`` written by ``bench/bench_vs_cryodrgn.py --suite ... --methods
cryoformer --tag <tag> --cf-job JOB`` (one dataset, one training box per file, or several). Runs are
grouped by dataset and training box; the first label given is the reference. Two questions a setting must
answer before it becomes a default:

* per epoch: are its latent and map scores as good as the reference's after the same number of images?
* in wall time: how many seconds does it take to reach the reference's final score, and where is each
  run after the shortest run's seconds?

    python bench/compare_settings.py --out bench/results/settings_fast.md \\
        default=bench/results/suite_def_c.json fast=bench/results/suite_x_c.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.suite.report import time_to  # noqa: E402

SCORES = ("spearman", "cv_r2", "knn_accuracy", "moving_corr", "fsc_auc")


def run_seed(run: dict) -> int:
    """The training seed, from the child command the run recorded (runs of different seeds are not compared)."""
    words = run["command"].split()
    return int(words[words.index("--seed") + 1]) if "--seed" in words else 0


def load_runs(specs: list[str]) -> dict[tuple[str, int, int], dict[str, dict]]:
    """``label=path`` specs -> {(dataset, train box, seed): {label: run}} (cryoFormer runs only)."""
    grouped: dict[tuple[str, int, int], dict[str, dict]] = {}
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"expected LABEL=PATH, got {spec!r}")
        for run in json.loads(Path(path).read_text())["runs"]:
            if run["method"] == "cryoformer":
                grouped.setdefault((run["dataset"], run["train_box"], run_seed(run)), {})[label] = run
    return grouped


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def per_epoch_rows(runs: dict[str, dict]) -> list[str]:
    """One row per epoch: each run's |Spearman| / CV R^2 / kNN / moving CC and its cumulative seconds."""
    labels = list(runs)
    rows = ["| epoch | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    n = max(len(r["epochs"]) for r in runs.values())
    for e in range(n):
        cells = []
        for lab in labels:
            eps = runs[lab]["epochs"]
            if e >= len(eps):
                cells.append("")
                continue
            ep = eps[e]
            cells.append(" / ".join(_fmt(ep.get(k)) for k in SCORES[:4]) + f" ({ep['cum_train_s']:.0f} s)")
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return rows


def wall_time_rows(runs: dict[str, dict]) -> list[str]:
    """Seconds each run needs to reach the reference's final score, for each score the dataset has."""
    labels = list(runs)
    ref = runs[labels[0]]
    final = ref["epochs"][-1]
    rows = [f"| score | {labels[0]} final | " + " | ".join(f"{lab}: s to it" for lab in labels) + " |",
            "|---|---|" + "---|" * len(labels)]
    for score in SCORES:
        if final.get(score) is None:
            continue
        secs = [time_to(runs[lab]["epochs"], score, final[score]) for lab in labels]
        cells = ["never" if s is None else f"{s:.0f}" for s in secs]
        rows.append(f"| {score} | {final[score]:.3f} | " + " | ".join(cells) + " |")
    return rows


def equal_time_rows(runs: dict[str, dict]) -> list[str]:
    """Each run's scores at the wall time of the shortest run (its last epoch that ended by then): the
    view a user with a fixed time budget has, whatever each setting costs per epoch."""
    budget = min(r["epochs"][-1]["cum_train_s"] for r in runs.values())
    rows = [f"| run | epochs done by {budget:.0f} s | " + " | ".join(SCORES) + " |", "|---|---|" + "---|" * len(SCORES)]
    for lab, run in runs.items():
        done = [ep for ep in run["epochs"] if ep["cum_train_s"] <= budget + 1e-6]
        last = done[-1] if done else None
        cells = [_fmt(None if last is None else last.get(k)) for k in SCORES]
        rows.append(f"| {lab} | {len(done)} | " + " | ".join(cells) + " |")
    return rows


def report(grouped: dict[tuple[str, int, int], dict[str, dict]]) -> str:
    out = []
    for (dataset, box, seed), runs in sorted(grouped.items()):
        out += [f"## {dataset}, train box {box}, seed {seed}", "",
                "Jobs: " + "; ".join(f"{lab} `{run.get('job', '{}')}`" for lab, run in runs.items()), "",
                "Per epoch: |Spearman| / CV R² / kNN accuracy / moving-region CC (cumulative training s):", ""]
        out += per_epoch_rows(runs) + [""]
        out += ["Wall time to the reference's final score (never: not within these epochs):", ""]
        out += wall_time_rows(runs) + [""]
        if len(runs) > 1:
            out += ["At equal wall time (the shortest run's):", ""] + equal_time_rows(runs) + [""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=suite_<tag>.json; the first label is the reference")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="cryoFormer settings side by side on the suite")
    p.add_argument("--note", default="", help="a paragraph under the command (e.g. how a run's code differed)")
    a = p.parse_args()
    text = f"# {a.title}\n\n`python bench/compare_settings.py {' '.join(a.runs)} --out {a.out}`\n\n"
    text += f"{a.note}\n\n" if a.note else ""
    a.out.write_text(text + report(load_runs(a.runs)))
    print(a.out.read_text())


if __name__ == "__main__":
    main()
