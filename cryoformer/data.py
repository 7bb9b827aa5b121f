"""What the engine needs to know about a particle set, in plain arrays.

The engine never reads a file: adapters build a :class:`ParticleData` from STAR or ``.cs`` files and
hand it over. Images stay behind the small :class:`ImageSource` protocol so a million-particle stack
can be memory-mapped and read a minibatch at a time instead of being loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageSource(Protocol):
    """Random access to square particle images, read lazily."""

    @property
    def box(self) -> int: ...

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` (0-based) as float32 ``(B, box, box)`` in the given order."""
        ...


class ArraySource:
    """An :class:`ImageSource` over an array already in memory (or a numpy memmap)."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"images must be (N, D, D), got shape {images.shape}")
        self._images = images

    @property
    def box(self) -> int:
        return int(self._images.shape[-1])

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self._images[np.asarray(indices)], dtype=np.float32)


@dataclass
class CTFParams:
    """Per-particle CTF parameters in RELION's units (Å, degrees, kV, mm, fraction).

    ``defocus_u_A`` > 0 is underfocus; ``defocus_angle_deg`` is measured from +x towards +y.
    Every field is a float array of shape (N,).
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amp_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor: np.ndarray
    scale: np.ndarray

    FIELDS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm", "amp_contrast",
              "phase_shift_deg", "bfactor", "scale")

    def __post_init__(self) -> None:
        n = None
        for name in self.FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            setattr(self, name, arr)
            if n is None:
                n = len(arr)
            elif len(arr) != n:
                raise ValueError(f"CTF field {name} has {len(arr)} values, expected {n}")

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    @classmethod
    def constant(cls, n: int, *, defocus_u_A: float | np.ndarray, defocus_v_A: float | np.ndarray | None = None,
                 defocus_angle_deg: float | np.ndarray = 0.0, voltage_kv: float = 300.0, cs_mm: float = 2.7,
                 amp_contrast: float = 0.1, phase_shift_deg: float = 0.0, bfactor: float = 0.0,
                 scale: float = 1.0) -> "CTFParams":
        def full(v: float | np.ndarray) -> np.ndarray:
            return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()
        return cls(full(defocus_u_A), full(defocus_u_A if defocus_v_A is None else defocus_v_A),
                   full(defocus_angle_deg), full(voltage_kv), full(cs_mm), full(amp_contrast),
                   full(phase_shift_deg), full(bfactor), full(scale))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as a float32 matrix (B, 9) in :attr:`FIELDS` order (what the renderer takes)."""
        return np.stack([getattr(self, f)[idx] for f in self.FIELDS], axis=1).astype(np.float32)


@dataclass
class ParticleData:
    """A particle set as the engine sees it (see :mod:`cryoformer.poses` for the pose convention).

    ``rot``/``shift_px`` are the consensus poses, or ``None`` when the orientation encoder must
    predict them. ``ctf`` is ``None`` only for CTF-free (simulated) data.
    """

    images: ImageSource
    pixel_size_A: float
    ctf: CTFParams | None = None
    rot: np.ndarray | None = None
    shift_px: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.ctf is not None and len(self.ctf) != n:
            raise ValueError(f"{len(self.ctf)} CTF rows for {n} images")
        if self.rot is not None:
            self.rot = np.asarray(self.rot, dtype=np.float32)
            if self.rot.shape != (n, 3, 3):
                raise ValueError(f"rot must have shape ({n}, 3, 3), got {self.rot.shape}")
        if self.shift_px is None and self.rot is not None:
            self.shift_px = np.zeros((n, 2), np.float32)
        if self.shift_px is not None:
            self.shift_px = np.asarray(self.shift_px, dtype=np.float32)
            if self.shift_px.shape != (n, 2):
                raise ValueError(f"shift_px must have shape ({n}, 2), got {self.shift_px.shape}")
        if not self.pixel_size_A > 0:
            raise ValueError(f"pixel size must be positive, got {self.pixel_size_A}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def box(self) -> int:
        return self.images.box

    @property
    def has_poses(self) -> bool:
        return self.rot is not None
