"""How well a reconstruction recovered a known motion: scores for simulated data with ground truth.

Whole-box FSC is dominated by the static core and barely separates a resolved motion from a consensus
map, so the maps are also scored where the true conformations differ (the *moving region*), and the
latents directly: is the motion their main axis (|Spearman| of PC1 with the truth), can it be read off
them (cross-validated linear R^2), do neighbours in latent space share a conformation (kNN accuracy).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from pydantic import BaseModel


class LatentScores(BaseModel):
    spearman_pc1: float
    cv_r2: float
    knn_accuracy: float | None = None
    chance_accuracy: float | None = None
    latent_std: float


def latent_scores(latents: np.ndarray, t: np.ndarray, states: np.ndarray | None = None, seed: int = 0) -> LatentScores:
    """Scores of latents (N, zdim) against the true conformation ``t`` (N,) and, for discrete
    conformations, the state label of each particle (kNN accuracy, 10 neighbours, 5-fold)."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_score, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    z = np.asarray(latents, np.float64)
    if z.shape[1] == 0 or not np.isfinite(z).all() or z.std(0).max() == 0:
        return LatentScores(spearman_pc1=0.0, cv_r2=0.0, latent_std=0.0)
    pc1 = PCA(1).fit_transform(z)[:, 0]
    folds = KFold(5, shuffle=True, random_state=seed)
    pred = cross_val_predict(LinearRegression(), z, t, cv=folds)
    r2 = 1.0 - float(((pred - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    out = LatentScores(spearman_pc1=float(abs(spearmanr(pc1, t).statistic)), cv_r2=r2,
                       latent_std=float(z.std(0).mean()))
    if states is not None:
        acc = cross_val_score(KNeighborsClassifier(10), z, states, cv=folds)
        out.knn_accuracy = float(acc.mean())
        out.chance_accuracy = float(np.bincount(states).max() / len(states))
    return out


def moving_region(truths: list[np.ndarray], frac: float = 0.1) -> np.ndarray:
    """Voxels where the true conformations differ: their standard deviation exceeds ``frac`` of its maximum."""
    sd = np.std(np.stack(truths), axis=0)
    return sd > frac * sd.max()


def masked_corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


class StateScores(BaseModel):
    """Maps at the mean latent of each true state, scored against every true map."""

    states: list[float]
    particles: list[int]
    moving_corr: list[float]          # with its own truth, inside the moving region
    sphere_corr: list[float]          # with its own truth, inside the sphere
    best_match: list[int]             # the truth it correlates best with (moving region)
    mean_moving_corr: float
    recovered: int


def state_scores(volumes_at: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, t: np.ndarray,
                 state_values: np.ndarray, truth: Callable[[float], np.ndarray], box: int,
                 width: float | None = None) -> StateScores:
    """``volumes_at(z (K, zdim)) -> (K, box, box, box)``; particles within ``width`` of a state value
    (default: exact match, for discrete states) give its mean latent."""
    from cryoformer.lattice import sphere_mask

    truths = [truth(float(s)) for s in state_values]
    move = moving_region(truths)
    sphere = sphere_mask(box).numpy()
    zs, counts = [], []
    for s in state_values:
        sel = np.isclose(t, s) if width is None else np.abs(t - s) < width
        counts.append(int(sel.sum()))
        zs.append(latents[sel].mean(0) if sel.any() else latents.mean(0))
    vols = volumes_at(np.stack(zs))
    moving, sph, best = [], [], []
    for i, v in enumerate(vols):
        corr = [masked_corr(v, tv, move) for tv in truths]
        moving.append(corr[i])
        sph.append(masked_corr(v, truths[i], sphere))
        best.append(int(np.argmax(corr)))
    return StateScores(states=[float(s) for s in state_values], particles=counts, moving_corr=moving,
                       sphere_corr=sph, best_match=best, mean_moving_corr=float(np.mean(moving)),
                       recovered=int(sum(b == i for i, b in enumerate(best))))


def recovery_report(t_true: np.ndarray, latents: np.ndarray, generator, box: int,
                    n_states: int = 5, width: float = 0.1) -> dict[str, Any]:
    """How well the latent space and the maps recover a known one-dimensional motion (the demo's table).

    For each of ``n_states`` true conformations, the map at the mean latent of the particles within
    ``width`` of it is compared (Pearson, inside the sphere) with every true map; a conformation is
    recovered when its own truth is the best match.
    """
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA

    from cryoformer.lattice import sphere_mask
    from cryoformer.simulate import true_volume

    out: dict[str, Any] = {}
    if latents.shape[1] > 0:
        pc1 = PCA(1).fit_transform(latents)[:, 0]
        out["spearman_pc1_vs_truth"] = float(abs(spearmanr(pc1, t_true).statistic))
    ts = np.linspace(0.05, 0.95, n_states)
    mask = sphere_mask(box).numpy()
    truths = [true_volume(float(t), box) for t in ts]
    rows = []
    for i, t in enumerate(ts):
        sel = np.abs(t_true - t) < width
        z = latents[sel].mean(0, keepdims=True) if latents.shape[1] else None
        vol = generator.volumes(z, box)[0]
        corr = [masked_corr(vol, tv, mask) for tv in truths]
        rows.append({"true_conformation": float(t), "particles": int(sel.sum()), "corr_with_truths": corr,
                     "best_match": int(np.argmax(corr)), "recovered": bool(np.argmax(corr) == i)})
    out["states"] = rows
    out["recovered"] = int(sum(r["recovered"] for r in rows))
    out["n_states"] = n_states
    return out
