"""The latent space of a job: the consensus latent, PCA, k-means numbered along PC1, and UMAP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cryoformer_ext.analysis.ledger import OutputLedger
from cryoformer_ext.analysis.umap_embed import umap_embedding
from cryoformer_ext.formats.atomic import atomic_write_text, save_npy

Log = Callable[[str], Any]


def checked_latents(latents: np.ndarray | None, zdim: int) -> tuple[np.ndarray | None, int]:
    """(latents as float64 (N, zdim), or None for a homogeneous analysis; N). Bad latents are an error
    here, before any map is decoded."""
    if latents is None:
        return None, 0
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim == 1:
        z = z.reshape(-1, 1) if zdim == 1 else z.reshape(-1, 0) if z.size == 0 else z.reshape(len(z), -1)
    n_particles = int(z.shape[0])
    if z.shape[1] == 0:
        return None, n_particles
    if z.shape[1] != zdim:
        raise ValueError(f"latents have {z.shape[1]} dimensions but the generator has zdim {zdim}")
    if not np.isfinite(z).all():
        bad = int((~np.isfinite(z).all(axis=1)).sum())
        raise ValueError(f"{bad} particle latents are not finite (NaN/inf); cannot analyse")
    return (None if n_particles == 0 else z), n_particles


def consensus_latent(z: np.ndarray | None, zdim: int) -> tuple[int | None, np.ndarray | None]:
    """The observed latent nearest the mean (it stays on the data manifold even when the distribution is
    curved or multimodal); the zero latent without particles; None for a homogeneous job."""
    if z is not None:
        mean = z.mean(axis=0)
        idx = int(np.argmin(((z - mean) ** 2).sum(axis=1)))
        return idx, z[idx]
    return None, (np.zeros(zdim) if zdim > 0 else None)


@dataclass
class LatentPCA:
    model: Any                 # the fitted sklearn PCA (transform, mean_, components_)
    coords: np.ndarray         # (N, n_components)
    info: dict[str, Any]       # the summary's "pca" entry


def fit_pca(z: np.ndarray, seed: int, ledger: OutputLedger, log: Log) -> LatentPCA:
    from sklearn.decomposition import PCA

    with ledger.timed("pca"):
        pca = PCA(n_components=min(z.shape[1], len(z)), svd_solver="full", random_state=seed)
        coords = pca.fit_transform(z)
        evr = np.nan_to_num(pca.explained_variance_ratio_)
        info = {"explained_variance_ratio": [float(x) for x in evr], "components": pca.components_.tolist(),
                "mean": pca.mean_.tolist(), "coords_file": "pca_coords.npy"}
        ledger.record(save_npy(ledger.out_dir / "pca_coords.npy", coords.astype(np.float32)))
    log("analysis: PCA explained variance " + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr[:5])))
    return LatentPCA(pca, coords, info)


@dataclass
class LatentClasses:
    labels: np.ndarray             # (N,) 0-based, numbered along PC1 of the centres
    centers: np.ndarray            # (k, zdim)
    center_particles: np.ndarray   # (k,) the particle nearest each centre (its latent makes the class map)
    info: dict[str, Any]           # the summary's "kmeans" entry


def _kmeans_fit(km, z: np.ndarray):
    """Fit k-means; small problems on one OpenMP thread (on a busy machine OpenMP barriers made a
    300-particle fit take seconds instead of milliseconds; the result does not depend on threads)."""
    if z.size < 2_000_000:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="openmp"):
            return km.fit(z)
    return km.fit(z)


def _order_along_pc1(centers: np.ndarray, pca: LatentPCA | None) -> np.ndarray:
    """Class order so that class 1 -> k follows the main motion (ties: k-means' own order)."""
    key = pca.model.transform(centers)[:, 0] if pca is not None else np.zeros(len(centers))
    return np.lexsort((np.arange(len(centers)), np.round(key, 12)))


def fit_kmeans(z: np.ndarray, k: int, seed: int, pca: LatentPCA | None, ledger: OutputLedger,
               log: Log) -> LatentClasses:
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances_argmin

    with ledger.timed("kmeans"):
        n_unique = len(np.unique(z, axis=0)) if len(z) <= 200000 else len(z)
        k_used = max(1, min(k, n_unique))
        if k_used < k:
            log(f"analysis: only {n_unique} distinct latents; k-means with k={k_used} instead of {k}")
        km = _kmeans_fit(KMeans(n_clusters=k_used, n_init=10, random_state=seed), z)
        order = _order_along_pc1(km.cluster_centers_, pca)
        remap = np.empty(k_used, dtype=np.int64)
        remap[order] = np.arange(k_used)
        labels = remap[km.labels_]
        centers = km.cluster_centers_[order]
        center_particles = pairwise_distances_argmin(centers, z)
        sizes = np.bincount(labels, minlength=k_used)
        lines = ["# k-means class of each particle, input order, 0-based (class c -> kmeans/class_{c+1:03d}.mrc)"]
        lines += [str(int(x)) for x in labels]
        ledger.record(atomic_write_text(ledger.out_dir / "kmeans_labels.txt", "\n".join(lines) + "\n"))
        ledger.record(save_npy(ledger.out_dir / "kmeans" / "centers.npy", centers.astype(np.float32)))
        info = {"k_requested": int(k), "k": int(k_used), "sizes": sizes.tolist(),
                "centers": centers.tolist(), "center_particles": [int(i) for i in center_particles],
                "labels_file": "kmeans_labels.txt", "map_latent": "particle nearest each centre",
                "class_order": "by PC1 coordinate of the centre"}
    log(f"analysis: k-means k={k_used}: class sizes {sizes.tolist()}")
    return LatentClasses(labels, centers, center_particles, info)


def umap_module():
    try:
        import umap  # type: ignore

        return umap
    except Exception:  # not installed, or broken numba: UMAP is optional
        return None


def embed_umap(z: np.ndarray | None, seed: int, ledger: OutputLedger, log: Log) -> tuple[np.ndarray | None, dict[str, Any]]:
    """UMAP coordinates of the latents and the summary's "umap" entry; a failure (a broken numba) is
    logged, never a failed job: the embedding is a view of the latents, not a result."""
    info: dict[str, Any] = {"available": umap_module() is not None, "file": None}
    if z is None or z.shape[1] < 2 or len(z) < 10:
        return None, info
    with ledger.timed("umap"):
        if umap_module() is None:
            log("analysis: umap-learn could not be imported; no UMAP embedding (reinstall umap-learn)")
            return None, info
        try:
            coords, how = umap_embedding(z, seed, log=log)
        except Exception as err:  # noqa: BLE001
            log(f"analysis: UMAP failed ({type(err).__name__}: {err}); skipping it")
            return None, info
        info.update(file="umap.npy", **how)
        log(f"analysis: UMAP embedding of {len(z)} latents done")
        ledger.record(save_npy(ledger.out_dir / "umap.npy", coords))
    return coords, info
