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
  structure with hard 4-px cells, kept for inspection, not a solvent mask),
* a UMAP embedding (``umap.npy``) for every heterogeneous job with zdim >= 2 (:mod:`cryoformer_ext.analysis.umap_embed`),
* ``z.pkl`` - the latents in cryoDRGN's format, and ChimeraX scripts ``chimerax/*.cxc`` that open the maps
  (:mod:`cryoformer_ext.formats.chimerax`),
* PNG plots in ``plots/`` and ``summary.json`` / ``report.txt`` listing every file, the settings and timings.

All files are written atomically. Rerunning into the same folder replaces the previous analysis and removes
maps of the previous run that this one did not make (e.g. ``class_010.mrc`` after a rerun with k = 8).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from cryoformer.lattice import sphere_mask
from cryoformer_ext.formats import chimerax as _chimerax
from cryoformer_ext.analysis import plots as _plots
from cryoformer_ext.formats.cryodrgn import write_z_pkl
from cryoformer_ext.analysis.label_resample import resample_nearest
from cryoformer_ext.analysis.solvent_mask import SoftMaskSettings, soft_mask
from cryoformer_ext.analysis.umap_embed import umap_embedding
from cryoformer_ext.formats.atomic import atomic_write_text, save_npy, write_mrc

SUMMARY_FORMAT = "cryoformer-analysis/1"
PC_PERCENTILES = (5.0, 95.0)


class MapRecord(BaseModel):
    name: str
    path: Path
    kind: Literal["consensus", "kmeans", "pc", "flexibility", "attention", "mask", "occupancy"]
    index: int | None = None  # k-means class (0-based) or step in a PC series (0-based); PC number in `pc`
    latent: list[float] | None = None  # latent the map was decoded at (None: flexibility / homogeneous)
    pc: int | None = None  # 1-based principal component of a "pc" map


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


# --------------------------------------------------------------------------------------------------
# helpers


def _umap_module():
    try:
        import umap  # type: ignore

        return umap
    except Exception:  # not installed, or broken numba: UMAP is optional
        return None


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self_inner.t0
                return False

        return _Ctx()


def _decode(generator, z: np.ndarray | None, box: int, batch: int):
    """Yield (start, volumes) for latents ``z`` (K, zdim) in batches; ``z`` None yields the single map."""
    if z is None:
        v = np.asarray(generator.volumes(None, box), dtype=np.float32)
        yield 0, v.reshape((-1, box, box, box))
        return
    for s in range(0, len(z), batch):
        v = np.asarray(generator.volumes(np.ascontiguousarray(z[s:s + batch], dtype=np.float32), box),
                       dtype=np.float32)
        if v.shape != (min(batch, len(z) - s), box, box, box):
            raise ValueError(f"generator.volumes returned shape {v.shape} for {min(batch, len(z) - s)} latents at box {box}")
        yield s, v


def _kmeans_fit(km, z: np.ndarray):
    """Fit k-means; small problems on one OpenMP thread (on a busy machine OpenMP barriers made a
    300-particle fit take seconds instead of milliseconds; the result does not depend on threads)."""
    if z.size < 2_000_000:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="openmp"):
            return km.fit(z)
    return km.fit(z)


def _corr_matrix(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1)
    n[n == 0] = 1.0
    x /= n[:, None]
    return np.clip(x @ x.T, -1.0, 1.0)


_OWNED_PATTERNS = ("consensus.mrc", "flexibility.mrc", "occupancy_mask.mrc", "solvent_mask.mrc", "attention_*.mrc", "kmeans/class_*.mrc", "kmeans/*.npy",
                   "kmeans/*.txt", "pc*/pc*_*.mrc", "plots/*.png", "pca_coords.npy", "umap.npy",
                   "kmeans_labels.txt", "flexibility_latents.txt", "z.pkl", "chimerax/*.cxc")


def _remove_stale(out_dir: Path, written: set[Path], log) -> None:
    for pattern in _OWNED_PATTERNS:
        for p in out_dir.glob(pattern):
            if p.is_file() and p.resolve() not in written:
                p.unlink()
                log(f"analysis: removed stale {p.relative_to(out_dir)} from an earlier run")


# --------------------------------------------------------------------------------------------------


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
    timer = _Timer()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_pcs < 0 or pc_steps < 2:
        raise ValueError(f"need n_pcs >= 0 and pc_steps >= 2, got n_pcs={n_pcs}, pc_steps={pc_steps}")
    box = int(map_box if map_box is not None else generator.train_box)
    if box < 2:
        raise ValueError(f"map box must be >= 2, got {box}")
    apix = float(generator.voxel_size_A(box))
    zdim = int(getattr(generator, "zdim", 0) or 0)

    z: np.ndarray | None = None
    n_particles = 0
    if latents is not None:
        z = np.asarray(latents, dtype=np.float64)
        if z.ndim == 1:
            z = z.reshape(-1, 1) if zdim == 1 else z.reshape(-1, 0) if z.size == 0 else z.reshape(len(z), -1)
        n_particles = int(z.shape[0])
        if z.shape[1] == 0:
            z = None
        elif z.shape[1] != zdim:
            raise ValueError(f"latents have {z.shape[1]} dimensions but the generator has zdim {zdim}")
        elif not np.isfinite(z).all():
            bad = int((~np.isfinite(z).all(axis=1)).sum())
            raise ValueError(f"{bad} particle latents are not finite (NaN/inf); cannot analyse")
        elif n_particles == 0:
            z = None
    if zdim > 0 and z is None:
        log("analysis: no particle latents given; writing the map at the zero latent only")
    hetero = z is not None
    log(f"analysis: {n_particles} particles, zdim {zdim}, maps at box {box} ({apix:.3f} Å/voxel) -> {out_dir}")

    written: list[Path] = []
    maps: list[MapRecord] = []
    plot_files: list[Path] = []
    summary: dict[str, Any] = {}

    def rec(path: Path) -> Path:
        written.append(Path(path).resolve())
        return Path(path)

    def add_map(name: str, rel: str, kind: str, vol: np.ndarray, *, index=None, latent=None, pc=None) -> MapRecord:
        path = rec(write_mrc(out_dir / rel, vol, apix))
        m = MapRecord(name=name, path=path.resolve(), kind=kind, index=index,
                      latent=None if latent is None else [float(x) for x in latent], pc=pc)
        maps.append(m)
        return m

    # ---- consensus latent: the observed latent nearest the mean --------------------------------------
    cons_idx: int | None = None
    cons_z: np.ndarray | None = None
    if hetero:
        mean = z.mean(axis=0)
        cons_idx = int(np.argmin(((z - mean) ** 2).sum(axis=1)))
        cons_z = z[cons_idx]
    elif zdim > 0:
        cons_z = np.zeros(zdim)

    # ---- PCA -------------------------------------------------------------------------------------------
    pca_coords = None
    pca_info: dict[str, Any] | None = None
    if hetero and n_particles >= 2:
        from sklearn.decomposition import PCA

        with timer("pca"):
            n_comp = min(zdim, n_particles)
            pca = PCA(n_components=n_comp, svd_solver="full", random_state=seed)
            pca_coords = pca.fit_transform(z)
            evr = np.nan_to_num(pca.explained_variance_ratio_)
            pca_info = {"explained_variance_ratio": [float(x) for x in evr],
                        "components": pca.components_.tolist(), "mean": pca.mean_.tolist(),
                        "coords_file": "pca_coords.npy"}
            rec(save_npy(out_dir / "pca_coords.npy", pca_coords.astype(np.float32)))
        log("analysis: PCA explained variance " + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr[:5])))

    # ---- k-means --------------------------------------------------------------------------------------
    labels = centers = center_particles = None
    km_info: dict[str, Any] | None = None
    if hetero:
        from sklearn.cluster import KMeans
        from sklearn.metrics import pairwise_distances_argmin

        with timer("kmeans"):
            n_unique = len(np.unique(z, axis=0)) if n_particles <= 200000 else n_particles
            k_used = max(1, min(k, n_unique))
            if k_used < k:
                log(f"analysis: only {n_unique} distinct latents; k-means with k={k_used} instead of {k}")
            km = _kmeans_fit(KMeans(n_clusters=k_used, n_init=10, random_state=seed), z)
            centers = km.cluster_centers_
            raw_labels = km.labels_
            # number classes along PC1 of their centres: class 1 -> k follows the main motion
            order_key = (pca.transform(centers)[:, 0] if pca_coords is not None else np.zeros(k_used))
            order = np.lexsort((np.arange(k_used), np.round(order_key, 12)))
            remap = np.empty(k_used, dtype=np.int64)
            remap[order] = np.arange(k_used)
            labels = remap[raw_labels]
            centers = centers[order]
            center_particles = pairwise_distances_argmin(centers, z)
            sizes = np.bincount(labels, minlength=k_used)
            lines = ["# k-means class of each particle, input order, 0-based (class c -> kmeans/class_{c+1:03d}.mrc)"]
            lines += [str(int(x)) for x in labels]
            rec(atomic_write_text(out_dir / "kmeans_labels.txt", "\n".join(lines) + "\n"))
            rec(save_npy(out_dir / "kmeans" / "centers.npy", centers.astype(np.float32)))
            km_info = {"k_requested": int(k), "k": int(k_used), "sizes": sizes.tolist(),
                       "centers": centers.tolist(), "center_particles": [int(i) for i in center_particles],
                       "labels_file": "kmeans_labels.txt", "map_latent": "particle nearest each centre",
                       "class_order": "by PC1 coordinate of the centre"}
        log(f"analysis: k-means k={k_used}: class sizes {sizes.tolist()}")

    # ---- UMAP ------------------------------------------------------------------------------------------
    umap_coords = None
    umap_info: dict[str, Any] = {"available": _umap_module() is not None, "file": None}
    if hetero and zdim >= 2 and n_particles >= 10:
        with timer("umap"):
            umap_coords = _run_umap(z, seed, umap_info, log)
            if umap_coords is not None:
                rec(save_npy(out_dir / "umap.npy", umap_coords))

    # ---- maps -----------------------------------------------------------------------------------------
    mask = sphere_mask(box).numpy()
    consensus_vol = None
    with timer("consensus_map"):
        zc = None if cons_z is None else cons_z[None, :]
        for _, v in _decode(generator, zc, box, volume_batch):
            consensus_vol = v[0]
        add_map("consensus", "consensus.mrc", "consensus", consensus_vol, latent=cons_z)
    union_vol = consensus_vol.copy()  # voxel-wise maximum over the states: the solvent mask's map
    log("analysis: wrote consensus.mrc")

    km_corr = None
    if centers is not None:
        with timer("kmeans_maps"):
            zk = z[center_particles]
            rows = np.empty((len(zk), int(mask.sum())), dtype=np.float32)
            for s, vols in _decode(generator, zk, box, volume_batch):
                for j, v in enumerate(vols):
                    c = s + j
                    add_map(f"class_{c + 1:03d}", f"kmeans/class_{c + 1:03d}.mrc", "kmeans", v, index=c, latent=zk[c])
                    rows[c] = v[mask]
                    np.maximum(union_vol, v, out=union_vol)
            km_corr = _corr_matrix(rows)
            km_info["map_correlation"] = km_corr.tolist()
            del rows
        log(f"analysis: wrote {len(zk)} k-means maps in kmeans/")

    with timer("solvent_mask"):
        n_states = 1 + (0 if centers is None else len(centers))
        scale = box / float(getattr(generator, "train_box", box))
        mask_info = _write_solvent_mask(union_vol, add_map, mask_settings, scale, n_states=n_states, log=log)

    pc_info: list[dict[str, Any]] = []
    pc_strips: dict[int, np.ndarray] = {}
    if pca_coords is not None and n_pcs > 0:
        n_series = min(n_pcs, pca_coords.shape[1])
        width = max(2, len(str(pc_steps)))
        with timer("pc_maps"):
            for p in range(n_series):
                lo, hi = np.percentile(pca_coords[:, p], PC_PERCENTILES)
                t = np.linspace(lo, hi, pc_steps)
                zs = pca.mean_[None, :] + t[:, None] * pca.components_[p][None, :]
                strip = np.empty((pc_steps, box, box), dtype=np.float32)
                for s, vols in _decode(generator, zs, box, volume_batch):
                    for j, v in enumerate(vols):
                        i = s + j
                        add_map(f"pc{p + 1}_{i + 1:0{width}d}", f"pc{p + 1}/pc{p + 1}_{i + 1:0{width}d}.mrc", "pc", v,
                                index=i, latent=zs[i], pc=p + 1)
                        strip[i] = v.sum(axis=0)
                pc_strips[p + 1] = strip
                pc_info.append({"pc": p + 1, "folder": f"pc{p + 1}", "percentiles": list(PC_PERCENTILES),
                                "coords": [float(x) for x in t]})
        log(f"analysis: wrote {n_series} PC series of {pc_steps} maps (percentiles {PC_PERCENTILES[0]:g}-{PC_PERCENTILES[1]:g})")

    flex_vol = None
    flex_info: dict[str, Any] | None = None
    if hetero and n_particles >= 2:
        with timer("flexibility_map"):
            rng = np.random.default_rng(seed)
            n_s = min(n_flex, n_particles)
            idx = np.sort(rng.choice(n_particles, size=n_s, replace=False))
            acc = np.zeros((box, box, box), dtype=np.float64)
            acc2 = np.zeros((box, box, box), dtype=np.float64)
            for _, vols in _decode(generator, z[idx], box, volume_batch):
                for v in vols:
                    d = v.astype(np.float64) - consensus_vol  # shifted sums: stable variance
                    acc += d
                    acc2 += d * d
            var = np.maximum(acc2 / n_s - (acc / n_s) ** 2, 0.0) * n_s / max(n_s - 1, 1)
            flex_vol = np.sqrt(var).astype(np.float32)
            add_map("flexibility", "flexibility.mrc", "flexibility", flex_vol)
            peak = np.unravel_index(int(np.argmax(flex_vol)), flex_vol.shape)
            cons_scale = float(np.percentile(np.abs(consensus_vol[mask]), 99.9)) or 1.0
            flex_info = {"n_latents": int(n_s), "particles_file": "flexibility_latents.txt",
                         "statistic": "per-voxel standard deviation over maps decoded at particle latents",
                         "max": float(flex_vol.max()), "max_voxel_zyx": [int(x) for x in peak],
                         "max_relative_to_consensus": float(flex_vol.max()) / cons_scale}
            rec(atomic_write_text(out_dir / "flexibility_latents.txt",
                                  "# particles (0-based, input order) whose maps make flexibility.mrc\n"
                                  + "\n".join(str(int(i)) for i in idx) + "\n"))
        log(f"analysis: wrote flexibility.mrc (std over {n_s} particle maps; peak at voxel z,y,x={tuple(int(x) for x in peak)})")

    att_info: dict[str, Any] | None = None
    if hasattr(generator, "attention_maps"):
        with timer("attention_maps"):
            try:
                zc = np.zeros(0, dtype=np.float32) if cons_z is None else cons_z.astype(np.float32)
                att_box = min(box, int(generator.train_box))  # tokens x box^3 weights: at the training box
                w = np.asarray(generator.attention_maps(zc, att_box), dtype=np.float32)
            except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
                # literal attention or an engine without the hook: an optional map, never a failed job
                log(f"analysis: no attention map ({type(err).__name__}: {err})")
                w = None
            if w is not None:
                if w.ndim != 4 or w.shape[1:] != (att_box,) * 3:
                    raise ValueError(f"attention_maps returned shape {w.shape}, expected (N_tokens, {att_box}, {att_box}, {att_box})")
                arg = resample_nearest(np.argmax(w, axis=0), box)
                wmax = resample_nearest(np.max(w, axis=0), box)
                add_map("attention_argmax", "attention_argmax.mrc", "attention", arg.astype(np.float32))
                add_map("attention_maxweight", "attention_maxweight.mrc", "attention", wmax)
                pos = np.clip(consensus_vol, 0, None)
                mass = np.bincount(arg.ravel(), weights=pos.ravel(), minlength=w.shape[0])
                total = float(mass.sum()) or 1.0
                att_info = {"n_tokens": int(w.shape[0]), "latent": "consensus",
                            "argmax_file": "attention_argmax.mrc", "maxweight_file": "attention_maxweight.mrc",
                            "label": "0-based structure-query (token) index of the largest attention weight",
                            "voxels_per_token": np.bincount(arg.ravel(), minlength=w.shape[0]).tolist(),
                            "density_fraction_per_token": [float(m / total) for m in mass]}
                log(f"analysis: wrote attention_argmax.mrc ({w.shape[0]} tokens)")
                del w

    # ---- plots ------------------------------------------------------------------------------------------
    pdir = out_dir / "plots"
    with timer("plots"):
        if loss_history:
            plot_files.append(rec(_plots.plot_loss(loss_history, pdir / "loss.png")))
        if pca_coords is not None:
            cpc = pca.transform(centers) if centers is not None else None
            plot_files.append(rec(_plots.plot_latent_scatter(pca_coords, labels, cpc, pdir / "pca_scatter.png", seed=seed)))
            plot_files.append(rec(_plots.plot_latent_density(pca_coords, cpc, pdir / "pca_density.png")))
            plot_files.append(rec(_plots.plot_explained_variance(pca_info["explained_variance_ratio"],
                                                                  pdir / "pca_variance.png")))
        if umap_coords is not None:
            cum = np.stack([umap_coords[labels == c].mean(axis=0) for c in range(len(centers))])
            plot_files.append(rec(_plots.plot_latent_scatter(umap_coords, labels, cum, pdir / "umap_scatter.png",
                                                             axis_names=("UMAP1", "UMAP2"), title="Latent space (UMAP)",
                                                             seed=seed)))
            plot_files.append(rec(_plots.plot_latent_density(umap_coords, cum, pdir / "umap_density.png",
                                                             axis_names=("UMAP1", "UMAP2"),
                                                             title="Latent density (UMAP)")))
        if km_corr is not None and len(km_corr) >= 2:
            plot_files.append(rec(_plots.plot_correlation(km_corr, pdir / "kmeans_correlation.png")))
        plot_files.append(rec(_plots.plot_map_projections(consensus_vol, flex_vol, pdir / "maps_projections.png",
                                                          voxel_size_A=apix)))
        for p, strip in pc_strips.items():
            plot_files.append(rec(_plots.plot_pc_series(strip, pdir / f"pc{p}_series.png", pc=p)))
    log(f"analysis: wrote {len(plot_files)} plots in plots/")

    if hetero:  # cryoDRGN's z.pkl: its traversal commands and notebooks read cryoFormer's latents as they are
        rec(write_z_pkl(out_dir / "z.pkl", np.asarray(latents, dtype=np.float32).reshape(n_particles, zdim)))
    for script in _chimerax.write_analysis_scripts(out_dir, maps):
        rec(script)
    log("analysis: wrote ChimeraX scripts in chimerax/")

    _remove_stale(out_dir, set(written) | {(out_dir / "summary.json").resolve(), (out_dir / "report.txt").resolve()}, log)

    occ_info = _write_occupancy_mask(generator, box, add_map, log)

    # ---- summary and report -----------------------------------------------------------------------------
    timer.timings["total"] = time.perf_counter() - t_start
    summary_file = out_dir / "summary.json"
    report_file = out_dir / "report.txt"
    relp = lambda p: Path(p).resolve().relative_to(out_dir.resolve()).as_posix()  # noqa: E731
    all_files = [relp(p) for p in written] + ["summary.json", "report.txt"]
    summary = {
        "format": SUMMARY_FORMAT,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "n_particles": n_particles,
        "zdim": zdim,
        "map_box": box,
        "map_pixel_size_A": apix,
        "analysis_settings": {"k": k, "n_pcs": n_pcs, "pc_steps": pc_steps, "seed": seed, "map_box": map_box,
                              "pc_percentiles": list(PC_PERCENTILES), "n_flex": n_flex,
                              "volume_batch": volume_batch},
        "job_settings": settings or {},
        "consensus": {"file": "consensus.mrc",
                      "latent_choice": ("particle nearest the mean latent" if hetero else
                                        "homogeneous map" if zdim == 0 else "zero latent"),
                      "particle": cons_idx, "latent": None if cons_z is None else [float(x) for x in cons_z]},
        "pca": pca_info,
        "pc_series": pc_info,
        "kmeans": km_info,
        "umap": umap_info,
        "flexibility": flex_info,
        "attention": att_info,
        "occupancy_mask": occ_info,
        "solvent_mask": mask_info,
        "loss_history": [float(x) for x in loss_history] if loss_history else None,
        "maps": [{**m.model_dump(mode="json"), "path": relp(m.path)} for m in maps],
        "plots": [relp(p) for p in plot_files],
        "files": all_files,
        "timings_s": {k_: round(v, 3) for k_, v in timer.timings.items()},
    }
    atomic_write_text(summary_file, json.dumps(summary, indent=2, default=_json_default) + "\n")
    atomic_write_text(report_file, _report(summary))
    log(f"analysis: done in {timer.timings['total']:.1f} s; summary in {summary_file}")

    return AnalysisResult(
        out_dir=out_dir.resolve(), zdim=zdim, n_particles=n_particles, map_box=box, map_pixel_size_A=apix,
        labels=None if labels is None else [int(x) for x in labels],
        centers=None if centers is None else centers.tolist(),
        center_particles=None if center_particles is None else [int(i) for i in center_particles],
        consensus_particle=cons_idx, consensus_latent=None if cons_z is None else [float(x) for x in cons_z],
        pca_explained_variance_ratio=None if pca_info is None else pca_info["explained_variance_ratio"],
        pca_components=None if pca_info is None else pca_info["components"],
        pca_coords_file=(out_dir / "pca_coords.npy").resolve() if pca_info is not None else None,
        umap_file=(out_dir / "umap.npy").resolve() if umap_coords is not None else None,
        maps=maps, plots=[p.resolve() for p in plot_files],
        files=[(out_dir / f).resolve() for f in all_files],
        summary_file=summary_file.resolve(), report_file=report_file.resolve(),
        timings_s=dict(timer.timings),
    )


def _run_umap(z: np.ndarray, seed: int, info: dict[str, Any], log) -> np.ndarray | None:
    """UMAP coordinates of the latents; a failure (a broken numba) is logged, never a failed job."""
    if _umap_module() is None:
        log("analysis: umap-learn could not be imported; no UMAP embedding (reinstall umap-learn)")
        return None
    try:
        coords, how = umap_embedding(z, seed, log=log)
    except Exception as err:  # noqa: BLE001 - the embedding is a view of the latents, not a result
        log(f"analysis: UMAP failed ({type(err).__name__}: {err}); skipping it")
        return None
    info.update(file="umap.npy", **how)
    log(f"analysis: UMAP embedding of {len(z)} latents done")
    return coords


def _write_solvent_mask(union_vol: np.ndarray, add_map, settings: SoftMaskSettings | None, scale: float, *,
                        n_states: int, log) -> dict[str, Any] | None:
    """``solvent_mask.mrc`` from the maximum over the state maps: the ``Mask3D`` node RELION's Refine3D,
    PostProcess and MaskCreate take at the particles' box and pixel size, and the cryoSPARC mask."""
    try:
        m = soft_mask(union_vol, settings, scale)
    except ValueError as err:  # a map without density: nothing to mask, but the maps are still results
        log(f"analysis: no solvent mask ({err})")
        return None
    add_map("solvent_mask", "solvent_mask.mrc", "mask", m.values)
    frac = m.fraction_above_half()
    log(f"analysis: wrote solvent_mask.mrc ({frac:.1%} of the box above 0.5; threshold {m.threshold:.4g})")
    return {"file": "solvent_mask.mrc", "threshold": m.threshold, **m.settings.model_dump(),
            "fraction_above_half": frac, "source": f"voxel-wise maximum over {n_states} maps (consensus and k-means)",
            "relion_equivalent": f"relion_mask_create --ini_threshold {m.threshold:.6g} --extend_inimask "
                                 f"{m.settings.extend_px:g} --width_soft_edge {m.settings.soft_edge_px:g}"}


def _write_occupancy_mask(generator, box: int, add_map, log) -> dict[str, Any] | None:
    """``occupancy_mask.mrc``: where the model renders density at all (the occupancy grid's 4-px cells,
    a union over many particles' latents). An acceleration structure with hard edges, written for
    inspection under its own name; the solvent mask is ``solvent_mask.mrc``."""
    train_box = int(getattr(generator, "train_box", box))
    grid = generator.occupancy_mask(min(box, train_box)) if hasattr(generator, "occupancy_mask") else None
    if grid is None:
        return None
    mask = resample_nearest(np.asarray(grid, np.float32), box)
    add_map("occupancy_mask", "occupancy_mask.mrc", "occupancy", mask)
    frac = float(np.mean(mask))
    log(f"analysis: wrote occupancy_mask.mrc ({frac:.1%} of the box)")
    return {"file": "occupancy_mask.mrc", "fraction_of_box": frac,
            "meaning": "1 where the model renders density (occupied cells of its occupancy grid inside the "
                       "training sphere), 0 elsewhere; not a solvent mask (see solvent_mask.mrc)"}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _report(s: dict[str, Any]) -> str:
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
