"""Nearest-neighbour resampling of label and binary maps onto the output box.

Density maps are Fourier-resampled (``Reconstruction.volumes``), but a map of token indices or a 0/1
grid must keep its values: interpolating ``3`` and ``7`` gives a token that was never chosen. Both
grids share RELION's convention (origin at voxel ``box // 2``, same physical extent), so each output
voxel takes the value of the input voxel whose centre is nearest.
"""

from __future__ import annotations

import numpy as np


def nearest_indices(box_in: int, box_out: int) -> np.ndarray:
    """Input index nearest each output voxel centre along one axis (same extent, origin at box // 2)."""
    i = np.arange(box_out, dtype=np.float64)
    j = (i - box_out // 2) * (box_in / box_out) + box_in // 2
    return np.clip(np.floor(j + 0.5).astype(np.int64), 0, box_in - 1)


def resample_nearest(vol: np.ndarray, box_out: int) -> np.ndarray:
    """``vol`` (box_in^3) on a ``box_out``^3 grid of the same physical size, values kept as they are."""
    vol = np.asarray(vol)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"expected a cubic map, got shape {vol.shape}")
    if vol.shape[0] == box_out:
        return vol
    idx = nearest_indices(vol.shape[0], box_out)
    return vol[np.ix_(idx, idx, idx)]
