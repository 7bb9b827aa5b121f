"""Map-quality measures: Fourier shell correlation and the numbers derived from it.

FSC is computed on integer shells of the centred 3-D spectrum (shell k holds |f| in [k-0.5, k+0.5)
in pixels of frequency), as RELION does, so numbers are comparable with ``relion_image_handler --fsc``.
"""

from __future__ import annotations

import numpy as np


def fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC for shells 0..D/2 of two cubic maps of the same box."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps must be cubes of one size, got {a.shape} and {b.shape}")
    d = a.shape[0]
    fa = np.fft.fftn(np.asarray(a, np.float64))
    fb = np.fft.fftn(np.asarray(b, np.float64))
    k = np.fft.fftfreq(d) * d
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    shell = np.rint(np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)).astype(np.int64).ravel()
    n = d // 2 + 1
    keep = shell < n
    s = shell[keep]
    num = np.bincount(s, (fa * np.conj(fb)).real.ravel()[keep], n)
    da = np.bincount(s, (np.abs(fa) ** 2).ravel()[keep], n)
    db = np.bincount(s, (np.abs(fb) ** 2).ravel()[keep], n)
    return num / np.sqrt(np.maximum(da * db, 1e-300))


def resolution_px(curve: np.ndarray, threshold: float = 0.5) -> float:
    """Resolution (pixels per period) where the FSC first drops below ``threshold``.

    Linear interpolation between shells; 2 px (Nyquist) when it never drops, as CryoBench reports.
    """
    d = 2 * (len(curve) - 1)
    for k in range(1, len(curve)):
        if curve[k] < threshold:
            k0, c0, c1 = k - 1, curve[k - 1], curve[k]
            frac = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
            shell = k0 + frac
            return float(d / max(shell, 1e-9))
    return 2.0


def fsc_auc(curve: np.ndarray) -> float:
    """Area under the FSC curve over spatial frequency 0..0.5 cycles/pixel (CryoBench's AU-FSC)."""
    freq = np.linspace(0.0, 0.5, len(curve))
    return float(np.trapezoid(curve, freq)) if hasattr(np, "trapezoid") else float(np.trapz(curve, freq))
