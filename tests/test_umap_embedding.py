"""UMAP of the latents: every particle gets coordinates, also above the subsampling size."""

from __future__ import annotations

import numpy as np

from cryoformer_ext.analysis.umap_embed import umap_embedding


def two_clusters(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 2, n)
    z = rng.normal(size=(n, 4)) * 0.3
    z[:, 0] += 4.0 * lab
    return z.astype(np.float32), lab


def separation(coords: np.ndarray, lab: np.ndarray) -> float:
    """Distance between the two clusters' centres over the larger within-cluster spread."""
    c0, c1 = coords[lab == 0].mean(0), coords[lab == 1].mean(0)
    spread = max(coords[lab == 0].std(0).max(), coords[lab == 1].std(0).max())
    return float(np.linalg.norm(c0 - c1) / spread)


def test_subsampled_embedding_places_every_particle_with_its_cluster():
    z, lab = two_clusters(600)
    coords, how = umap_embedding(z, seed=0, max_fit=200, log=lambda m: None)
    assert coords.shape == (600, 2) and np.isfinite(coords).all()
    assert how["subsampled"] and how["fitted_on"] == 200 and how["placed_by_neighbours"] == 400
    assert separation(coords, lab) > 3.0
    full, how_full = umap_embedding(z[:150], seed=0, log=lambda m: None)
    assert full.shape == (150, 2) and not how_full["subsampled"]
