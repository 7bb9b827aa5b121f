"""Scores of one epoch of one method on one suite dataset, against the dataset's truth.

The same four scores for every kind, so the comparison table has one shape: latent |Spearman| (ordered
kinds: for each true coordinate the best of the first k principal components, k = number of
coordinates, so a 2-D manifold is not judged on PC1 alone; None for assembly states, which have no order),
kNN accuracy of the state (bins for continuous kinds), moving-region correlation of the map at each
state's mean latent, and mean FSC-AUC of the maps at evaluation particles' latents.
"""

from __future__ import annotations

import numpy as np


def fourier_resample(vol: np.ndarray, box: int) -> np.ndarray:
    """Zero-pad (or crop) the centred 3-D spectrum: a map at another box with the same content, as
    cryoFormer's own maps off the training box are made; correlations and FSC ignore the scale."""
    d = vol.shape[0]
    if d == box:
        return vol.astype(np.float32)
    f = np.fft.fftshift(np.fft.fftn(vol))
    out = np.zeros((box,) * 3, complex)
    m = min(d, box)
    si, so = (d - m) // 2 + (d % 2 if d > box else 0), (box - m) // 2
    sl_in, sl_out = slice(si, si + m), slice(so, so + m)
    if d < box:
        out[sl_out, sl_out, sl_out] = f
    else:
        out = f[sl_in, sl_in, sl_in]
    return np.real(np.fft.ifftn(np.fft.ifftshift(out))).astype(np.float32) * (box / d) ** 3


def latent_spearman(z: np.ndarray, coords: np.ndarray) -> float:
    """Mean over the true coordinates of the best |Spearman| among the first k principal components."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA

    k = coords.shape[1]
    if not np.isfinite(z).all() or z.std(0).max() == 0:
        return 0.0
    pcs = PCA(min(k, z.shape[1])).fit_transform(z.astype(np.float64))
    best = [max(abs(spearmanr(pcs[:, i], coords[:, j]).statistic) for i in range(pcs.shape[1])) for j in range(k)]
    return float(np.nan_to_num(np.mean(best)))


def latent_cv_r2(z: np.ndarray, coords: np.ndarray, seed: int = 0) -> float:
    """Mean over coordinates of the 5-fold cross-validated R² of a linear map z -> coordinate."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_predict

    folds = KFold(5, shuffle=True, random_state=seed)
    r2 = []
    for j in range(coords.shape[1]):
        t = coords[:, j]
        pred = cross_val_predict(LinearRegression(), z.astype(np.float64), t, cv=folds)
        r2.append(1.0 - float(((pred - t) ** 2).sum() / max(((t - t.mean()) ** 2).sum(), 1e-12)))
    return float(np.mean(r2))


def knn_accuracy(z: np.ndarray, states: np.ndarray, seed: int = 0) -> float:
    """5-fold accuracy of a 10-neighbour classifier of the state from the latent."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    smallest = np.bincount(states)[np.unique(states)].min()
    folds = StratifiedKFold(max(2, min(5, smallest)), shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(min(10, len(z) // 2)), z, states, cv=folds).mean())


def state_mean_latents(z: np.ndarray, states: np.ndarray, n_states: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean latent of each state that has particles, those states' indices)."""
    present = np.array([s for s in range(n_states) if (states == s).any()])
    return np.stack([z[states == s].mean(0) for s in present]), present


def moving_corr(state_vols: np.ndarray, present: np.ndarray, truth_maps: np.ndarray, tf) -> float:
    """Mean correlation of each state's map with its true map where the true states differ."""
    from bench.bench_vs_cryodrgn import _apply
    from cryoformer_ext.analysis.recovery import masked_corr, moving_region

    move = moving_region(list(truth_maps))
    return float(np.mean([masked_corr(_apply(v, tf), truth_maps[s], move) for v, s in zip(state_vols, present)]))


def mean_fsc_auc(vols: np.ndarray, truths: list[np.ndarray], tf) -> float:
    from bench.bench_vs_cryodrgn import _apply
    from cryoformer.metrics import fsc, fsc_auc

    return float(np.mean([fsc_auc(fsc(_apply(v, tf), t)) for v, t in zip(vols, truths)]))


def epoch_scores(z: np.ndarray, vols: np.ndarray, state_vols: np.ndarray, present: np.ndarray, truth,
                 idx: np.ndarray, tf) -> dict:
    """All scores of one epoch; ``truth`` is a :class:`bench.suite.dataset.LoadedTruth`."""
    rec = truth.record
    out = {"spearman": latent_spearman(z, truth.coords) if rec.ordered else None,
           "cv_r2": latent_cv_r2(z, truth.coords) if rec.ordered else None,
           "knn_accuracy": knn_accuracy(z, truth.states),
           "moving_corr": moving_corr(state_vols, present, truth.state_maps, tf),
           "fsc_auc": mean_fsc_auc(vols, [truth.particle_map(int(i)) for i in idx], tf)}
    return out
