"""A soft solvent mask the next RELION or cryoSPARC job can use as it is.

The rule is RELION's ``relion_mask_create --ini_threshold T --extend_inimask E --width_soft_edge W``
(``autoMask`` in RELION's ``mask.cpp``): voxels at or above ``T`` are 1; voxels closer than ``E`` pixels
to them become 1 as well; voxels closer than ``W`` pixels to that extended mask get the raised cosine
``0.5 + 0.5 cos(pi d / W)``. Writing the same rule lets users reason about our mask with the
parameters they already know, and lets a test compare it with the real binary. The threshold comes from
the map itself (a fraction of its robust maximum, cryoDRGN's ``gen_mask`` rule), because a network's
density has no absolute scale a user could type in.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import distance_transform_edt

#: percentile taken as the map's maximum: a single hot voxel must not set the threshold
ROBUST_MAX_PERCENTILE = 99.99


class SoftMaskSettings(BaseModel):
    """How the solvent mask is made; the names follow the job parameters ``mask_*``."""

    model_config = ConfigDict(extra="forbid")

    threshold_fraction: float = Field(0.5, gt=0, lt=1, description="initial threshold as a fraction of the "
                                      "map's 99.99th percentile")
    extend_px: float | None = Field(None, ge=0, description="binary extension of the thresholded region, in "
                                    "pixels of the map (None: one training-box pixel)")
    soft_edge_px: float | None = Field(None, ge=0, description="width of the raised-cosine edge, in pixels of "
                                       "the map (None: two training-box pixels)")

    def resolved(self, map_px_per_train_px: float) -> "SoftMaskSettings":
        """Settings in pixels of the map. Unset widths follow the training box's pixel, the finest detail
        the maps hold: a map Fourier-upsampled 4x is 4x smoother in pixels, so its margins are 4x wider."""
        return self.model_copy(update={
            "extend_px": self.extend_px if self.extend_px is not None else 1.0 * map_px_per_train_px,
            "soft_edge_px": self.soft_edge_px if self.soft_edge_px is not None else 2.0 * map_px_per_train_px})


class SoftMask(BaseModel):
    """The mask and how it was made (the summary records it so a user can redo it with RELION)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    values: np.ndarray
    threshold: float
    settings: SoftMaskSettings

    def fraction_above_half(self) -> float:
        return float(np.mean(self.values > 0.5))


def robust_threshold(vol: np.ndarray, fraction: float) -> float:
    """``fraction`` of the map's 99.99th percentile: scale-free, and insensitive to a few outliers."""
    top = float(np.percentile(vol, ROBUST_MAX_PERCENTILE))
    if not np.isfinite(top) or top <= 0:
        raise ValueError(f"cannot make a solvent mask: the map has no positive density (99.99th percentile {top:g})")
    return fraction * top


def relion_soft_mask(vol: np.ndarray, threshold: float, extend_px: float, soft_edge_px: float) -> np.ndarray:
    """RELION's ``autoMask``: threshold, extend by ``extend_px``, raised-cosine edge of ``soft_edge_px``.

    RELION searches neighbours within a cube and compares squared distances strictly (``r2 < E2``); the
    Euclidean distance transform gives the same nearest distance without the search."""
    binary = np.asarray(vol) >= threshold
    if not binary.any():
        raise ValueError(f"cannot make a solvent mask: no voxel reaches the threshold {threshold:g}")
    if extend_px > 0:
        binary = distance_transform_edt(~binary) < extend_px
    out = binary.astype(np.float32)
    if soft_edge_px > 0:
        d = distance_transform_edt(~binary)
        edge = (~binary) & (d < soft_edge_px)
        out[edge] = (0.5 + 0.5 * np.cos(np.pi * d[edge] / soft_edge_px)).astype(np.float32)
    return out


def soft_mask(vol: np.ndarray, settings: SoftMaskSettings | None = None, map_px_per_train_px: float = 1.0) -> SoftMask:
    """The solvent mask of ``vol`` (a map, or the voxel-wise maximum over several so no state is cut)."""
    settings = (settings or SoftMaskSettings()).resolved(map_px_per_train_px)
    t = robust_threshold(vol, settings.threshold_fraction)
    values = relion_soft_mask(vol, t, settings.extend_px, settings.soft_edge_px)
    return SoftMask(values=values, threshold=t, settings=settings)
