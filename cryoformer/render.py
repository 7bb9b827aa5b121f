"""Image formation: real-space projection along z, then shift and CTF in Fourier space.

The same :func:`corrupt` step is used for the neural field, for voxel maps (:func:`project_volume`,
used by the simulator and checked against ``relion_project``) so that the model is trained with
exactly the forward model the data were made with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ctf import ctf_values, freq_grid
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
        f = f * ctf_values(ctf_params.float(), ky, kx)
    return torch.fft.irfft2(f, s=(box, box))


def rotated_points(points: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Image-frame points (P, 3) -> volume-frame points (B, P, 3): ``r @ rot`` (see poses.py).

    Autocast is off here: a bf16 matmul would round the coordinates by up to 0.125 px at box 64 and
    0.5 px at box 256, and training would then see another field than the fp32 map export."""
    with torch.autocast(points.device.type, enabled=False):
        return torch.matmul(points.float().unsqueeze(0), rot.float())


def pack_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices (B, W) of each row's True entries of ``keep`` (B, P), first to last, padded to the
    largest count W with index 0, and which entries are real (B, W).

    A cumulative sum and one scatter (no sort): the compaction behind rendering only the points that can
    be nonzero, with one host synchronisation (W) per call."""
    b, p = keep.shape
    counts = keep.sum(1)
    width = max(1, int(counts.max()))
    dest = torch.where(keep, torch.cumsum(keep, 1) - 1, torch.full_like(counts, width).unsqueeze(1))
    src = torch.arange(p, device=keep.device).expand(b, p)
    order = torch.zeros(b, width + 1, dtype=torch.long, device=keep.device).scatter_(1, dest, src)[:, :width]
    return order, torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)


def sample_reach(support: torch.Tensor) -> torch.Tensor:
    """From a map's possibly nonzero voxels ``support`` (D, D, D) bool, the nearest voxels at which a
    trilinear sample can be nonzero: ``support`` grown by one voxel (every voxel of a point's trilinear
    cell is within one voxel of its nearest one), on a grid padded by two voxels, (D+4)^3: the first layer
    repeats the edge (a point rounding to just outside still reaches the edge voxel), the second is never
    reached. Made once per occupancy state, looked up every step (:func:`reach_lookup`)."""
    grown = F.max_pool3d(support.float()[None, None], 3, stride=1, padding=1)
    edge = F.pad(grown, (1,) * 6, mode="replicate")[0, 0]
    return F.pad(edge, (1,) * 6) > 0


def reach_lookup(reach: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    """Whether trilinear samples at ``world`` (..., 3) voxel coordinates can be nonzero (``reach`` from
    :func:`sample_reach`). Points beyond the padded grid land on its outer layer, which is never reached."""
    g = reach.shape[-1]                                   # D + 4
    u = (torch.round(world.float()) + (g - 4) // 2 + 2).clamp_(0, g - 1)
    if g ** 3 > 1 << 24:                                  # fp32 holds the flat index exactly up to D = 252
        u = u.long()
    idx = (u[..., 2] * g + u[..., 1]) * g + u[..., 0]
    return reach.view(-1)[idx.long()]


def project_volumes(volumes: torch.Tensor, rot: torch.Tensor, points: torch.Tensor | None = None,
                    pixels: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                    reach: torch.Tensor | None = None) -> torch.Tensor:
    """Line integrals along the image z axis of maps ``V[z, y, x]`` (B or 1, D, D, D) in poses ``rot`` (B, 3, 3).

    The maps are sampled trilinearly at the rotated image-plane lattice ``points`` (P, 3) (voxel units;
    default: the whole D^3 cube) and summed into their image pixels ``pixels`` (P,). Restricting the
    lattice to the inscribed sphere halves the work and changes nothing where the maps vanish outside it.
    ``offset`` (3,) voxels: the maps' voxel ``i`` holds the density at ``x_i + offset`` (a jittered grid).
    ``reach``: :func:`sample_reach` of the voxels where the maps may be nonzero (an occupancy mask); only
    the lattice points whose samples can be nonzero are sampled (the rest would add 0).
    """
    b, box = rot.shape[0], volumes.shape[-1]
    if points is None:
        points = volume_points(box, device=volumes.device)
        pixels = torch.arange(box * box, device=volumes.device).repeat(box)
    world = rotated_points(points, rot)                                      # (B, P, 3) voxel units
    if offset is not None:
        world = world - offset.float()
    weight = None
    if reach is not None:                                                    # occupied columns only
        order, weight = pack_rows(reach_lookup(reach, world))
        world = torch.gather(world, 1, order.unsqueeze(-1).expand(-1, -1, 3))
        pixels = pixels[order] + (torch.arange(b, device=world.device) * box * box).unsqueeze(1)
    # grid_sample uses align_corners=True coordinates in [-1, 1] over the index range 0..D-1
    grid = (world + box // 2) * (2.0 / (box - 1)) - 1.0
    vol = volumes.reshape(-1, 1, box, box, box).float().expand(b, -1, -1, -1, -1)
    samples = F.grid_sample(vol, grid.view(b, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                            align_corners=True).view(b, -1)
    out = torch.zeros(b, box * box, device=volumes.device, dtype=samples.dtype)
    if weight is None:
        return out.index_add_(1, pixels, samples).view(b, box, box)
    return out.view(-1).index_add_(0, pixels.reshape(-1), (samples * weight).reshape(-1)).view(b, box, box)


def project_volume(volume: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Line integrals of one voxel map ``V[z, y, x]`` along the image z axis for each ``rot`` (B, 3, 3).

    Trilinear sampling of the map at the rotated grid, summed over z: the projection the simulator is
    checked with against ``relion_project``, and the one the canonical renderer uses."""
    return project_volumes(volume.unsqueeze(0), rot.to(volume.dtype))
