"""A heterogeneous toy dataset with ground truth, for the demo, the tests and the benchmarks.

The molecule is a sum of Gaussian blobs: a static body and a two-blob domain that swings about a
hinge as the conformation coordinate ``t`` goes from 0 to 1. Gaussians have exact line integrals,
so particle images are computed analytically (no interpolation error to confuse with model error),
then shifted, multiplied by RELION's CTF and given white noise at a chosen SNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import CTFParams
from .lattice import centered_coords
from .poses import random_rotations
from .render import corrupt

# blob centres as fractions of the box, relative amplitudes and widths (fractions of the box)
_BODY = np.array([[-0.17, 0.00, 0.00], [-0.08, 0.09, 0.03], [-0.10, -0.09, -0.04],
                  [-0.02, 0.00, 0.10], [0.00, -0.02, -0.08], [-0.20, 0.05, 0.12]])
_BODY_AMP = np.array([1.0, 0.8, 0.9, 0.7, 0.8, 0.6])
_HINGE = np.array([0.04, 0.0, 0.0])
_ARM = np.array([[0.09, 0.02, 0.00], [0.19, -0.01, 0.03]])   # relative to the hinge at t = 0.5
_ARM_AMP = np.array([0.9, 1.0])
_SIGMA = 0.045
MAX_SWING_DEG = 60.0


def blob_model(t: float, box: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Blob centres (K, 3) in pixels, amplitudes (K,) and width (pixels) of conformation ``t`` in [0, 1]."""
    ang = math.radians((t - 0.5) * MAX_SWING_DEG)
    c, s = math.cos(ang), math.sin(ang)
    rot_y = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])        # swing in the x-z plane
    arm = _HINGE + _ARM @ rot_y.T
    centres = np.concatenate([_BODY, arm]) * box
    amps = np.concatenate([_BODY_AMP, _ARM_AMP])
    return centres, amps, max(_SIGMA * box, 1.0)


def moving_domain_mask(box: int, radius_frac: float = 0.12) -> np.ndarray:
    """Voxels swept by the moving domain (for checking where a method sees motion)."""
    c = centered_coords(box).numpy()
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1)
    mask = np.zeros((box,) * 3, bool)
    for t in np.linspace(0, 1, 9):
        cen, _, sig = blob_model(float(t), box)
        for k in range(len(_BODY), len(cen)):
            mask |= ((pts - cen[k]) ** 2).sum(-1) <= (radius_frac * box) ** 2
    return mask


def true_volume(t: float, box: int) -> np.ndarray:
    """Ground-truth map ``V[z, y, x]`` of conformation ``t`` on a ``box``^3 grid (centre at D//2)."""
    cen, amp, sig = blob_model(t, box)
    c = centered_coords(box).numpy()
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3)
    for (cx, cy, cz), a in zip(cen, amp):
        vol += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sig * sig))
    return vol.astype(np.float32)


def analytic_projection(t: float, rot: np.ndarray, box: int) -> np.ndarray:
    """Exact line integral of :func:`true_volume` along the image z axis for pose ``rot``."""
    cen, amp, sig = blob_model(t, box)
    img_c = cen @ rot.T                     # image-frame position of each blob (r_img @ rot = c)
    c = centered_coords(box).numpy()
    y, x = np.meshgrid(c, c, indexing="ij")
    out = np.zeros((box, box))
    for (cx, cy, _), a in zip(img_c, amp):
        out += a * math.sqrt(2 * math.pi) * sig * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sig * sig))
    return out


@dataclass
class SimulatedData:
    images: np.ndarray          # (N, D, D) float32, recorded images
    clean: np.ndarray           # (N, D, D) noise-free recorded images
    rot: np.ndarray             # (N, 3, 3) engine convention
    shift_px: np.ndarray        # (N, 2)
    ctf: CTFParams
    conformation: np.ndarray    # (N,) true t in [0, 1]
    pixel_size_A: float
    noise_sigma: float

    @property
    def box(self) -> int:
        return self.images.shape[-1]


def simulate(n: int, box: int = 32, *, pixel_size_A: float = 4.0, snr: float = 1.0,
             states: str | int = "continuous", max_shift_px: float = 2.0, seed: int = 0,
             defocus_range_A: tuple[float, float] = (10000.0, 25000.0), with_ctf: bool = True) -> SimulatedData:
    """Simulate ``n`` particles; ``states`` is 'continuous' (t ~ U(0, 1)) or an integer number of
    discrete conformations evenly spaced in [0, 1]."""
    rng = np.random.default_rng(seed)
    if states == "continuous":
        t = rng.uniform(0.0, 1.0, n)
    else:
        k = int(states)
        t = (rng.integers(0, k, n) / max(k - 1, 1)).astype(np.float64)
    rot = random_rotations(n, rng)
    shift = rng.uniform(-max_shift_px, max_shift_px, (n, 2))
    du = rng.uniform(*defocus_range_A, n)
    ctf = CTFParams.constant(n, defocus_u_A=du, defocus_v_A=du - rng.uniform(0, 500, n),
                             defocus_angle_deg=rng.uniform(0, 180, n), voltage_kv=300.0, cs_mm=2.7,
                             amp_contrast=0.1)
    proj = np.stack([analytic_projection(float(t[i]), rot[i], box) for i in range(n)]).astype(np.float32)
    clean = np.empty_like(proj)
    for s in range(0, n, 256):
        sl = slice(s, s + 256)
        c = torch.as_tensor(ctf.take(np.arange(n)[sl])) if with_ctf else None
        clean[sl] = corrupt(torch.as_tensor(proj[sl]), pixel_size_A, torch.as_tensor(shift[sl], dtype=torch.float32), c).numpy()
    sigma = float(np.sqrt(clean.var() / snr)) if snr > 0 else 0.0
    images = (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32) if sigma > 0 else clean.copy()
    return SimulatedData(images, clean, rot.astype(np.float32), shift.astype(np.float32),
                         ctf, t, pixel_size_A, sigma)


# ---------------------------------------------------------------------------------------------------
# general blob molecules and acquisition (the benchmark suite's generators build on these)


def blob_volume(centres: np.ndarray, amps: np.ndarray, sigma: float, box: int) -> np.ndarray:
    """Map ``V[z, y, x]`` of Gaussian blobs (centres (K, 3) in pixels from the box centre, x y z order).

    Separable per axis, so thousands of blobs (atoms) cost a matrix product, not K full-box passes."""
    c = centered_coords(box).numpy().astype(np.float64)
    cen = np.asarray(centres, np.float64)
    g = [np.exp(-((c[None, :] - cen[:, i:i + 1]) ** 2) / (2 * sigma * sigma)) for i in range(3)]
    zy = (g[2][:, :, None] * g[1][:, None, :]).reshape(len(cen), -1)       # (K, z*y)
    vol = zy.T @ (np.asarray(amps, np.float64)[:, None] * g[0])             # (z*y, x)
    return vol.reshape(box, box, box).astype(np.float32)


def blob_projection(centres: np.ndarray, amps: np.ndarray, sigma: float, rot: np.ndarray, box: int) -> np.ndarray:
    """Exact line integral of :func:`blob_volume` along the image z axis for pose ``rot`` (engine convention)."""
    img_c = np.asarray(centres, np.float64) @ np.asarray(rot, np.float64).T
    c = centered_coords(box).numpy().astype(np.float64)
    gx = np.exp(-((c[None, :] - img_c[:, 0:1]) ** 2) / (2 * sigma * sigma))
    gy = np.exp(-((c[None, :] - img_c[:, 1:2]) ** 2) / (2 * sigma * sigma))
    w = np.asarray(amps, np.float64) * math.sqrt(2 * math.pi) * sigma
    return (gy.T @ (w[:, None] * gx)).astype(np.float32)                    # (y, x)


@dataclass
class Acquisition:
    """Poses, shifts and CTF of ``n`` particles drawn as :func:`simulate` draws them."""

    rot: np.ndarray             # (N, 3, 3) engine convention
    shift_px: np.ndarray        # (N, 2)
    ctf: CTFParams


def random_acquisition(n: int, rng: np.random.Generator, *, max_shift_px: float = 2.0,
                       defocus_range_A: tuple[float, float] = (10000.0, 25000.0)) -> Acquisition:
    """Uniform poses, uniform shifts and astigmatic defocus in ``defocus_range_A`` (300 kV, Cs 2.7 mm, Q0 0.1),
    so that images made by another renderer share :func:`simulate`'s acquisition statistics."""
    rot = random_rotations(n, rng)
    shift = rng.uniform(-max_shift_px, max_shift_px, (n, 2))
    du = rng.uniform(*defocus_range_A, n)
    ctf = CTFParams.constant(n, defocus_u_A=du, defocus_v_A=du - rng.uniform(0, 500, n),
                             defocus_angle_deg=rng.uniform(0, 180, n), voltage_kv=300.0, cs_mm=2.7,
                             amp_contrast=0.1)
    return Acquisition(rot.astype(np.float32), shift.astype(np.float32), ctf)


def add_white_noise(clean: np.ndarray, snr: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Images at ``snr`` = variance of the clean (CTF-modulated) images over the noise variance, the
    definition :func:`simulate` uses; returns (images, noise sigma)."""
    sigma = float(np.sqrt(clean.var() / snr)) if snr > 0 else 0.0
    if sigma == 0:
        return clean.astype(np.float32).copy(), 0.0
    return (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32), sigma


def simulate_blob_model(model: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]], coords: np.ndarray,
                        box: int, *, pixel_size_A: float = 4.0, snr: float = 1.0, seed: int = 0,
                        max_shift_px: float = 2.0, with_ctf: bool = True) -> SimulatedData:
    """Particles of any blob molecule: ``model(coords[i]) -> (centres px, amps, sigma px)`` per particle,
    analytic projections, then :func:`simulate`'s shift, CTF and noise. ``conformation`` holds
    ``coords[:, 0]``; the caller keeps the full (N, k) coordinates."""
    rng = np.random.default_rng(seed)
    n = len(coords)
    acq = random_acquisition(n, rng, max_shift_px=max_shift_px)
    proj = np.stack([blob_projection(*model(np.atleast_1d(coords[i])), acq.rot[i], box) for i in range(n)])
    clean = np.empty_like(proj)
    for s in range(0, n, 256):
        sl = slice(s, s + 256)
        c = torch.as_tensor(acq.ctf.take(np.arange(n)[sl])) if with_ctf else None
        clean[sl] = corrupt(torch.as_tensor(proj[sl]), pixel_size_A, torch.as_tensor(acq.shift_px[sl]), c).numpy()
    images, sigma = add_white_noise(clean, snr, rng)
    conf = np.asarray(coords, np.float64).reshape(n, -1)[:, 0]
    return SimulatedData(images, clean, acq.rot, acq.shift_px, acq.ctf, conf, pixel_size_A, sigma)

