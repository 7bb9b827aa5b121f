"""The UMAP embedding of the latents, as cryoDRGN users get it after every heterogeneous job.

UMAP's cost grows with the number of particles (nearest-neighbour descent, then 200 layout epochs over
the neighbour graph): about 4 minutes for 100k latents on one core. Above :data:`UMAP_MAX_FIT` latents
the layout is learnt on a random subset of that size, and every other particle is placed at the mean
position of its :data:`PLACE_NEIGHBORS` nearest fitted latents (the starting point ``UMAP.transform``
would refine; measured here, ``transform`` itself cost 1.7 ms per point, half an hour for a million, so
it is not used). Every particle still gets coordinates in ``umap.npy``. cryoDRGN's ``analyze`` embeds
every latent; its own ``--skip-umap`` exists because that takes hours at a million particles.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

#: latents the UMAP layout is fitted on; more are placed with ``transform`` (see the module docstring)
UMAP_MAX_FIT = 100_000
UMAP_NEIGHBORS = 15
PLACE_NEIGHBORS = 5


def umap_embedding(z: np.ndarray, seed: int, *, max_fit: int = UMAP_MAX_FIT,
                   log: Callable[[str], Any] = print) -> tuple[np.ndarray, dict[str, Any]]:
    """2-D UMAP coordinates (N, 2) of the latents ``z`` (N, zdim) and a record of how they were made."""
    import umap  # a dependency; imported here because numba's import costs seconds

    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": seeded runs are serial
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return _embed(umap, z, seed, max_fit, log)


def _embed(umap, z: np.ndarray, seed: int, max_fit: int, log) -> tuple[np.ndarray, dict[str, Any]]:
    n = len(z)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(UMAP_NEIGHBORS, n - 1), random_state=seed)
    if n <= max_fit:
        coords = reducer.fit_transform(z)
        return np.asarray(coords, np.float32), {"fitted_on": n, "subsampled": False}
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, size=max_fit, replace=False))
    log(f"analysis: UMAP layout fitted on {max_fit} of {n} latents (random subset); each other particle "
        f"placed at the mean of its {PLACE_NEIGHBORS} nearest fitted latents")
    fitted = np.asarray(reducer.fit_transform(z[fit_idx]), np.float32)
    coords = np.empty((n, 2), np.float32)
    coords[fit_idx] = fitted
    rest = np.setdiff1d(np.arange(n), fit_idx)
    coords[rest] = _place_by_neighbours(z[fit_idx], fitted, z[rest])
    return coords, {"fitted_on": max_fit, "subsampled": True, "placed_by_neighbours": int(len(rest))}


def _place_by_neighbours(z_fit: np.ndarray, emb_fit: np.ndarray, z_rest: np.ndarray) -> np.ndarray:
    """Mean embedding of each latent's nearest fitted latents: cheap, and inside the fitted layout."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=PLACE_NEIGHBORS).fit(z_fit)
    _, idx = nn.kneighbors(z_rest)
    return emb_fit[idx].mean(axis=1)
