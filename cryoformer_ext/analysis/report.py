"""``summary.json`` and ``report.txt`` of an analysis, and the removal of files an earlier run left.

A rerun into the same folder replaces the previous analysis; maps of the previous run that this one did
not make (e.g. ``class_010.mrc`` after a rerun with k = 8) would otherwise be mistaken for results.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cryoformer_ext.analysis.ledger import OutputLedger
from cryoformer_ext.formats.atomic import atomic_write_text

SUMMARY_FORMAT = "cryoformer-analysis/1"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.txt"

_OWNED_PATTERNS = ("consensus.mrc", "flexibility.mrc", "occupancy_mask.mrc", "solvent_mask.mrc", "attention_*.mrc", "kmeans/class_*.mrc", "kmeans/*.npy",
                   "kmeans/*.txt", "pc*/pc*_*.mrc", "plots/*.png", "pca_coords.npy", "umap.npy",
                   "kmeans_labels.txt", "flexibility_latents.txt", "z.pkl", "chimerax/*.cxc")


def remove_stale(ledger: OutputLedger, log: Callable[[str], Any]) -> None:
    """Delete the files an analysis makes that this run did not write."""
    out_dir = ledger.out_dir
    keep = set(ledger.written) | {(out_dir / SUMMARY_FILE).resolve(), (out_dir / REPORT_FILE).resolve()}
    for pattern in _OWNED_PATTERNS:
        for p in out_dir.glob(pattern):
            if p.is_file() and p.resolve() not in keep:
                p.unlink()
                log(f"analysis: removed stale {p.relative_to(out_dir)} from an earlier run")


def summary_record(ledger: OutputLedger, *, head: dict[str, Any], sections: dict[str, Any],
                   loss_history: list[float] | None) -> dict[str, Any]:
    """The summary: ``head`` (counts, box, settings, consensus), the steps' ``sections`` (pca, pc_series,
    kmeans, umap, flexibility, attention, occupancy_mask, solvent_mask), then every map, plot and file."""
    all_files = [ledger.relative(p) for p in ledger.written] + [SUMMARY_FILE, REPORT_FILE]
    return {
        "format": SUMMARY_FORMAT,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **head,
        **sections,
        "loss_history": [float(x) for x in loss_history] if loss_history else None,
        "maps": [{**m.model_dump(mode="json"), "path": ledger.relative(m.path)} for m in ledger.maps],
        "plots": [ledger.relative(p) for p in ledger.plots],
        "files": all_files,
        "timings_s": {k_: round(v, 3) for k_, v in ledger.timings.items()},
    }


def write_summary(ledger: OutputLedger, summary: dict[str, Any]) -> tuple[Path, Path]:
    summary_file = ledger.out_dir / SUMMARY_FILE
    report_file = ledger.out_dir / REPORT_FILE
    atomic_write_text(summary_file, json.dumps(summary, indent=2, default=json_default) + "\n")
    atomic_write_text(report_file, render_report(summary))
    return summary_file, report_file


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def render_report(s: dict[str, Any]) -> str:
    """``report.txt``: the summary as a person reads it, one line per fact, the files and the timings."""
    L: list[str] = []
    L.append("cryoFormer analysis report")
    L.append("=" * 26)
    L.append(f"created: {s['created']}")
    L.append(f"particles: {s['n_particles']}   latent dimensions: {s['zdim']}")
    L.append(f"maps: box {s['map_box']}, {s['map_pixel_size_A']:.4f} Å/voxel")
    if s.get("solvent_mask"):
        m = s["solvent_mask"]
        L.append(f"solvent_mask.mrc: {m['fraction_above_half']:.1%} of the box above 0.5 (threshold {m['threshold']:.4g}, "
                 f"extend {m['extend_px']:g} px, soft edge {m['soft_edge_px']:g} px)")
    a = s["analysis_settings"]
    L.append(f"settings: k={a['k']} pcs={a['n_pcs']} pc_steps={a['pc_steps']} seed={a['seed']} "
             f"flexibility samples={a['n_flex']}")
    plain = {k: v for k, v in s["job_settings"].items() if not isinstance(v, dict)}
    if plain:
        L.append("job: " + " ".join(f"{k}={v}" for k, v in plain.items()))
    for key, sub in s["job_settings"].items():
        if isinstance(sub, dict):
            L.append(f"{key}: " + " ".join(f"{k}={v}" for k, v in sub.items() if not isinstance(v, (dict, list))))
    L.append("")
    c = s["consensus"]
    L.append(f"consensus.mrc: {c['latent_choice']}" + (f" (particle {c['particle']})" if c["particle"] is not None else ""))
    if s["loss_history"]:
        lh = s["loss_history"]
        L.append(f"training loss: {len(lh)} epochs, first {lh[0]:.5g}, last {lh[-1]:.5g}")
    if s["pca"]:
        evr = s["pca"]["explained_variance_ratio"]
        L.append("PCA explained variance: " + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr[:8])))
    for p in s["pc_series"]:
        L.append(f"{p['folder']}/: {len(p['coords'])} maps along PC{p['pc']} from the {p['percentiles'][0]:g}th to the "
                 f"{p['percentiles'][1]:g}th percentile")
    if s["kmeans"]:
        km = s["kmeans"]
        L.append(f"k-means: k={km['k']} (classes numbered along PC1), labels in {km['labels_file']}")
        n = max(1, s["n_particles"])
        for i, (size, part) in enumerate(zip(km["sizes"], km["center_particles"])):
            L.append(f"  kmeans/class_{i + 1:03d}.mrc  {size:8d} particles ({size / n:6.1%})  map from particle {part}")
        if "map_correlation" in km and len(km["sizes"]) > 1:
            m = np.asarray(km["map_correlation"])
            off = m[~np.eye(len(m), dtype=bool)]
            L.append(f"  map correlation between classes: min {off.min():.3f}, median {np.median(off):.3f}")
    if s["umap"]["file"]:
        L.append("UMAP embedding: umap.npy")
    elif s["zdim"] >= 2 and not s["umap"]["available"]:
        L.append("UMAP: skipped (umap-learn could not be imported)")
    if s["flexibility"]:
        f = s["flexibility"]
        L.append(f"flexibility.mrc: std over {f['n_latents']} particle maps; peak {f['max']:.4g} at voxel "
                 f"(z,y,x)={tuple(f['max_voxel_zyx'])}, {f['max_relative_to_consensus']:.1%} of the consensus density")
    if s["attention"]:
        at = s["attention"]
        frac = np.asarray(at["density_fraction_per_token"])
        top = np.argsort(-frac)[:5]
        L.append(f"attention_argmax.mrc: {at['n_tokens']} tokens; most density owned by tokens "
                 + ", ".join(f"{int(t)} ({frac[t]:.0%})" for t in top))
    L.append("")
    L.append("files:")
    L.extend(f"  {f}" for f in s["files"])
    L.append("")
    L.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in s["timings_s"].items()))
    return "\n".join(L) + "\n"
