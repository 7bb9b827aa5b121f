"""Offline mode: a particles ``.cs`` in, ``.cs`` + ``.mrc`` + ``.csg`` result groups out (no server).

Output folder layout (``out``)::

    cryoformer_particles.cs / .csg        every input field and uid unchanged + components_mode_<k>/*
    cryoformer_volume_<map>.cs / .csg     one volume group per published map (map/path = '>cryoformer/...mrc')
    cryoformer/                           the engine's job folder (checkpoints, maps, plots, summary)

The ``.csg`` files are what cryoSPARC's *Import Result Group* job reads. Their metafiles and map paths
start with ``>``: relative to the folder of the ``.csg`` (the convention of cryoSPARC's own exports).
The particles' ``blob/path`` values stay relative to the project directory, so import the group into the
project the particles came from. An exported ``>`` path (relative to the input ``.cs``'s folder) would
point inside ``out`` after the run: it is written as the project-relative path the reader resolved, or,
for a stack outside the project directory, the stack is linked into ``out`` under that ``>`` path.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cryoformer_ext.formats import cs as cs_io
from cryoformer_ext.config import JobConfig
from cryoformer_ext.jobdir import OFFLINE_ENGINE_SUBDIR, OFFLINE_PARTICLES_STEM

if TYPE_CHECKING:  # the engine's result type; the job layer itself is imported when a job runs
    from cryoformer_ext.job.run import JobResult

from .common import Engine, default_engine, map_output, map_title, pose_config, published_maps, solvent_mask

PARTICLES_STEM = OFFLINE_PARTICLES_STEM
ENGINE_DIR = OFFLINE_ENGINE_SUBDIR


@dataclass
class OfflineResult:
    particles_cs: Path | None
    particles_csg: Path | None
    volumes: list[tuple[str, Path, Path]] = field(default_factory=list)  # (output name, .cs, .csg)
    job_result: Any = None
    mask: tuple[Path, Path] | None = None  # the solvent mask group (.cs, .csg)


def _rel_for_csg(path: Path, out_dir: Path) -> str:
    """``>``-relative path of a file under ``out_dir`` (copied in when it lies elsewhere)."""
    path = Path(path).resolve()
    out_dir = out_dir.resolve()
    try:
        rel = path.relative_to(out_dir)
    except ValueError:
        dest = out_dir / "maps" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        rel = dest.relative_to(out_dir)
    return ">" + str(PurePosixPath(*rel.parts))


def portable_blob_paths(dset, project_dir: Path, export_dir: Path, out_dir: Path,
                        log: Callable[[str], Any] = print) -> np.ndarray:
    """``blob/path`` values that still point at the stacks when read beside the output ``.csg``."""
    project = Path(os.path.abspath(project_dir))
    new: dict[str, str] = {}
    for raw in set(dset["blob/path"]):
        rel, exported = cs_io.strip_export_prefix(raw)
        if not exported:
            new[raw] = rel
            continue
        found = Path(os.path.abspath(cs_io.resolve_blob_path(raw, project, export_dir)))
        if found.is_relative_to(project):
            new[raw] = found.relative_to(project).as_posix()
            continue
        link = out_dir / rel  # outside the project: keep '>rel', now relative to out_dir, by a link
        if link.is_symlink() or not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(found)
            log(f"linked {link} -> {found} (a stack outside the project directory)")
        new[raw] = ">" + PurePosixPath(rel).as_posix()
    return np.array([new[p] for p in dset["blob/path"]], dtype=object)


def run_offline(particles_cs: str | os.PathLike, project_dir: str | os.PathLike, out_dir: str | os.PathLike,
                config: JobConfig, *, engine: Engine | None = None, log: Callable[[str], Any] = print,
                should_abort: Callable[[], bool] = lambda: False) -> OfflineResult:
    """Run cryoFormer on a ``.cs`` particle file and write cryoSPARC-importable results into ``out_dir``.

    Raises :class:`cryoformer_ext.formats.cs.CsInputError` (bad input, checked before any training) and
    whatever the engine raises.
    """
    particles_cs = Path(particles_cs)
    out_dir = Path(out_dir)
    dset = cs_io.load_cs(particles_cs)
    parts = cs_io.particles_from_dataset(dset, project_dir, source=str(particles_cs),
                                         export_dir=particles_cs.resolve().parent, use_poses=True,
                                         require_ctf=config.ctf)
    for w in parts.warnings:
        log(f"warning: {w}")
    config, data = pose_config(config, parts.data, log)
    use_poses = data.has_poses
    log(f"{len(data)} particles from {particles_cs}: box {data.box} px, {data.pixel_size_A:.4g} Å/px, "
        f"{len(parts.stack_files)} stack files, poses {'from alignments3D' if use_poses else 'predicted'}")

    out_dir.mkdir(parents=True, exist_ok=True)
    run_job = engine or default_engine()
    result: JobResult = run_job(data, config, out_dir / ENGINE_DIR, log=log, should_abort=should_abort)

    res = OfflineResult(particles_cs=None, particles_csg=None, job_result=result)
    latents = np.asarray(result.latents)
    if latents is not None and latents.ndim == 2 and latents.shape[1] > 0:
        if latents.shape[0] != len(dset):
            raise RuntimeError(f"engine returned {latents.shape[0]} latents for {len(dset)} particles")
        out = cs_io.add_components(dset, latents)
        out["blob/path"][:] = portable_blob_paths(dset, Path(project_dir), particles_cs.resolve().parent, out_dir, log)
        res.particles_cs, res.particles_csg = cs_io.write_group(
            out_dir, PARTICLES_STEM, out, group_name="particles", group_type="particle",
            title="cryoFormer particles",
            description=f"{len(out)} particles with {latents.shape[1]} cryoFormer latent coordinates "
                        "(components_mode_<k>/value)")
        log(f"wrote {res.particles_cs.name} and {res.particles_csg.name} ({latents.shape[1]} latent dimensions)")

    psize = float(result.map_pixel_size_A)
    for rec in published_maps(result.maps):
        name = map_output(rec.name)
        vol = cs_io.volume_dataset(_rel_for_csg(Path(rec.path), out_dir), cs_io.mrc_shape(rec.path), psize)
        cs_path, csg_path = cs_io.write_group(out_dir, f"cryoformer_{name}", vol, group_name=name, group_type="volume",
                                              title=map_title(rec), description=f"cryoFormer map {rec.name}")
        res.volumes.append((name, cs_path, csg_path))
    written = {p for _, cs_path, csg_path in res.volumes for p in (cs_path, csg_path)}
    for stale in sorted(out_dir.glob("cryoformer_volume_*.cs*")):  # groups of an earlier run with other settings
        if stale.suffix in (".cs", ".csg") and stale not in written:
            stale.unlink()
            log(f"removed stale {stale.name} from an earlier run")
    log(f"wrote {len(res.volumes)} volume result groups (.cs + .csg) in {out_dir}")
    mask = solvent_mask(result.maps)
    if mask is not None:
        dset = cs_io.mask_dataset(_rel_for_csg(Path(mask.path), out_dir), cs_io.mrc_shape(mask.path), psize)
        res.mask = cs_io.write_group(out_dir, "cryoformer_mask", dset, group_name="mask", group_type="mask",
                                     title="cryoFormer solvent mask",
                                     description="soft solvent mask (maximum over the consensus and k-means maps)")
        log(f"wrote the solvent mask result group {res.mask[0].name} + .csg")
    return res
