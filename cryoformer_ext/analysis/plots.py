"""PNG plots of a finished job: training loss, latent PCA / UMAP, k-means map correlations, maps.

Every figure is drawn on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, so no
global backend or figure state is touched: safe inside RELION/cryoSPARC workers and from threads) and
saved atomically through :func:`cryoformer_ext.formats.atomic.atomic_path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryoformer_ext.formats.atomic import atomic_path

MAX_SCATTER_POINTS = 20000  # more points only make the PNG slower to draw, not more informative


def _new_figure(width: float = 6.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _subsample(n: int, seed: int = 0, limit: int = MAX_SCATTER_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _class_colors(k: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_loss(loss_history: Sequence[float], path: Path) -> Path:
    """Mean training loss per epoch (log scale when it is positive and spans a decade)."""
    y = np.asarray(loss_history, dtype=float)
    x = np.arange(1, len(y) + 1)
    fig = _new_figure(6, 4)
    ax = fig.add_subplot(111)
    ax.plot(x, y, "o-", color="tab:blue", ms=4)
    finite = y[np.isfinite(y)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    if len(y) <= 30:
        ax.set_xticks(x)
    return _save(fig, path)


def plot_latent_scatter(coords: np.ndarray, labels: np.ndarray | None, centers: np.ndarray | None, path: Path, *,
                        axis_names: tuple[str, str] = ("PC1", "PC2"), title: str = "Latent space (PCA)",
                        seed: int = 0) -> Path:
    """Particles in the first two coordinates coloured by k-means class, centres numbered (1-based).

    With a single coordinate (zdim 1) it draws a histogram per class instead.
    """
    coords = np.asarray(coords, dtype=float)
    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot(111)
    k = 0 if labels is None else int(labels.max()) + 1
    colors = _class_colors(max(k, 1))
    if coords.shape[1] == 1:
        bins = np.histogram_bin_edges(coords[:, 0], bins=60)
        if labels is None:
            ax.hist(coords[:, 0], bins=bins, color="tab:blue")
        else:
            ax.hist([coords[labels == c, 0] for c in range(k)], bins=bins, stacked=True,
                    color=colors[:k], label=[f"class {c + 1}" for c in range(k)])
            ax.legend(fontsize=7, ncol=2)
        if centers is not None:
            for c, x in enumerate(centers[:, 0]):
                ax.axvline(x, color="k", lw=0.8, ls="--")
                ax.annotate(str(c + 1), (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=8)
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel("particles")
    else:
        sel = _subsample(len(coords), seed)
        if labels is None:
            ax.scatter(coords[sel, 0], coords[sel, 1], s=2, alpha=0.4, color="tab:blue", rasterized=True)
        else:
            pc = np.asarray(colors, dtype=float)[labels[sel]]
            ax.scatter(coords[sel, 0], coords[sel, 1], s=2, alpha=0.4, c=pc, rasterized=True)
        if centers is not None:
            ax.scatter(centers[:, 0], centers[:, 1], s=60, c="k", marker="x")
            for c, (x, y) in enumerate(centers[:, :2]):
                ax.annotate(str(c + 1), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9,
                            fontweight="bold")
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    return _save(fig, path)


def plot_latent_density(coords: np.ndarray, centers: np.ndarray | None, path: Path, *,
                        axis_names: tuple[str, str] = ("PC1", "PC2"), title: str = "Latent density (PCA)") -> Path:
    """2-D particle density (hexbin, log colour) in the first two coordinates with k-means centres."""
    coords = np.asarray(coords, dtype=float)
    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot(111)
    if coords.shape[1] == 1:
        ax.hist(coords[:, 0], bins=80, color="0.3", density=True)
        if centers is not None:
            for c, x in enumerate(centers[:, 0]):
                ax.axvline(x, color="tab:red", lw=0.8)
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel("density")
    else:
        gs = max(20, min(80, int(np.sqrt(len(coords)))))
        hb = ax.hexbin(coords[:, 0], coords[:, 1], gridsize=gs, bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="particles (log)")
        if centers is not None:
            ax.scatter(centers[:, 0], centers[:, 1], s=60, c="tab:red", marker="x")
            for c, (x, y) in enumerate(centers[:, :2]):
                ax.annotate(str(c + 1), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9,
                            color="tab:red", fontweight="bold")
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    return _save(fig, path)


def plot_explained_variance(ratio: Sequence[float], path: Path) -> Path:
    r = np.asarray(ratio, dtype=float)
    x = np.arange(1, len(r) + 1)
    fig = _new_figure(5.5, 4)
    ax = fig.add_subplot(111)
    ax.bar(x, r, color="tab:blue", label="per component")
    ax.plot(x, np.cumsum(r), "o-", color="tab:orange", label="cumulative")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x)
    ax.set_xlabel("principal component")
    ax.set_ylabel("fraction of latent variance")
    ax.set_title("PCA explained variance")
    ax.legend()
    return _save(fig, path)


def plot_correlation(matrix: np.ndarray, path: Path, *, title: str = "Correlation between k-means maps") -> Path:
    """Heat map of a (k, k) correlation matrix, classes numbered 1..k, values printed for k <= 12."""
    m = np.asarray(matrix, dtype=float)
    k = m.shape[0]
    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot(111)
    lo = float(np.nanmin(m)) if np.isfinite(m).any() else 0.0
    im = ax.imshow(m, cmap="magma", vmin=min(lo, 0.999), vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="Pearson correlation")
    ticks = np.arange(k)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([str(i + 1) for i in ticks])
    ax.set_yticklabels([str(i + 1) for i in ticks])
    ax.set_xlabel("k-means class")
    ax.set_ylabel("k-means class")
    if k <= 12:
        mid = (min(lo, 0.999) + 1.0) / 2
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if m[i, j] > mid else "w")
    ax.set_title(title)
    return _save(fig, path)


def plot_map_projections(consensus: np.ndarray, flexibility: np.ndarray | None, path: Path, *,
                         voxel_size_A: float = 1.0) -> Path:
    """Sum projections of the consensus map along z, y and x, and the flexibility map's maximum along
    the same axes, so one image shows where the structure moves."""
    rows = 1 if flexibility is None else 2
    fig = _new_figure(9, 3.2 * rows)
    axes_names = [("z", "x", "y"), ("y", "x", "z"), ("x", "y", "z")]  # (projected axis, horizontal, vertical)
    box = consensus.shape[0]
    ext = np.array([-box / 2, box / 2, -box / 2, box / 2]) * voxel_size_A
    for col, (axis, (proj, hor, ver)) in enumerate(zip((0, 1, 2), axes_names)):
        ax = fig.add_subplot(rows, 3, col + 1)
        ax.imshow(consensus.sum(axis=axis), cmap="gray", origin="lower", extent=ext)
        ax.set_title(f"consensus, sum along {proj}", fontsize=9)
        ax.set_xlabel(f"{hor} (Å)", fontsize=8)
        ax.set_ylabel(f"{ver} (Å)", fontsize=8)
        ax.tick_params(labelsize=7)
        if flexibility is not None:
            ax2 = fig.add_subplot(rows, 3, 3 + col + 1)
            im = ax2.imshow(flexibility.max(axis=axis), cmap="inferno", origin="lower", extent=ext)
            ax2.set_title(f"flexibility, max along {proj}", fontsize=9)
            ax2.set_xlabel(f"{hor} (Å)", fontsize=8)
            ax2.set_ylabel(f"{ver} (Å)", fontsize=8)
            ax2.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax2, fraction=0.046)
    return _save(fig, path)


def plot_pc_series(series_profiles: np.ndarray, path: Path, *, pc: int) -> Path:
    """Central-section strip of a principal-component volume series (sum along z of each map)."""
    n = len(series_profiles)
    fig = _new_figure(1.6 * n, 2.0)
    vmin, vmax = float(series_profiles.min()), float(series_profiles.max())
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(series_profiles[i], cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{i + 1}", fontsize=8)
    fig.suptitle(f"PC{pc} series (sum along z)", fontsize=9)
    return _save(fig, path)


def write_analysis_plots(ledger, *, loss_history: list[float] | None, pca, classes, umap_coords: np.ndarray | None,
                         km_corr: np.ndarray | None, consensus_vol: np.ndarray, flex_vol: np.ndarray | None,
                         pc_strips: dict[int, np.ndarray], seed: int) -> None:
    """Every plot of an analysis into ``plots/``, recorded in ``ledger`` (an
    :class:`~cryoformer_ext.analysis.ledger.OutputLedger`); ``pca``/``classes`` are the latent steps'
    results or None."""
    pdir = ledger.out_dir / "plots"
    labels = None if classes is None else classes.labels
    if loss_history:
        ledger.add_plot(plot_loss(loss_history, pdir / "loss.png"))
    if pca is not None:
        cpc = pca.model.transform(classes.centers) if classes is not None else None
        ledger.add_plot(plot_latent_scatter(pca.coords, labels, cpc, pdir / "pca_scatter.png", seed=seed))
        ledger.add_plot(plot_latent_density(pca.coords, cpc, pdir / "pca_density.png"))
        ledger.add_plot(plot_explained_variance(pca.info["explained_variance_ratio"], pdir / "pca_variance.png"))
    if umap_coords is not None:
        cum = np.stack([umap_coords[labels == c].mean(axis=0) for c in range(len(classes.centers))])
        ledger.add_plot(plot_latent_scatter(umap_coords, labels, cum, pdir / "umap_scatter.png",
                                            axis_names=("UMAP1", "UMAP2"), title="Latent space (UMAP)", seed=seed))
        ledger.add_plot(plot_latent_density(umap_coords, cum, pdir / "umap_density.png",
                                            axis_names=("UMAP1", "UMAP2"), title="Latent density (UMAP)"))
    if km_corr is not None and len(km_corr) >= 2:
        ledger.add_plot(plot_correlation(km_corr, pdir / "kmeans_correlation.png"))
    ledger.add_plot(plot_map_projections(consensus_vol, flex_vol, pdir / "maps_projections.png",
                                         voxel_size_A=ledger.apix))
    for p, strip in pc_strips.items():
        ledger.add_plot(plot_pc_series(strip, pdir / f"pc{p}_series.png", pc=p))
