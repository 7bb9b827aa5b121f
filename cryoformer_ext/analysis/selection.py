"""Which particles to keep: by k-means class, by a range on a principal component, or inside a polygon
drawn on the PC1/PC2 plot (``plots/pca_scatter.png`` shows those coordinates).

Each selector returns a boolean mask over the particles in input order; :func:`finish` applies
``--invert`` and turns it into sorted 0-based indices with a description for the record.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from cryoformer_ext.jobdir import JobFiles, JobFilesError


class Selection(BaseModel):
    """A particle subset: 0-based indices in input order, and how it was chosen."""

    indices: list[int]
    n_total: int
    criterion: str
    inverted: bool = False

    def array(self) -> np.ndarray:
        return np.asarray(self.indices, dtype=np.int64)


def by_classes(job: JobFiles, classes: list[int]) -> np.ndarray:
    """Particles whose k-means class (1-based) is one of ``classes``."""
    labels = job.require_classes()
    wanted = np.asarray([job.check_class(c) - 1 for c in classes])
    return np.isin(labels, wanted)


def by_pc_range(job: JobFiles, pc: int, lo: float, hi: float) -> np.ndarray:
    """Particles with ``lo <= coordinate on principal component pc (1-based) <= hi``."""
    coords = job.require_pca()
    if not 1 <= pc <= coords.shape[1]:
        raise JobFilesError(f"principal component {pc} does not exist (the PCA has {coords.shape[1]}; 1-based)")
    if not lo <= hi:
        raise JobFilesError(f"range {lo:g} {hi:g}: the lower bound must come first")
    x = coords[:, pc - 1]
    return (x >= lo) & (x <= hi)


def read_polygon(path: str | os.PathLike) -> np.ndarray:
    """Polygon vertices (M >= 3, 2) on PC1/PC2 from a text file (two numbers per line, ``#`` comments)
    or a ``.npy`` array."""
    path = Path(path)
    if not path.is_file():
        raise JobFilesError(f"{path}: polygon file not found")
    try:
        verts = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, comments="#", delimiter=None, ndmin=2)
    except ValueError as err:
        raise JobFilesError(f"{path}: not a list of PC1 PC2 vertex pairs ({err})") from None
    verts = np.asarray(verts, dtype=np.float64)
    if verts.ndim != 2 or verts.shape[1] != 2 or len(verts) < 3:
        raise JobFilesError(f"{path}: need at least 3 vertices with 2 coordinates (PC1 PC2) each, got shape {verts.shape}")
    if not np.isfinite(verts).all():
        raise JobFilesError(f"{path}: vertices must be finite numbers")
    return verts


def by_polygon(job: JobFiles, vertices: np.ndarray) -> np.ndarray:
    """Particles whose (PC1, PC2) lies inside the polygon (edges close back to the first vertex)."""
    from matplotlib.path import Path as MplPath

    coords = job.require_pca()
    if coords.shape[1] < 2:
        raise JobFilesError("a polygon selection needs two principal components (the job has zdim 1)")
    return MplPath(np.asarray(vertices, dtype=np.float64)).contains_points(coords[:, :2])


def finish(mask: np.ndarray, criterion: str, invert: bool = False) -> Selection:
    mask = np.asarray(mask, dtype=bool)
    if invert:
        mask = ~mask
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        raise JobFilesError(f"the selection ({'not ' if invert else ''}{criterion}) contains no particles")
    return Selection(indices=idx.tolist(), n_total=int(mask.size), criterion=criterion, inverted=invert)
