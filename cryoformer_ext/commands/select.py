"""``cryoformer select JOB``: a particle subset, written in the input's own format, for the next refinement.

Choose particles by k-means class (``--classes 1,3``), by a range on a principal component
(``--pc 1 --range -1.5 0.3``) or inside a polygon on the PC1/PC2 plot (``--polygon verts.txt``);
``--invert`` keeps the others. Written into ``--out``:

* ``particles.star`` from a particle STAR file (the job's ``particles.star`` by default): every column and
  the optics table kept; ``particles.cs`` + ``particles.csg`` from a cryoSPARC ``.cs`` (the offline mode's
  ``cryoformer_particles.cs`` by default): every field kept. ``--input FILE`` (repeatable) names other
  files with the same particles in the same order, e.g. the RELION and the cryoSPARC copy of one set;
* ``indices.txt`` (0-based, input order) and ``indices.pkl`` (cryoDRGN's ``--ind`` format);
* ``selection.json``: the criterion, the counts and the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from cryoformer_ext.analysis import selection as sel
from cryoformer_ext.formats import subsets as subset_io
from cryoformer_ext.formats.cryodrgn import write_ind_pkl
from cryoformer_ext.jobdir import (OFFLINE_PARTICLES_STEM, PARTICLES_FILE, JobFiles, JobFilesError, load_job_files,
                                   parse_int_list)
from cryoformer_ext.formats.atomic import atomic_write_text

STAR_OUT = PARTICLES_FILE
CS_STEM = "particles"
OFFLINE_PARTICLES = OFFLINE_PARTICLES_STEM + ".cs"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "select", help="write a particle subset (by k-means class, PC range or PC1/PC2 polygon) as STAR or .cs",
        description="Select particles of a finished job and write them in the input's own format "
                    "(RELION particles.star with every column and the optics table; cryoSPARC .cs + .csg with "
                    "every field), plus indices.txt / indices.pkl (0-based).")
    p.add_argument("job_dir", type=Path, help="the job folder (or a cryoSPARC offline output folder)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--classes", help="k-means classes to keep, 1-based as in kmeans/class_001.mrc, e.g. 1,3 or 2-4")
    how.add_argument("--pc", type=int, help="principal component (1-based) for --range")
    how.add_argument("--polygon", type=Path,
                     help="file of PC1 PC2 vertex pairs (one per line; or .npy): keep particles inside")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), dest="pc_range",
                   help="with --pc: keep particles with LO <= coordinate <= HI")
    p.add_argument("--invert", action="store_true", help="keep the particles NOT selected")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--input", type=Path, action="append", default=None, metavar="FILE",
                   help="particle file(s) to subset, .star or .cs, rows in the job's input order "
                        "(default: <job>/particles.star and/or <out folder>/cryoformer_particles.cs)")
    p.add_argument("--analysis", type=Path, default=None,
                   help="analysis folder with kmeans_labels.txt / pca_coords.npy (default: <job>/analysis)")
    p.set_defaults(func=run)
    return p


def choose(job: JobFiles, args: argparse.Namespace) -> sel.Selection:
    if args.pc is None and args.pc_range is not None:
        raise JobFilesError("--range needs --pc")
    if args.classes is not None:
        classes = parse_int_list(args.classes, "--classes")
        mask, what = sel.by_classes(job, classes), f"k-means classes {','.join(map(str, classes))}"
    elif args.pc is not None:
        if args.pc_range is None:
            raise JobFilesError("--pc needs --range LO HI")
        lo, hi = args.pc_range
        mask, what = sel.by_pc_range(job, args.pc, lo, hi), f"{lo:g} <= PC{args.pc} <= {hi:g}"
    else:
        mask, what = sel.by_polygon(job, sel.read_polygon(args.polygon)), f"inside the PC1/PC2 polygon {args.polygon}"
    return sel.finish(mask, what, args.invert)


def default_inputs(job: JobFiles) -> list[Path]:
    found = [p for p in (job.job_dir / STAR_OUT, job.root / OFFLINE_PARTICLES, job.job_dir.parent / OFFLINE_PARTICLES)
             if p.is_file()]
    if not found:
        raise JobFilesError(f"{job.root}: no particle file found ({job.job_dir / STAR_OUT} or "
                            f"{job.root / OFFLINE_PARTICLES}); name one with --input")
    return list(dict.fromkeys(p.resolve() for p in found))


def write_subsets(job: JobFiles, chosen: sel.Selection, inputs: list[Path], out: Path,
                  log=print) -> dict[str, str]:
    """Write the subset of every input file into ``out``; returns {input: output}."""
    kinds = [p.suffix.lower() for p in inputs]
    bad = [str(p) for p, k in zip(inputs, kinds) if k not in (".star", ".cs")]
    if bad:
        raise JobFilesError(f"cannot subset {', '.join(bad)}: particle files must be .star (RELION) or .cs (cryoSPARC)")
    for k in (".star", ".cs"):
        if kinds.count(k) > 1:
            raise JobFilesError(f"more than one {k} input: write them to separate --out folders")
    targets = {p: out / (STAR_OUT if p.suffix.lower() == ".star" else f"{CS_STEM}.cs") for p in inputs}
    for p, target in targets.items():  # every check before the first file is written
        if target.resolve() == Path(p).resolve():
            raise JobFilesError(f"--out {out}: the subset would overwrite its own input {p}; choose another folder")
        n = subset_io.star_row_count(p) if p.suffix.lower() == ".star" else subset_io.cs_row_count(p)
        if n != job.n_particles:
            raise JobFilesError(f"{p}: has {n} particles but the job has {job.n_particles} latents; it is not the "
                                "particle set the job was trained on")
    idx = chosen.array()
    written: dict[str, str] = {}
    for p in inputs:
        if p.suffix.lower() == ".star":
            target = subset_io.write_star_subset(p, idx, out / STAR_OUT)
        else:
            target, _ = subset_io.write_cs_subset(p, idx, out, CS_STEM, title="cryoFormer particle subset",
                                                  description=f"{len(idx)} of {job.n_particles} particles: "
                                                              f"{'not ' if chosen.inverted else ''}{chosen.criterion}")
        written[str(p)] = str(target)
        log(f"select: wrote {target} ({len(idx)} of {job.n_particles} particles)")
    return written


def select_job(job_dir: Path, args: argparse.Namespace, log=print) -> sel.Selection:
    job = load_job_files(job_dir, args.analysis)
    chosen = choose(job, args)
    inputs = [Path(p) for p in args.input] if args.input else default_inputs(job)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_subsets(job, chosen, inputs, out, log=log)
    atomic_write_text(out / "indices.txt", "# particles kept, 0-based, input order\n"
                      + "".join(f"{i}\n" for i in chosen.indices))
    write_ind_pkl(out / "indices.pkl", chosen.array())
    record = {**chosen.model_dump(exclude={"indices"}), "n_selected": len(chosen.indices),
              "job": str(job.job_dir.resolve()), "analysis": str(job.analysis_dir.resolve()), "files": written,
              "indices_file": "indices.txt", "cryodrgn_ind_file": "indices.pkl"}
    atomic_write_text(out / "selection.json", json.dumps(record, indent=2) + "\n")
    log(f"select: {len(chosen.indices)} of {job.n_particles} particles ({'not ' if chosen.inverted else ''}"
        f"{chosen.criterion}) -> {out}")
    return chosen


def run(args: argparse.Namespace) -> int:
    from cryoformer_ext.commands import run_guarded

    return run_guarded("select", lambda: _done(select_job(args.job_dir, args, log=lambda m: print(m, flush=True))),
                       expected=(JobFilesError, subset_io.SubsetError, ValueError, FileNotFoundError))


def _done(_: object) -> int:
    """The command's result is in its files; its exit status is success."""
    return 0
