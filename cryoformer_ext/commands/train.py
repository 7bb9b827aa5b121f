"""``cryoformer train``: train on a RELION particle STAR file and write latents, maps and particles.star."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryoformer_ext.commands import run_guarded
from cryoformer_ext.commands.options import add_job_options, job_config, log
from cryoformer_ext.jobdir import PARTICLES_FILE


def add_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train on a RELION particle STAR file and write latents, maps, "
                              "particles.star")
    t.add_argument("--particles", required=True, type=Path, help="particle STAR file (RELION 3.0-5.0)")
    t.add_argument("--out", required=True, type=Path, help="output folder (rerun to continue)")
    t.add_argument("--project-dir", type=Path, default=None, help="folder image names are relative to (default: cwd)")
    add_job_options(t)
    t.set_defaults(func=run)
    return t


def _train(args: argparse.Namespace) -> int:
    from cryoformer_ext.formats.star import read_particles_star
    from cryoformer_ext.job.run import run_job

    star = read_particles_star(args.particles, args.project_dir, require_ctf=job_config(args).ctf)
    cfg = job_config(args).for_particles(star.data.has_poses, explicit=args.job_poses is not None)
    log(f"read {star.record.n_particles} particles from {args.particles} (box {star.data.box}, "
        f"{star.data.pixel_size_A:.3f} A/px, poses {'given' if star.data.has_poses else 'absent'})")
    result = run_job(star.data, cfg, args.out, log=log)
    if result is None:  # rank > 0 under torchrun: rank 0 writes the outputs
        return 0
    extra = star.predicted_pose_columns(result.predicted_poses)
    out = star.write(Path(args.out) / PARTICLES_FILE, latents=result.latents, labels=result.labels, extra=extra)
    log(f"wrote {out}" + (" with the predicted orientations" if extra else "")
        + f", {len(result.maps)} maps, summary {result.summary_file}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_guarded("train", lambda: _train(args))
