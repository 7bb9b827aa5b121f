"""Latent-space analysis of a trained job: what a user opens after training.

:func:`analyze` turns the per-particle latents and a volume generator (a trained
:class:`cryoformer.infer.Reconstruction`, or anything with the same small interface) into

* ``consensus.mrc`` - the map at the latent of the particle nearest the mean latent (an *observed*
  latent, so it stays on the data manifold even when the latent distribution is curved or multimodal;
  for a homogeneous job, zdim 0, it is the single reconstructed map),
* a PCA of the latents (``pca_coords.npy``) and a volume series along each of the first ``n_pcs``
  principal components (``pc1/pc1_01.mrc`` ...), ``pc_steps`` maps from the 5th to the 95th percentile
  of the particles' coordinate on that component, all other coordinates at the mean,
* k-means (``k`` classes, ``kmeans_labels.txt``) and one map per class at the latent of the particle
  nearest its centre (``kmeans/class_001.mrc`` ...; cryoDRGN's "on-data" choice). Classes are numbered
  along PC1 of their centres so that class 1 -> k follows the main motion,
* ``flexibility.mrc`` - the per-voxel standard deviation of the density over maps decoded from
  ``n_flex`` particles drawn at random: high where the structure moves or is partly occupied,
* ``attention_argmax.mrc`` / ``attention_maxweight.mrc`` - which structure query (0-based token index)
  the decoder's point attention assigns each voxel to at the consensus latent, and with what weight,
* ``solvent_mask.mrc`` - a soft solvent mask (RELION's ``relion_mask_create`` rule,
  :mod:`cryoformer_ext.analysis.solvent_mask`) of the voxel-wise maximum over the consensus and k-means maps, so
  that no state is cut; it is the mask the next RELION or cryoSPARC job takes,
* ``occupancy_mask.mrc`` - the model's occupancy grid (where it renders density at all; an acceleration
  structure with hard cell edges, kept for inspection, not a solvent mask),
* a UMAP embedding (``umap.npy``) for every heterogeneous job with zdim >= 2 (:mod:`cryoformer_ext.analysis.umap_embed`),
* ``z.pkl`` - the latents in cryoDRGN's format, and ChimeraX scripts ``chimerax/*.cxc`` that open the maps
  (:mod:`cryoformer_ext.formats.chimerax`),
* PNG plots in ``plots/`` and ``summary.json`` / ``report.txt`` listing every file, the settings and timings.

All files are written atomically. Rerunning into the same folder replaces the previous analysis and removes
maps of the previous run that this one did not make (e.g. ``class_010.mrc`` after a rerun with k = 8).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict

from cryoformer.lattice import sphere_mask
from cryoformer_ext.analysis import latent as _latent
from cryoformer_ext.analysis import maps as _maps
from cryoformer_ext.analysis import report as _report
from cryoformer_ext.analysis.ledger import MapRecord, OutputLedger
from cryoformer_ext.analysis.maps import PC_PERCENTILES
from cryoformer_ext.analysis.plots import write_analysis_plots
from cryoformer_ext.analysis.report import SUMMARY_FORMAT
from cryoformer_ext.analysis.solvent_mask import SoftMaskSettings
from cryoformer_ext.formats import chimerax as _chimerax
from cryoformer_ext.formats.cryodrgn import write_z_pkl

__all__ = ["AnalysisResult", "MapRecord", "analyze", "PC_PERCENTILES", "SUMMARY_FORMAT"]


class AnalysisResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    out_dir: Path
    zdim: int
    n_particles: int
    map_box: int
    map_pixel_size_A: float
    labels: list[int] | None = None  # k-means class per particle, 0-based, input order
    centers: list[list[float]] | None = None  # k-means centres in latent space (k, zdim)
    center_particles: list[int] | None = None  # particle nearest each centre (its latent made the class map)
    consensus_particle: int | None = None
    consensus_latent: list[float] | None = None
    pca_explained_variance_ratio: list[float] | None = None
    pca_components: list[list[float]] | None = None  # (n_components, zdim), unit rows
    pca_coords_file: Path | None = None
    umap_file: Path | None = None
    maps: list[MapRecord]
    plots: list[Path]
    files: list[Path]  # every file written, absolute
    summary_file: Path
    report_file: Path
    timings_s: dict[str, float]

    def labels_array(self) -> np.ndarray | None:
        return None if self.labels is None else np.asarray(self.labels, dtype=np.int64)

    def maps_of(self, kind: str) -> list[MapRecord]:
        return [m for m in self.maps if m.kind == kind]


def _map_box(generator, k: int, n_pcs: int, pc_steps: int, map_box: int | None) -> int:
    """The output maps' box, after checking the analysis settings (before anything is written)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_pcs < 0 or pc_steps < 2:
        raise ValueError(f"need n_pcs >= 0 and pc_steps >= 2, got n_pcs={n_pcs}, pc_steps={pc_steps}")
    box = int(map_box if map_box is not None else generator.train_box)
    if box < 2:
        raise ValueError(f"map box must be >= 2, got {box}")
    return box


def analyze(latents: np.ndarray | None, generator, out_dir: Path, *, k: int = 10, n_pcs: int = 2,
            pc_steps: int = 10, seed: int = 0, map_box: int | None = None,
            loss_history: list[float] | None = None, settings: dict | None = None,
            log: Callable[[str], Any] = print, n_flex: int = 32, volume_batch: int = 8,
            mask_settings: SoftMaskSettings | None = None) -> AnalysisResult:
    """Analyse the latents of a trained job and write maps, plots, ``summary.json`` and ``report.txt``.

    ``latents`` (N, zdim) are the per-particle posterior means in input order (None or zdim 0 for a
    homogeneous job: only the consensus map, attention maps and the loss plot are made). ``generator`` has
    ``zdim``, ``train_box``, ``volumes(z, box)``, ``voxel_size_A(box)`` and optionally
    ``attention_maps(z, box)``. Deterministic for a given ``seed``. ``map_box`` None = the training box
    (the job passes the particles' box, so that every map is at the particles' box and pixel size);
    ``mask_settings`` set how ``solvent_mask.mrc`` is made.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    box = _map_box(generator, k, n_pcs, pc_steps, map_box)
    ledger = OutputLedger(out_dir, float(generator.voxel_size_A(box)))
    zdim = int(getattr(generator, "zdim", 0) or 0)
    z, n_particles = _latent.checked_latents(latents, zdim)
    if zdim > 0 and z is None:
        log("analysis: no particle latents given; writing the map at the zero latent only")
    log(f"analysis: {n_particles} particles, zdim {zdim}, maps at box {box} ({ledger.apix:.3f} Å/voxel) -> {out_dir}")

    cons_idx, cons_z = _latent.consensus_latent(z, zdim)
    pca = _latent.fit_pca(z, seed, ledger, log) if z is not None and n_particles >= 2 else None
    classes = _latent.fit_kmeans(z, k, seed, pca, ledger, log) if z is not None else None
    umap_coords, umap_info = _latent.embed_umap(z, seed, ledger, log)

    sphere = sphere_mask(box).numpy()
    consensus_vol = _maps.consensus_map(generator, cons_z, box, volume_batch, ledger, log)
    union_vol = consensus_vol.copy()  # voxel-wise maximum over the states: the solvent mask's map
    km_corr = None if classes is None else _maps.class_maps(generator, z, classes, sphere, box, volume_batch,
                                                             union_vol, ledger, log)
    n_states = 1 + (0 if classes is None else len(classes.centers))
    scale = box / float(getattr(generator, "train_box", box))
    mask_info = _maps.solvent_mask_map(union_vol, mask_settings, scale, n_states, ledger, log)
    pc_info, pc_strips = ([], {}) if pca is None or n_pcs == 0 else _maps.pc_series(
        generator, pca, n_pcs, pc_steps, box, volume_batch, ledger, log)
    flex_vol, flex_info = (None, None) if pca is None else _maps.flexibility_map(
        generator, z, consensus_vol, sphere, n_flex, seed, box, volume_batch, ledger, log)
    att_info = _maps.attention_maps(generator, cons_z, consensus_vol, box, ledger, log)

    with ledger.timed("plots"):
        write_analysis_plots(ledger, loss_history=loss_history, pca=pca, classes=classes, umap_coords=umap_coords,
                             km_corr=km_corr, consensus_vol=consensus_vol, flex_vol=flex_vol, pc_strips=pc_strips,
                             seed=seed)
    log(f"analysis: wrote {len(ledger.plots)} plots in plots/")
    _write_viewer_files(ledger, latents, z, n_particles, zdim, log)
    _report.remove_stale(ledger, log)
    occ_info = _maps.occupancy_mask_map(generator, box, ledger, log)

    ledger.timings["total"] = time.perf_counter() - t_start
    head = _summary_head(n_particles, zdim, box, ledger.apix, settings, cons_idx, cons_z, z is not None,
                         dict(k=k, n_pcs=n_pcs, pc_steps=pc_steps, seed=seed, map_box=map_box,
                              pc_percentiles=list(PC_PERCENTILES), n_flex=n_flex, volume_batch=volume_batch))
    sections = {"pca": None if pca is None else pca.info, "pc_series": pc_info,
                "kmeans": None if classes is None else classes.info, "umap": umap_info, "flexibility": flex_info,
                "attention": att_info, "occupancy_mask": occ_info, "solvent_mask": mask_info}
    summary = _report.summary_record(ledger, head=head, sections=sections, loss_history=loss_history)
    summary_file, report_file = _report.write_summary(ledger, summary)
    log(f"analysis: done in {ledger.timings['total']:.1f} s; summary in {summary_file}")
    return _result(ledger, summary, n_particles, zdim, box, classes, pca, umap_coords, cons_idx, cons_z,
                   summary_file, report_file)


def _write_viewer_files(ledger: OutputLedger, latents, z: np.ndarray | None, n_particles: int, zdim: int,
                        log: Callable[[str], Any]) -> None:
    """cryoDRGN's ``z.pkl`` (its traversal commands and notebooks read cryoFormer's latents as they are)
    and the ChimeraX scripts that open the maps."""
    if z is not None:
        ledger.record(write_z_pkl(ledger.out_dir / "z.pkl",
                                  np.asarray(latents, dtype=np.float32).reshape(n_particles, zdim)))
    for script in _chimerax.write_analysis_scripts(ledger.out_dir, ledger.maps):
        ledger.record(script)
    log("analysis: wrote ChimeraX scripts in chimerax/")


def _summary_head(n_particles: int, zdim: int, box: int, apix: float, settings: dict | None, cons_idx: int | None,
                  cons_z: np.ndarray | None, hetero: bool, analysis_settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "n_particles": n_particles, "zdim": zdim, "map_box": box, "map_pixel_size_A": apix,
        "analysis_settings": analysis_settings,
        "job_settings": settings or {},
        "consensus": {"file": "consensus.mrc",
                      "latent_choice": ("particle nearest the mean latent" if hetero else
                                        "homogeneous map" if zdim == 0 else "zero latent"),
                      "particle": cons_idx, "latent": None if cons_z is None else [float(x) for x in cons_z]},
    }


def _result(ledger: OutputLedger, summary: dict[str, Any], n_particles: int, zdim: int, box: int, classes, pca,
            umap_coords: np.ndarray | None, cons_idx: int | None, cons_z: np.ndarray | None,
            summary_file: Path, report_file: Path) -> AnalysisResult:
    out_dir = ledger.out_dir
    return AnalysisResult(
        out_dir=out_dir.resolve(), zdim=zdim, n_particles=n_particles, map_box=box, map_pixel_size_A=ledger.apix,
        labels=None if classes is None else [int(x) for x in classes.labels],
        centers=None if classes is None else classes.centers.tolist(),
        center_particles=None if classes is None else [int(i) for i in classes.center_particles],
        consensus_particle=cons_idx, consensus_latent=None if cons_z is None else [float(x) for x in cons_z],
        pca_explained_variance_ratio=None if pca is None else pca.info["explained_variance_ratio"],
        pca_components=None if pca is None else pca.info["components"],
        pca_coords_file=(out_dir / "pca_coords.npy").resolve() if pca is not None else None,
        umap_file=(out_dir / "umap.npy").resolve() if umap_coords is not None else None,
        maps=ledger.maps, plots=[p.resolve() for p in ledger.plots],
        files=[(out_dir / f).resolve() for f in summary["files"]],
        summary_file=summary_file.resolve(), report_file=report_file.resolve(),
        timings_s=dict(ledger.timings),
    )
