"""Suite results: one JSON of every run, the headline table (wall time to cryoDRGN's final quality) and
plots of each score against training wall time.

The headline, per dataset, training box and score: cryoDRGN's final value (its last epoch), the
cumulative training seconds each method needs to first reach it, and cryoFormer's time over cryoDRGN's
(< 1: cryoFormer is faster to cryoDRGN's result; "never": it did not reach it in its epochs).
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

# the cross-validated R² of a linear map from the latent to the true coordinates does not depend on how
# the latent's principal axes lie, which |Spearman(PC, t)| does: on a 2-D manifold of two motions with
# similar variance the PCs mix them and the Spearman swings from epoch to epoch while R² rises steadily
SCORES = [("spearman", "latent |Spearman|"), ("cv_r2", "latent CV R²"), ("knn_accuracy", "kNN state accuracy"),
          ("moving_corr", "moving-region CC"), ("fsc_auc", "FSC-AUC")]


def merge_runs(path: Path, run: dict, command: str) -> dict:
    """Add ``run`` to the results at ``path`` (replacing the same dataset, box and method), atomically
    and under a lock so that runs of single methods can share one file. The lock file stays: removing it
    while a third writer waits would let that writer lock a file that a fourth no longer sees."""
    from cryoformer_ext.formats.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = json.loads(path.read_text()) if path.exists() else empty_results()
        res = with_run(res, run, command)
        atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    return res


def empty_results() -> dict:
    return {"runs": [], "commands": []}


def with_run(res: dict, run: dict, command: str) -> dict:
    """``res`` with ``run`` in place of any run of the same dataset, box and method, and its headline."""
    same = lambda r: (r["dataset"], r["train_box"], r["method"])  # noqa: E731
    commands = res["commands"] + ([command] if command not in res["commands"] else [])
    runs = [r for r in res["runs"] if same(r) != same(run)] + [run]
    return {**res, "runs": runs, "commands": commands, "headline": headline(runs)}


def time_to(epochs: list[dict], key: str, target: float) -> float | None:
    """Cumulative training seconds at the first epoch whose ``key`` reaches ``target`` (None: never)."""
    for e in epochs:
        if e.get(key) is not None and e[key] >= target - 1e-9:
            return e["cum_train_s"]
    return None


def headline(runs: list[dict]) -> list[dict]:
    """Per dataset, training box and score: both methods' time to cryoDRGN's final value, and the ratio."""
    rows = []
    pairs = {(r["dataset"], r["train_box"]) for r in runs}
    for ds, tb in sorted(pairs):
        by = {r["method"]: r for r in runs if (r["dataset"], r["train_box"]) == (ds, tb)}
        if "cryodrgn" not in by:
            continue
        for key, _ in SCORES:
            target = by["cryodrgn"]["epochs"][-1].get(key)
            if target is None:
                continue
            t_d = time_to(by["cryodrgn"]["epochs"], key, target)
            cf = by.get("cryoformer")
            t_f = time_to(cf["epochs"], key, target) if cf else None
            rows.append({"dataset": ds, "train_box": tb, "score": key, "cryodrgn_final": target,
                         "cryodrgn_s": t_d, "cryoformer_s": t_f,
                         "cryoformer_final": cf["epochs"][-1].get(key) if cf else None,
                         "ratio_cryoformer_over_cryodrgn": (t_f / t_d) if (t_f and t_d) else None,
                         "cryoformer_ran": cf is not None})
    return rows


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def headline_lines(rows: list[dict]) -> list[str]:
    lines = ["| dataset | box | score | cryoDRGN final | cryoDRGN s to it | cryoFormer s to it | ratio CF/DRGN | "
             "cryoFormer final |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cf_s = _f(r["cryoformer_s"], ".0f") if r["cryoformer_s"] is not None else ("never" if r["cryoformer_ran"] else "-")
        lines.append(f"| {r['dataset']} | {r['train_box']} | {r['score']} | {_f(r['cryodrgn_final'])} | "
                     f"{_f(r['cryodrgn_s'], '.0f')} | {cf_s} | {_f(r['ratio_cryoformer_over_cryodrgn'], '.2f')} | "
                     f"{_f(r['cryoformer_final'])} |")
    return lines


def epoch_lines(runs: list[dict]) -> list[str]:
    lines = ["| dataset | box | method | epoch | cum. train s | \\|Spearman\\| | CV R² | kNN acc | moving CC | FSC-AUC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["dataset"], r["train_box"], r["method"])):
        for e in r["epochs"]:
            lines.append(f"| {r['dataset']} | {r['train_box']} | {r['method']} | {e['epoch']} | {e['cum_train_s']:.0f} | "
                         f"{_f(e['spearman'])} | {_f(e['cv_r2'])} | {_f(e['knn_accuracy'])} | {_f(e['moving_corr'])} | "
                         f"{_f(e['fsc_auc'])} |")
    return lines


def write_suite_report(path: Path) -> Path:
    """``suite_<tag>.md`` next to the JSON, and one PNG per dataset and training box."""
    from cryoformer_ext.formats.atomic import atomic_write_text

    res = json.loads(path.read_text())
    runs = res["runs"]
    lines = [f"# Suite: cryoFormer vs cryoDRGN at equal training box ({path.stem})", "",
             "Commands: " + "; ".join(f"`{c}`" for c in res["commands"]), "",
             "Runs: " + "; ".join(sorted({f"{r['method']} {r['dataset']} D{r['train_box']} ({r['threads']} thread(s), "
                                           f"{r['date']})" for r in runs})), "",
             "## Time to cryoDRGN's final quality", "", *headline_lines(res["headline"]), "",
             "## Every epoch", "", *epoch_lines(runs), ""]
    md = path.with_suffix(".md")
    atomic_write_text(md, "\n".join(lines))
    for ds, tb in sorted({(r["dataset"], r["train_box"]) for r in runs}):
        plot_pair([r for r in runs if (r["dataset"], r["train_box"]) == (ds, tb)],
                  path.with_name(f"{path.stem}_{ds}_D{tb}.png"), f"{ds}, training box {tb}")
    return md


def plot_pair(runs: list[dict], out: Path, title: str) -> None:
    """Each score against cumulative training wall time, both methods on one panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"no plot: {err}")
        return
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4.0 * len(SCORES), 3.4))
    for ax, (key, label) in zip(axes, SCORES):
        for r in runs:
            pts = [(e["cum_train_s"] / 60, e[key]) for e in r["epochs"] if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=r["method"])
        if not ax.lines:   # a score this kind has none of (an assembly has no order, hence no Spearman)
            ax.text(0.5, 0.5, "not defined for this kind", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("training wall time (min)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    with_lines = [ax for ax in axes if ax.lines]
    if with_lines:
        with_lines[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def combine(out: Path, sources: list[Path]) -> Path:
    """One suite file from the runs of several (later files replace a run of the same dataset, box and
    method), with its report: e.g. cryoDRGN's runs of one comparison beside cryoFormer's runs of a newer
    default made with ``--methods cryoformer``. Each source's commands are kept."""
    from cryoformer_ext.formats.atomic import atomic_write_text

    res = empty_results()
    for src in sources:
        part = json.loads(src.read_text())
        for run in part["runs"]:
            res = with_run(res, run, "; ".join(part["commands"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=2) + "\n")
    return write_suite_report(out)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=combine.__doc__)
    p.add_argument("out", type=Path, help="suite_<tag>.json to write (its .md and plots beside it)")
    p.add_argument("sources", type=Path, nargs="+", help="suite_<tag>.json files whose runs it takes, in order")
    a = p.parse_args()
    print(combine(a.out, a.sources))


if __name__ == "__main__":
    main()
