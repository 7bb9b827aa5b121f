"""``cryoformer eval JOB``: maps at chosen latents (cryoDRGN's ``eval_vol`` and ``graph_traversal``).

Latents, one way per call:

* ``--z FILE``: rows of latents (``.npy``, or text with one latent per line);
* ``--particles 12,345``: the latents of those particles (0-based, rows of ``latents.npy``);
* ``--classes 1,3``: the k-means classes' maps (1-based; the latent of the particle nearest each centre,
  so they reproduce ``analysis/kmeans/class_001.mrc`` ...);
* ``--path A B --steps N``: N latents on the straight line from A to B;
* ``--traverse A B [--steps N]``: along the nearest-neighbour graph of the particles' latents from A to
  B (every map is a real particle's latent; see :mod:`cryoformer_ext.analysis.paths`).

A and B are particles (``12`` or ``p12``, 0-based) or classes (``c3``, 1-based). ``--out`` receives the
maps (float32 MRC, voxel size in the header), ``latents.txt`` (one row per map, in map order),
``maps.json`` (what each map is), ``series.cxc`` (ChimeraX: the maps as one volume series) and, for a
traversal, ``path_particles.txt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict

from cryoformer_ext.formats import chimerax
from cryoformer_ext.analysis import paths as latent_paths
from cryoformer_ext.commands.analyze import AnalyzeError, load_generator
from cryoformer_ext.jobdir import JobFiles, JobFilesError, engine_dir, load_job_files, parse_int_list, read_input_scale
from cryoformer_ext.formats.atomic import atomic_write_text, write_mrc

BATCH = 8  # latents decoded per generator call


class EvalPlan(BaseModel):
    """The latents to decode, their map names and where each came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    mode: str
    z: np.ndarray                      # (K, zdim)
    names: list[str]                   # file stem per map
    particles: list[int | None]        # the particle whose latent it is (None: not a particle's latent)
    info: dict[str, Any] = {}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="maps at chosen latents: particles, classes, a straight path or a traversal on the data",
        description="Decode maps of a finished job at latents given in a file, of particles, of k-means classes, "
                    "on a straight line between two particles/classes, or along the nearest-neighbour graph of "
                    "the particles' latents (cryoDRGN graph_traversal). End points A B: particle 12 or p12 "
                    "(0-based), class c3 (1-based).")
    p.add_argument("job_dir", type=Path, help="the job folder (or a cryoSPARC offline output folder)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--z", type=Path, help="latents, one per row (.npy, or text)")
    how.add_argument("--particles", help="particle indices, 0-based, e.g. 12,345")
    how.add_argument("--classes", help="k-means classes, 1-based, e.g. 1,3")
    how.add_argument("--path", nargs=2, metavar=("A", "B"), help="straight line from A to B (particle or class)")
    how.add_argument("--traverse", nargs=2, metavar=("A", "B"),
                     help="shortest path from A to B through the particles' latents (nearest-neighbour graph)")
    p.add_argument("--steps", type=int, default=None,
                   help="maps along --path (default 10) or --traverse (default: every particle on the path)")
    p.add_argument("--max-neighbors", type=int, default=latent_paths.DEFAULT_MAX_NEIGHBORS,
                   help=f"--traverse: neighbours per particle (default {latent_paths.DEFAULT_MAX_NEIGHBORS})")
    p.add_argument("--avg-neighbors", type=float, default=latent_paths.DEFAULT_AVG_NEIGHBORS,
                   help="--traverse: keep the N x this many shortest links (default "
                        f"{latent_paths.DEFAULT_AVG_NEIGHBORS:g})")
    p.add_argument("--box", type=int, default=None, help="map box (default: the particles' box, at their pixel size)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: the job's latest)")
    p.add_argument("--analysis", type=Path, default=None, help="analysis folder for --classes (default: <job>/analysis)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)
    return p


def read_z_file(path: Path, zdim: int) -> np.ndarray:
    if not path.is_file():
        raise JobFilesError(f"{path}: latent file not found")
    try:
        z = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, comments="#", ndmin=2)
    except ValueError as err:
        raise JobFilesError(f"{path}: not a table of numbers ({err})") from None
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z.reshape(1, -1) if z.size == zdim else z.reshape(-1, 1)
    if z.ndim != 2 or z.shape[1] != zdim or len(z) == 0:
        raise JobFilesError(f"{path}: latents of shape {z.shape}; the model has zdim {zdim} (one latent per row)")
    if not np.isfinite(z).all():
        raise JobFilesError(f"{path}: latents must be finite numbers")
    return z


def _width(n: int) -> int:
    return max(2, len(str(n)))


def plan_particles(job: JobFiles, particles: list[int]) -> EvalPlan:
    idx = [job.check_particle(i) for i in particles]
    return EvalPlan(mode="particles", z=job.latents[idx], names=[f"particle_{i:06d}" for i in idx], particles=idx)


def plan_classes(job: JobFiles, classes: list[int]) -> EvalPlan:
    idx = [job.class_particle(c) for c in classes]
    return EvalPlan(mode="classes", z=job.latents[idx], names=[f"class_{c:03d}" for c in classes], particles=idx,
                    info={"classes": classes, "latent": "particle nearest each k-means centre"})


def plan_path(job: JobFiles, a: str, b: str, steps: int | None) -> EvalPlan:
    ia, ib = job.endpoint(a), job.endpoint(b)
    n = 10 if steps is None else steps
    z = latent_paths.straight_line(job.latents[ia], job.latents[ib], n)
    parts: list[int | None] = [None] * n
    parts[0], parts[-1] = ia, ib
    return EvalPlan(mode="path", z=z, names=[f"path_{i + 1:0{_width(n)}d}" for i in range(n)], particles=parts,
                    info={"from": a, "to": b, "from_particle": ia, "to_particle": ib, "steps": n})


def plan_traverse(job: JobFiles, a: str, b: str, steps: int | None, max_neighbors: int,
                  avg_neighbors: float) -> EvalPlan:
    ia, ib = job.endpoint(a), job.endpoint(b)
    try:
        path = latent_paths.graph_path(job.latents, ia, ib, max_neighbors=max_neighbors, avg_neighbors=avg_neighbors)
    except latent_paths.NoPathError as err:
        raise JobFilesError(str(err)) from None
    picked = latent_paths.resample_path(job.latents, path.particles, steps)
    n = len(picked)
    return EvalPlan(mode="traverse", z=job.latents[picked], names=[f"traverse_{i + 1:0{_width(n)}d}" for i in range(n)],
                    particles=picked, info={"from": a, "to": b, "from_particle": ia, "to_particle": ib,
                                            "graph_path": path.model_dump(), "steps": n})


def make_plan(args: argparse.Namespace, zdim: int) -> EvalPlan:
    if args.steps is not None and args.steps < 2:
        raise JobFilesError(f"--steps {args.steps}: need at least 2")
    if args.z is not None:
        z = read_z_file(Path(args.z), zdim)
        return EvalPlan(mode="z", z=z, names=[f"z_{i + 1:0{_width(len(z))}d}" for i in range(len(z))],
                        particles=[None] * len(z), info={"file": str(args.z)})
    job = load_job_files(args.job_dir, args.analysis)
    if job.latents.shape[1] != zdim:
        raise JobFilesError(f"{job.job_dir}/latents.npy has {job.latents.shape[1]} dimensions, the model {zdim}")
    if args.particles is not None:
        return plan_particles(job, parse_int_list(args.particles, "--particles"))
    if args.classes is not None:
        return plan_classes(job, parse_int_list(args.classes, "--classes"))
    if args.path is not None:
        return plan_path(job, *args.path, args.steps)
    return plan_traverse(job, *args.traverse, args.steps, args.max_neighbors, args.avg_neighbors)


def write_maps(generator, plan: EvalPlan, out: Path, box: int, log: Callable[[str], Any] = print) -> list[Path]:
    """Decode every latent of ``plan`` at ``box`` and write ``<out>/<name>.mrc`` (voxel size from the model)."""
    apix = float(generator.voxel_size_A(box))
    paths: list[Path] = []
    for s in range(0, len(plan.z), BATCH):
        vols = np.asarray(generator.volumes(np.ascontiguousarray(plan.z[s:s + BATCH]), box), dtype=np.float32)
        for j, v in enumerate(vols):
            paths.append(write_mrc(out / f"{plan.names[s + j]}.mrc", v, apix))
    log(f"eval: wrote {len(paths)} maps (box {box}, {apix:.4f} Å/voxel) in {out}")
    return paths


def default_box(jdir: Path, generator, log: Callable[[str], Any] = print) -> int:
    """The particles' box (maps at their box and pixel size, like the job's), else the training box."""
    scale = read_input_scale(jdir)
    if scale is None:
        log(f"eval: {jdir} does not record the particles' box; maps at the training box (use --box)")
        return int(generator.train_box)
    return scale.box


def eval_job(args: argparse.Namespace, log: Callable[[str], Any] = print) -> list[Path]:
    jdir = engine_dir(args.job_dir)
    generator = load_generator(jdir, args.checkpoint, args.device)
    if int(generator.zdim) == 0:
        raise JobFilesError(f"{jdir}: a homogeneous job (zdim 0) has one map only; see analysis/consensus.mrc")
    plan = make_plan(args, int(generator.zdim))
    box = int(args.box or default_box(jdir, generator, log))
    if box < 8 or box % 2:
        raise JobFilesError(f"--box {box}: need an even box of at least 8")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_maps(generator, plan, out, box, log)
    atomic_write_text(out / "latents.txt", "# latent of each map, in map order\n"
                      + "".join(" ".join(f"{x:.7g}" for x in row) + "\n" for row in plan.z))
    if plan.mode == "traverse":
        atomic_write_text(out / "path_particles.txt", "# particles along the path, 0-based\n"
                          + "".join(f"{i}\n" for i in plan.particles))
    title = {"path": "straight latent path", "traverse": "path through the particles' latents"}.get(plan.mode, plan.mode)
    script = chimerax.series_script if len(paths) > 1 else chimerax.side_by_side_script
    chimerax.write_script(out / "series.cxc", script(paths, out, f"cryoFormer eval: {title}"))
    record = {"mode": plan.mode, "job": str(jdir.resolve()), "box": box, "voxel_size_A": generator.voxel_size_A(box),
              **plan.info, "maps": [{"file": p.name, "particle": part, "latent": [float(x) for x in z]}
                                    for p, part, z in zip(paths, plan.particles, plan.z)]}
    atomic_write_text(out / "maps.json", json.dumps(record, indent=2) + "\n")
    return paths


def run(args: argparse.Namespace) -> int:
    from cryoformer_ext.commands import run_guarded

    return run_guarded("eval", lambda: _done(eval_job(args, log=lambda m: print(m, flush=True))),
                       expected=(JobFilesError, AnalyzeError, ValueError, FileNotFoundError))


def _done(_: object) -> int:
    """The command's result is in its files; its exit status is success."""
    return 0
