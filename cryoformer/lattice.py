"""Pixel and voxel grids, masks and Fourier-space image operations shared by rendering and training.

Keeping the grid construction in one place guarantees that the renderer, the volume generator and
the simulator agree on where the centre of a box is (index ``D // 2``, see :mod:`cryoformer.poses`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def centered_coords(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel coordinates ``i - D//2`` for ``i`` in ``0..D-1``."""
    return torch.arange(box, device=device, dtype=dtype) - box // 2


def image_plane_points(box: int, radius: float | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-frame lattice points (P, 3) in pixels and the flat pixel index (P,) each one projects to.

    Points are ordered z-major with (y, x) inside, and restricted to the ball of ``radius`` pixels
    (default ``D/2``, the inscribed sphere) because density outside it is never trusted: it would
    only fit noise and costs half of the evaluations.
    """
    c = centered_coords(box, device=device)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], dim=-1).reshape(-1, 3)
    pix = (torch.arange(box * box, device=device).view(1, box, box).expand(box, box, box)).reshape(-1)
    r = box / 2.0 if radius is None else float(radius)
    keep = (pts * pts).sum(-1) <= r * r
    return pts[keep], pix[keep]


def volume_points(box: int, device=None) -> torch.Tensor:
    """Volume-frame voxel centres (D^3, 3) in ``V[z, y, x]`` order, as (x, y, z) pixel coordinates."""
    c = centered_coords(box, device=device)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1).reshape(-1, 3)


def sphere_mask(box: int, radius: float | None = None, device=None) -> torch.Tensor:
    c = centered_coords(box, device=device)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = box / 2.0 if radius is None else float(radius)
    return (x * x + y * y + z * z) <= r * r


def circular_mask(box: int, radius: float | None = None, device=None) -> torch.Tensor:
    c = centered_coords(box, device=device)
    y, x = torch.meshgrid(c, c, indexing="ij")
    r = box / 2.0 if radius is None else float(radius)
    return (x * x + y * y) <= r * r


def shift_phase(box: int, shift_px: torch.Tensor, rfft: bool = True) -> torch.Tensor:
    """Phase factors (B, D, D//2+1) that translate an image by ``shift_px`` (B, 2) = (dx, dy) pixels."""
    ky = torch.fft.fftfreq(box, device=shift_px.device, dtype=shift_px.dtype)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(box, device=shift_px.device, dtype=shift_px.dtype)
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    arg = kxx * shift_px[:, 0].view(-1, 1, 1) + kyy * shift_px[:, 1].view(-1, 1, 1)
    return torch.polar(torch.ones_like(arg), -2.0 * math.pi * arg)


def translate_images(images: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Translate images (B, D, D) by ``shift_px`` (B, 2) with a Fourier phase shift (periodic)."""
    box = images.shape[-1]
    f = torch.fft.rfft2(images)
    return torch.fft.irfft2(f * shift_phase(box, shift_px.to(images.dtype)), s=(box, box))


def fourier_crop(images: np.ndarray | torch.Tensor, new_box: int) -> torch.Tensor:
    """Downsample images (B, D, D) to (B, d, d) by cropping their centred spectrum.

    Values are rescaled so that the cropped image is the projection (a sum of d voxels along z) of the
    value-preserving downsampled volume: (d/D)^2 undoes the change of FFT normalisation, and another
    d/D accounts for the shorter line integral.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    box = x.shape[-1]
    if new_box == box:
        return x.clone()
    if new_box > box or new_box % 2:
        raise ValueError(f"Fourier crop needs an even box smaller than {box}, got {new_box}")
    f = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    lo = box // 2 - new_box // 2
    f = f[..., lo:lo + new_box, lo:lo + new_box]
    out = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real
    return out * (new_box / box) ** 3


def fourier_resample_volume(vol: np.ndarray, new_box: int) -> np.ndarray:
    """A map (D, D, D) on a ``new_box``^3 grid over the same extent, by cropping or zero-padding its
    centred spectrum; voxel values keep their scale (a smooth map keeps its values).

    Maps of a model trained at box D hold no information beyond D's Nyquist frequency. Sampling the
    continuous field on a finer grid instead puts the hash grid's interpolation kinks there, which on the
    benchmark hinge correlated *negatively* with the true map in those shells (FSC -0.1 to -0.18 at shells
    19-24 of 64 for a box-32 model), and so did the corners of the box-32 spectrum beyond its Nyquist
    sphere (-0.06 to -0.09 at shells 17-23): going up, only the Nyquist sphere is kept. Going down,
    cropping is the low-pass that point sampling skips (aliasing)."""
    box = vol.shape[0]
    if new_box == box:
        return np.array(vol, dtype=np.float32)
    if new_box % 2 or box % 2:
        raise ValueError(f"Fourier resampling needs even boxes, got {box} -> {new_box}")
    f = np.fft.fftshift(np.fft.fftn(np.asarray(vol, np.float64)))
    small, large = min(box, new_box), max(box, new_box)
    lo = large // 2 - small // 2
    inner = (slice(lo, lo + small),) * 3
    if new_box < box:
        g = f[inner]
    else:  # up: only the source's Nyquist sphere; its cube corners were seen along a few directions only
        k = np.arange(box) - box // 2
        r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
        g = np.zeros((new_box,) * 3, np.complex128)
        g[inner] = np.where(r2 <= (box // 2) ** 2, f, 0)
    out = np.fft.ifftn(np.fft.ifftshift(g)).real * (new_box / box) ** 3
    return out.astype(np.float32)


def rotate_images(images: torch.Tensor, angle_rad: torch.Tensor) -> torch.Tensor:
    """Images (B, D, D) resampled at ``R(angle) q`` for each output pixel ``q`` (bilinear, about D//2).

    ``R(a) = [[cos a, sin a], [-sin a, cos a]]`` acting on (x, y): RELION's in-plane rotation, so that
    an image recorded with in-plane angle psi becomes the image of the same view with psi = 0.
    """
    b, d = images.shape[0], images.shape[-1]
    c = centered_coords(d, device=images.device, dtype=images.dtype)
    y, x = torch.meshgrid(c, c, indexing="ij")
    ca, sa = torch.cos(angle_rad).view(-1, 1, 1), torch.sin(angle_rad).view(-1, 1, 1)
    px = ca * x + sa * y
    py = -sa * x + ca * y
    grid = torch.stack([px, py], dim=-1)
    grid = (grid + d // 2) / (d - 1) * 2.0 - 1.0
    return torch.nn.functional.grid_sample(images.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=True).squeeze(1)
