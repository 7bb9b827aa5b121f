"""``cryoformer analyze <job-dir>``: redo the latent-space analysis of a finished job without retraining.

It reads what the job left behind - ``checkpoints/`` (the trained model), ``latents.npy``,
``job_config.json`` and ``loss_history.json`` - and runs :func:`cryoformer_ext.analysis.analyze.analyze` again,
with other k-means classes, principal components, map box or seed if asked. Defaults come from the job's
own settings, so rerunning with no option and the same seed reproduces the job's own analysis
(same k-means labels, same maps).

Wired into the main CLI by ``cryoformer_ext.commands`` through :func:`add_parser` and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cryoformer_ext.jobdir import ANALYSIS_SUBDIR, CHECKPOINT_DIR, CONFIG_FILE, LATENTS_FILE, LOSS_FILE


class AnalyzeError(RuntimeError):
    """The job folder cannot be analysed; the message says what is missing."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="rerun the latent-space analysis of a finished job (no retraining)",
        description="Recompute PCA, k-means, UMAP (if umap-learn is installed), the consensus, k-means, "
                    "principal-component and flexibility maps, plots and summary of a finished job. "
                    "Options default to the job's own settings (job_config.json).")
    p.add_argument("job_dir", type=Path, help="job folder made by 'cryoformer run' (or a RELION/cryoSPARC job)")
    p.add_argument("--k", type=int, default=None, help="k-means classes (default: the job's kmeans setting)")
    p.add_argument("--pc", type=int, default=None, dest="pcs",
                   help="principal components to make volume series along (default: the job's pcs)")
    p.add_argument("--pc-steps", type=int, default=None, help="maps per principal-component series (default: the job's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for k-means/UMAP/sampling (default: the job's)")
    p.add_argument("--map-box", type=int, default=None, help="box of the output maps (default: the job's map_box, else the particles' box)")
    p.add_argument("--flex-samples", type=int, default=32, help="particle maps behind flexibility.mrc (default 32)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: <job-dir>/{ANALYSIS_SUBDIR}, replacing the previous analysis)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: the latest in <job-dir>/checkpoints)")
    p.add_argument("--device", default=None, help="torch device for decoding maps, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="print only the summary file path")
    p.set_defaults(func=run)
    return p


def load_generator(job_dir: Path, checkpoint: Path | None = None, device: str | None = None):
    """The trained model of a job as a volume generator (a :class:`cryoformer.infer.Reconstruction`)."""
    from cryoformer.infer import Reconstruction, latest_checkpoint

    if checkpoint is None:
        ckdir = job_dir / CHECKPOINT_DIR
        if not ckdir.is_dir():
            raise AnalyzeError(f"{job_dir}: no checkpoints/ folder; is this a cryoFormer job folder?")
        try:
            checkpoint = latest_checkpoint(ckdir)
        except FileNotFoundError as err:
            raise AnalyzeError(f"{job_dir}: {err}") from None
    if not Path(checkpoint).exists():
        raise AnalyzeError(f"checkpoint {checkpoint} does not exist")
    return Reconstruction.load(checkpoint, device=device)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnalyzeError(f"{path}: not valid JSON ({err})") from None


def default_out_dir(job_dir: Path) -> Path:
    """``<job>/analysis``; or the job folder itself when an earlier analysis was written there."""
    sub = job_dir / ANALYSIS_SUBDIR
    root_summary = job_dir / "summary.json"
    if not sub.exists() and root_summary.exists():
        try:
            if json.loads(root_summary.read_text()).get("format", "").startswith("cryoformer-analysis"):
                return job_dir
        except (json.JSONDecodeError, AttributeError):
            pass
    return sub


def analyze_job(job_dir: Path, *, k: int | None = None, pcs: int | None = None, pc_steps: int | None = None,
                seed: int | None = None, map_box: int | None = None, out: Path | None = None,
                checkpoint: Path | None = None, device: str | None = None, flex_samples: int = 32, log=print):
    """Rerun the analysis of ``job_dir``; returns the :class:`~cryoformer_ext.analysis.analyze.AnalysisResult`."""
    from cryoformer_ext.analysis.analyze import analyze

    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        raise AnalyzeError(f"{job_dir}: not a folder")
    cfg: dict[str, Any] = {}
    if (job_dir / CONFIG_FILE).exists():
        cfg = _read_json(job_dir / CONFIG_FILE)
        if not isinstance(cfg, dict):
            raise AnalyzeError(f"{job_dir / 'job_config.json'}: expected a JSON object")
    else:
        log(f"analyze: {job_dir}/job_config.json not found; using default settings")
    loss = None
    if (job_dir / LOSS_FILE).exists():
        loss = _read_json(job_dir / LOSS_FILE)
        if isinstance(loss, dict):  # tolerate {"loss": [...]} forms
            loss = loss.get("loss") or loss.get("loss_history")
        loss = [float(x) for x in loss] if loss else None

    gen = load_generator(job_dir, checkpoint, device)
    if loss is None and getattr(gen, "loss_history", None):
        loss = list(gen.loss_history)
    zdim = int(gen.zdim)
    latents = None
    lat_file = job_dir / LATENTS_FILE
    if zdim > 0:
        if not lat_file.exists():
            raise AnalyzeError(f"{job_dir}: no latents.npy; the job has not finished (resume it to write the latents)")
        latents = np.load(lat_file)
        if latents.ndim != 2 or latents.shape[1] != zdim:
            raise AnalyzeError(f"{lat_file}: shape {latents.shape} does not match the model's zdim {zdim}")

    def pick(value, key, default):
        if value is not None:
            return value
        return default if cfg.get(key) is None else cfg[key]

    out_dir = Path(out) if out is not None else default_out_dir(job_dir)
    return analyze(latents, gen, out_dir, k=pick(k, "kmeans", 10), n_pcs=pick(pcs, "pcs", 2),
                   pc_steps=pick(pc_steps, "pc_steps", 10), seed=pick(seed, "seed", 0),
                   map_box=pick(map_box, "map_box", _particle_box(job_dir, log)), loss_history=loss,
                   mask_settings=_mask_settings(cfg),
                   settings={"job": cfg, "reanalysis_of": str(job_dir.resolve())}, log=log,
                   n_flex=flex_samples)


def _particle_box(job_dir: Path, log) -> int | None:
    """The particles' box (the maps' default), or None (the training box) for a job that did not record it."""
    from cryoformer_ext.jobdir import read_input_scale

    scale = read_input_scale(job_dir)
    if scale is None:
        log(f"analyze: {job_dir} does not record the particles' box; maps at the training box (use --map-box)")
        return None
    return scale.box


def _mask_settings(cfg: dict[str, Any]):
    from cryoformer_ext.analysis.solvent_mask import SoftMaskSettings

    names = {"mask_threshold": "threshold_fraction", "mask_extend": "extend_px", "mask_soft_edge": "soft_edge_px"}
    return SoftMaskSettings(**{ours: cfg[key] for key, ours in names.items() if cfg.get(key) is not None})


def _analyze(args: argparse.Namespace) -> int:
    log = (lambda msg: None) if getattr(args, "quiet", False) else (lambda msg: print(msg, flush=True))
    res = analyze_job(args.job_dir, k=args.k, pcs=args.pcs, pc_steps=args.pc_steps, seed=args.seed,
                      map_box=args.map_box, out=args.out, checkpoint=args.checkpoint, device=args.device,
                      flex_samples=args.flex_samples, log=log)
    print(res.summary_file)
    return 0


def run(args: argparse.Namespace) -> int:
    from cryoformer_ext.commands import run_guarded

    return run_guarded("analyze", lambda: _analyze(args), expected=(AnalyzeError, ValueError, FileNotFoundError))


def main(argv: list[str] | None = None) -> int:  # standalone use: python -m cryoformer_ext.commands.analyze JOB
    parser = argparse.ArgumentParser(prog="cryoformer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
