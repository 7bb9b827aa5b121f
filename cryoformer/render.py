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
    0.5 px at box 256, and training would then see another field than the fp32 map export. One (P, 3) @
    (3, 3B) product, returned as a (B, P, 3) view: the broadcast batched product with its inner size of 3
    ran 10x slower on CPU (box 64 sphere, 8 images: 15 vs 1.3 ms)."""
    b = rot.shape[0]
    with torch.autocast(points.device.type, enabled=False):
        flat = points.float() @ rot.float().permute(1, 0, 2).reshape(3, 3 * b)
        return flat.view(-1, b, 3).transpose(0, 1)


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


def _native_pack(points: torch.Tensor, pixels: torch.Tensor, rot: torch.Tensor, offset: torch.Tensor | None,
                 reach: torch.Tensor | None, box: int) -> tuple[torch.Tensor, ...] | None:
    """Voxel coordinates (B, P, 3), pixel indices (B, P) and counts (B,) of each image's lattice points
    that can reach a nonzero voxel, first to last, from the C kernel (``native/project.c``: rotation,
    reach test and compaction in one pass, no host synchronisation). None where it cannot run: no
    occupancy mask, poses or offset with a gradient (predicted poses), tensors off the CPU, or no
    kernels built."""
    if reach is None or points.device.type != "cpu" or rot.requires_grad or \
            (offset is not None and offset.requires_grad):
        return None
    from .native.build import kernels

    lib = kernels()
    if lib is None:
        return None
    b, p = rot.shape[0], points.shape[0]
    pts = points.float().contiguous()
    pix_in = pixels.to(torch.int64).contiguous()
    rots = rot.detach().float().contiguous()
    off = None if offset is None else offset.detach().float().contiguous()
    mask = reach.contiguous().view(torch.uint8)
    grid = torch.empty(b, p, 3)
    pix = torch.empty(b, p, dtype=torch.int64)
    counts = torch.empty(b, dtype=torch.int64)
    with torch.profiler.record_function("cf:project"):
        lib.reach_pack(pts.data_ptr(), pix_in.data_ptr(), p, rots.data_ptr(), b,
                       None if off is None else off.data_ptr(), mask.data_ptr(), reach.shape[-1], box,
                       grid.data_ptr(), pix.data_ptr(), counts.data_ptr())
    return grid, pix, counts


class _PackedProjection(torch.autograd.Function):
    """Maps -> the sums of their trilinear samples at packed points, per pixel (C kernel): grid_sample
    with zero padding and index_add in one pass, and their adjoint in the backward. A map is given by its
    values (Bv, M) at the voxels ``slots`` points to (a (D^3,) int32 map from voxel to column, -1 where
    the map is 0), or dense (M = D^3) when ``slots`` is None; Bv = 1: one map for every image."""

    @staticmethod
    def forward(ctx, values, slots, coords, pix, counts, box, d):
        from .native.build import kernels

        b = counts.shape[0]
        v = values.detach().float().contiguous()
        vstride = 0 if v.shape[0] == 1 and b > 1 else v.shape[1]
        out = torch.zeros(b * box * box)
        kernels().project_fwd(v.data_ptr(), vstride, None if slots is None else slots.data_ptr(), d,
                              coords.data_ptr(), pix.data_ptr(), coords.shape[1], counts.data_ptr(), b,
                              out.data_ptr())
        ctx.save_for_backward(coords, pix, counts, *(() if slots is None else (slots,)))
        ctx.vshape, ctx.vstride, ctx.d = v.shape, vstride, d
        return out.view(b, box, box)

    @staticmethod
    def backward(ctx, grad):
        from .native.build import kernels

        coords, pix, counts, *slots = ctx.saved_tensors
        gvals = torch.zeros(ctx.vshape)
        g = grad.float().contiguous()
        kernels().project_bwd(gvals.data_ptr(), ctx.vstride, slots[0].data_ptr() if slots else None, ctx.d,
                              coords.data_ptr(), pix.data_ptr(), coords.shape[1], counts.data_ptr(),
                              counts.shape[0], g.data_ptr())
        return gvals, None, None, None, None, None, None


def voxel_slots(voxels: torch.Tensor, box: int) -> torch.Tensor:
    """(box^3,) int32: the column of each flat voxel index in ``voxels`` (P,), -1 for the others."""
    slots = torch.full((box ** 3,), -1, dtype=torch.int32, device=voxels.device)
    return slots.index_put_((voxels,), torch.arange(len(voxels), dtype=torch.int32, device=voxels.device))


def project_sparse(values: torch.Tensor, voxels: torch.Tensor, slots: torch.Tensor | None, box: int,
                   rot: torch.Tensor, points: torch.Tensor, pixels: torch.Tensor, offset: torch.Tensor | None = None,
                   reach: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`project_volumes` of maps (B, box, box, box) that are ``values`` (B, P) at the flat voxel
    indices ``voxels`` (P,) and 0 elsewhere (``slots``: :func:`voxel_slots` of them, or None).

    On a CPU with the C kernels the maps are never made: the samples read the values through ``slots``,
    and the backward writes the values' gradient directly (a dense map of a box-64 minibatch is 8 MB to
    clear, fill and read back each way, every step)."""
    packed = None if slots is None else _native_pack(points, pixels, rot, offset, reach, box)
    if packed is not None:
        return _PackedProjection.apply(values, slots, *packed, box, box)
    b = rot.shape[0]
    vol = torch.zeros(b, box ** 3, device=values.device, dtype=values.dtype).index_copy(1, voxels, values)
    return project_volumes(vol.view(b, box, box, box), rot, points, pixels, offset, reach=reach)


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
    packed = _native_pack(points, pixels, rot, offset, reach, box)
    if packed is not None:
        return _PackedProjection.apply(volumes.reshape(-1, box ** 3), None, *packed, box, box)
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
