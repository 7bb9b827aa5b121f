"""The maps of an analysis: consensus, k-means classes, principal-component series, flexibility,
attention, and the solvent and occupancy masks. Each step decodes through the generator and records its
files in the :class:`~cryoformer_ext.analysis.ledger.OutputLedger`."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from cryoformer_ext.analysis.label_resample import resample_nearest
from cryoformer_ext.analysis.latent import LatentClasses, LatentPCA
from cryoformer_ext.analysis.ledger import OutputLedger
from cryoformer_ext.analysis.solvent_mask import SoftMaskSettings, soft_mask
from cryoformer_ext.formats.atomic import atomic_write_text

Log = Callable[[str], Any]
PC_PERCENTILES = (5.0, 95.0)


def decode(generator, z: np.ndarray | None, box: int, batch: int) -> Iterator[tuple[int, np.ndarray]]:
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


def corr_matrix(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1)
    n[n == 0] = 1.0
    x /= n[:, None]
    return np.clip(x @ x.T, -1.0, 1.0)


def consensus_map(generator, cons_z: np.ndarray | None, box: int, batch: int, ledger: OutputLedger,
                  log: Log) -> np.ndarray:
    with ledger.timed("consensus_map"):
        zc = None if cons_z is None else cons_z[None, :]
        vol = None
        for _, v in decode(generator, zc, box, batch):
            vol = v[0]
        ledger.add_map("consensus", "consensus.mrc", "consensus", vol, latent=cons_z)
    log("analysis: wrote consensus.mrc")
    return vol


def class_maps(generator, z: np.ndarray, classes: LatentClasses, sphere: np.ndarray, box: int, batch: int,
               union_vol: np.ndarray, ledger: OutputLedger, log: Log) -> np.ndarray:
    """One map per class at its centre particle's latent; raises ``union_vol`` to the voxel-wise maximum
    (the solvent mask's map, so that no state is cut). Returns the maps' correlation matrix."""
    with ledger.timed("kmeans_maps"):
        zk = z[classes.center_particles]
        rows = np.empty((len(zk), int(sphere.sum())), dtype=np.float32)
        for s, vols in decode(generator, zk, box, batch):
            for j, v in enumerate(vols):
                c = s + j
                ledger.add_map(f"class_{c + 1:03d}", f"kmeans/class_{c + 1:03d}.mrc", "kmeans", v, index=c,
                               latent=zk[c])
                rows[c] = v[sphere]
                np.maximum(union_vol, v, out=union_vol)
        corr = corr_matrix(rows)
        classes.info["map_correlation"] = corr.tolist()
    log(f"analysis: wrote {len(zk)} k-means maps in kmeans/")
    return corr


def solvent_mask_map(union_vol: np.ndarray, settings: SoftMaskSettings | None, scale: float, n_states: int,
                     ledger: OutputLedger, log: Log) -> dict[str, Any] | None:
    """``solvent_mask.mrc`` from the maximum over the state maps: the ``Mask3D`` node RELION's Refine3D,
    PostProcess and MaskCreate take at the particles' box and pixel size, and the cryoSPARC mask."""
    with ledger.timed("solvent_mask"):
        try:
            m = soft_mask(union_vol, settings, scale)
        except ValueError as err:  # a map without density: nothing to mask, but the maps are still results
            log(f"analysis: no solvent mask ({err})")
            return None
        ledger.add_map("solvent_mask", "solvent_mask.mrc", "mask", m.values)
        frac = m.fraction_above_half()
    log(f"analysis: wrote solvent_mask.mrc ({frac:.1%} of the box above 0.5; threshold {m.threshold:.4g})")
    return {"file": "solvent_mask.mrc", "threshold": m.threshold, **m.settings.model_dump(),
            "fraction_above_half": frac, "source": f"voxel-wise maximum over {n_states} maps (consensus and k-means)",
            "relion_equivalent": f"relion_mask_create --ini_threshold {m.threshold:.6g} --extend_inimask "
                                 f"{m.settings.extend_px:g} --width_soft_edge {m.settings.soft_edge_px:g}"}


def pc_series(generator, pca: LatentPCA, n_pcs: int, pc_steps: int, box: int, batch: int, ledger: OutputLedger,
              log: Log) -> tuple[list[dict[str, Any]], dict[int, np.ndarray]]:
    """``pc_steps`` maps along each of the first ``n_pcs`` components, from the 5th to the 95th percentile
    of the particles' coordinate, other coordinates at the mean. Returns the summary entries and, per
    component, the maps' projections along z (for the plot)."""
    info: list[dict[str, Any]] = []
    strips: dict[int, np.ndarray] = {}
    n_series = min(n_pcs, pca.coords.shape[1])
    width = max(2, len(str(pc_steps)))
    with ledger.timed("pc_maps"):
        for p in range(n_series):
            lo, hi = np.percentile(pca.coords[:, p], PC_PERCENTILES)
            t = np.linspace(lo, hi, pc_steps)
            zs = pca.model.mean_[None, :] + t[:, None] * pca.model.components_[p][None, :]
            strip = np.empty((pc_steps, box, box), dtype=np.float32)
            for s, vols in decode(generator, zs, box, batch):
                for j, v in enumerate(vols):
                    i = s + j
                    ledger.add_map(f"pc{p + 1}_{i + 1:0{width}d}", f"pc{p + 1}/pc{p + 1}_{i + 1:0{width}d}.mrc", "pc",
                                   v, index=i, latent=zs[i], pc=p + 1)
                    strip[i] = v.sum(axis=0)
            strips[p + 1] = strip
            info.append({"pc": p + 1, "folder": f"pc{p + 1}", "percentiles": list(PC_PERCENTILES),
                         "coords": [float(x) for x in t]})
    log(f"analysis: wrote {n_series} PC series of {pc_steps} maps (percentiles {PC_PERCENTILES[0]:g}-{PC_PERCENTILES[1]:g})")
    return info, strips


def flexibility_map(generator, z: np.ndarray, consensus_vol: np.ndarray, sphere: np.ndarray, n_flex: int, seed: int,
                    box: int, batch: int, ledger: OutputLedger, log: Log) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-voxel standard deviation over maps at ``n_flex`` random particles' latents: high where the
    structure moves or is partly occupied."""
    n_particles = len(z)
    with ledger.timed("flexibility_map"):
        rng = np.random.default_rng(seed)
        n_s = min(n_flex, n_particles)
        idx = np.sort(rng.choice(n_particles, size=n_s, replace=False))
        acc = np.zeros((box, box, box), dtype=np.float64)
        acc2 = np.zeros((box, box, box), dtype=np.float64)
        for _, vols in decode(generator, z[idx], box, batch):
            for v in vols:
                d = v.astype(np.float64) - consensus_vol  # shifted sums: stable variance
                acc += d
                acc2 += d * d
        var = np.maximum(acc2 / n_s - (acc / n_s) ** 2, 0.0) * n_s / max(n_s - 1, 1)
        flex_vol = np.sqrt(var).astype(np.float32)
        ledger.add_map("flexibility", "flexibility.mrc", "flexibility", flex_vol)
        peak = np.unravel_index(int(np.argmax(flex_vol)), flex_vol.shape)
        cons_scale = float(np.percentile(np.abs(consensus_vol[sphere]), 99.9)) or 1.0
        info = {"n_latents": int(n_s), "particles_file": "flexibility_latents.txt",
                "statistic": "per-voxel standard deviation over maps decoded at particle latents",
                "max": float(flex_vol.max()), "max_voxel_zyx": [int(x) for x in peak],
                "max_relative_to_consensus": float(flex_vol.max()) / cons_scale}
        ledger.record(atomic_write_text(ledger.out_dir / "flexibility_latents.txt",
                                        "# particles (0-based, input order) whose maps make flexibility.mrc\n"
                                        + "\n".join(str(int(i)) for i in idx) + "\n"))
    log(f"analysis: wrote flexibility.mrc (std over {n_s} particle maps; peak at voxel z,y,x={tuple(int(x) for x in peak)})")
    return flex_vol, info


def _attention_weights(generator, cons_z: np.ndarray | None, att_box: int, log: Log) -> np.ndarray | None:
    try:
        zc = np.zeros(0, dtype=np.float32) if cons_z is None else cons_z.astype(np.float32)
        return np.asarray(generator.attention_maps(zc, att_box), dtype=np.float32)
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
        # literal attention or an engine without the hook: an optional map, never a failed job
        log(f"analysis: no attention map ({type(err).__name__}: {err})")
        return None


def attention_maps(generator, cons_z: np.ndarray | None, consensus_vol: np.ndarray, box: int, ledger: OutputLedger,
                   log: Log) -> dict[str, Any] | None:
    """Which structure query the decoder's point attention assigns each voxel to at the consensus latent
    (``attention_argmax.mrc``), and with what weight (``attention_maxweight.mrc``)."""
    if not hasattr(generator, "attention_maps"):
        return None
    with ledger.timed("attention_maps"):
        att_box = min(box, int(generator.train_box))  # tokens x box^3 weights: at the training box
        w = _attention_weights(generator, cons_z, att_box, log)
        if w is None:
            return None
        if w.ndim != 4 or w.shape[1:] != (att_box,) * 3:
            raise ValueError(f"attention_maps returned shape {w.shape}, expected (N_tokens, {att_box}, {att_box}, {att_box})")
        arg = resample_nearest(np.argmax(w, axis=0), box)
        wmax = resample_nearest(np.max(w, axis=0), box)
        ledger.add_map("attention_argmax", "attention_argmax.mrc", "attention", arg.astype(np.float32))
        ledger.add_map("attention_maxweight", "attention_maxweight.mrc", "attention", wmax)
        pos = np.clip(consensus_vol, 0, None)
        mass = np.bincount(arg.ravel(), weights=pos.ravel(), minlength=w.shape[0])
        total = float(mass.sum()) or 1.0
        info = {"n_tokens": int(w.shape[0]), "latent": "consensus",
                "argmax_file": "attention_argmax.mrc", "maxweight_file": "attention_maxweight.mrc",
                "label": "0-based structure-query (token) index of the largest attention weight",
                "voxels_per_token": np.bincount(arg.ravel(), minlength=w.shape[0]).tolist(),
                "density_fraction_per_token": [float(m / total) for m in mass]}
        log(f"analysis: wrote attention_argmax.mrc ({w.shape[0]} tokens)")
    return info


def occupancy_mask_map(generator, box: int, ledger: OutputLedger, log: Log) -> dict[str, Any] | None:
    """``occupancy_mask.mrc``: where the model renders density at all (the occupancy grid's cells, 4 Å by default,
    a union over many particles' latents). An acceleration structure with hard edges, written for
    inspection under its own name; the solvent mask is ``solvent_mask.mrc``."""
    train_box = int(getattr(generator, "train_box", box))
    grid = generator.occupancy_mask(min(box, train_box)) if hasattr(generator, "occupancy_mask") else None
    if grid is None:
        return None
    mask = resample_nearest(np.asarray(grid, np.float32), box)
    ledger.add_map("occupancy_mask", "occupancy_mask.mrc", "occupancy", mask)
    frac = float(np.mean(mask))
    log(f"analysis: wrote occupancy_mask.mrc ({frac:.1%} of the box)")
    return {"file": "occupancy_mask.mrc", "fraction_of_box": frac,
            "meaning": "1 where the model renders density (occupied cells of its occupancy grid inside the "
                       "training sphere), 0 elsewhere; not a solvent mask (see solvent_mask.mrc)"}
