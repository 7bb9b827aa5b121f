"""Image formation: real-space projection along z, then shift and CTF in Fourier space.

The same :func:`corrupt` step is used for the neural field, for voxel maps (:func:`project_volume`,
used by the simulator and checked against ``relion_project``) so that the model is trained with
exactly the forward model the data were made with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ctf import compute_ctf, freq_grid
from .lattice import shift_phase, volume_points


def corrupt(projections: torch.Tensor, pixel_size_A: float, shift_px: torch.Tensor | None = None,
            ctf_params: torch.Tensor | None = None) -> torch.Tensor:
    """Centred projections (B, D, D) -> recorded images: translate by ``-shift_px``, multiply by the CTF."""
    if shift_px is None and ctf_params is None:
        return projections
    box = projections.shape[-1]
    f = torch.fft.rfft2(projections.float())
    if shift_px is not None:
        f = f * shift_phase(box, -shift_px.float())
    if ctf_params is not None:
        ky, kx = freq_grid(box, pixel_size_A, device=projections.device)
        f = f * compute_ctf(ctf_params.float(), ky, kx)
    return torch.fft.irfft2(f, s=(box, box))


def rotated_points(points: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Image-frame points (P, 3) -> volume-frame points (B, P, 3): ``r @ rot`` (see poses.py).

    Autocast is off here: a bf16 matmul would round the coordinates by up to 0.125 px at box 64 and
    0.5 px at box 256, and training would then see another field than the fp32 map export."""
    with torch.autocast(points.device.type, enabled=False):
        return torch.matmul(points.unsqueeze(0), rot)


def project_volume(volume: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Line integrals of a voxel map ``V[z, y, x]`` along the image z axis for each ``rot`` (B, 3, 3).

    Trilinear sampling of the map at the rotated grid, summed over z, which is exactly the
    projection the neural field is rendered with.
    """
    box = volume.shape[-1]
    pts = volume_points(box, device=volume.device).to(volume.dtype)
    world = rotated_points(pts, rot.to(volume.dtype))                      # (B, P, 3) voxel units
    # grid_sample uses align_corners=True coordinates in [-1, 1] over the index range 0..D-1
    grid = (world + box // 2) / (box - 1) * 2.0 - 1.0
    vol = volume.reshape(1, 1, box, box, box).expand(rot.shape[0], -1, -1, -1, -1)
    samples = F.grid_sample(vol, grid.view(rot.shape[0], box, box, box, 3), mode="bilinear",
                            padding_mode="zeros", align_corners=True)
    return samples[:, 0].sum(1)
