"""Where the molecule can be: a coarse occupancy grid, as Instant-NGP's density bitfield.

Rendering evaluates the network only in occupied cells and takes the density elsewhere to be 0. A
molecule fills 10-30 % of the training sphere even over all its conformations (a simulated hinge: 12 %),
so this is most of the cost of a training step; it is also a solvent mask: the field cannot fit noise
where no particle has density.

The grid lives in the normalised box ``[-1/2, 1/2)^3`` (``cells`` per axis), so one grid serves every
box the field is sampled at (a coarse-to-fine schedule, maps at another box). It starts full and is
estimated from the field itself (:meth:`CryoFormer.estimate_occupancy`): the union over many particles'
latents of the cells whose mean density is not negligible, grown by a margin so that a domain that moves
further than the particles seen so far is not cut. Cells just outside the molecule stay trainable
through the margin, so a later refresh can grow the grid again where the field learns new density.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lattice import volume_points


class OccupancyGrid(nn.Module):
    """A boolean grid of ``cells``^3 over the box; part of the model's state (checkpoint, resume)."""

    def __init__(self, cells: int):
        super().__init__()
        if cells < 1:
            raise ValueError(f"occupancy grid needs at least one cell per axis, got {cells}")
        self.cells = int(cells)
        self.register_buffer("occupied", torch.ones((cells,) * 3, dtype=torch.bool))
        self.register_buffer("estimates", torch.zeros((), dtype=torch.long))  # how often it was estimated
        # changes whenever ``occupied`` may have: users of the grid cache what they derive from it
        self.version = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._bump())

    def _bump(self) -> None:
        self.version += 1

    @property
    def is_full(self) -> bool:
        return bool(self.occupied.all())

    def cell_index(self, pts_px: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat cell index of points (..., 3) given as (x, y, z) pixels of a ``box`` grid, and whether the
        point lies inside the grid at all (points outside are never occupied)."""
        g = self.cells
        # voxel index first, then the scale: at a cell boundary ``(i * g) / box`` is an exact integer, where
        # ``(p / box + 0.5) * g`` rounded some boundary voxels down a cell (at box 24, 12 cells of 2 pixels
        # held 3, 1, 3, ... voxels, and a 1-voxel cell's margin is a single voxel)
        u = torch.floor((pts_px.float() + box / 2) * g / box).long()
        inside = ((u >= 0) & (u < g)).all(-1)
        u = u.clamp(0, g - 1)
        return (u[..., 2] * g + u[..., 1]) * g + u[..., 0], inside

    def lookup(self, pts_px: torch.Tensor, box: int) -> torch.Tensor:
        """Whether each point (..., 3) in ``box`` pixels lies in an occupied cell."""
        idx, inside = self.cell_index(pts_px, box)
        return self.occupied.view(-1)[idx] & inside

    def voxel_mask(self, box: int) -> torch.Tensor:
        """Occupied voxels of a ``box``^3 map, ``V[z, y, x]`` order (bool)."""
        pts = volume_points(box, device=self.occupied.device)
        return self.lookup(pts, box).view(box, box, box)

    @torch.no_grad()
    def update(self, cell_density: torch.Tensor, threshold: float, margin: int) -> float:
        """Occupy the cells whose |density| exceeds ``threshold`` x its maximum, grown by ``margin`` cells.

        ``cell_density`` (cells, cells, cells) is the largest |mean density| of each cell over the latents
        looked at (cells never evaluated hold 0). Returns the occupied fraction of the grid."""
        d = cell_density.abs().float()
        peak = float(d.max())
        keep = d > threshold * peak if peak > 0 else torch.ones_like(d, dtype=torch.bool)
        self.occupied.copy_(dilate(keep, margin))
        self.estimates += 1
        self._bump()
        return float(self.occupied.float().mean())

    @torch.no_grad()
    def set_from_volumes(self, volumes, threshold: float = 0.02, margin: int = 1) -> float:
        """Occupancy of known maps (e.g. a simulation's true conformations, or a user's mask); returns the
        occupied fraction of the training sphere's voxels."""
        vols = [torch.as_tensor(v, dtype=torch.float32, device=self.occupied.device) for v in volumes]
        box = vols[0].shape[-1]
        cell = torch.stack([cell_means(v.view(1, -1), box, self) for v in vols]).abs().amax(0)
        self.update(cell.view((self.cells,) * 3), threshold, margin)
        return self.sphere_fraction(box)

    def sphere_fraction(self, box: int) -> float:
        """Occupied fraction of the voxels inside the inscribed sphere of a ``box`` grid."""
        pts = volume_points(box, device=self.occupied.device)
        inside = (pts * pts).sum(-1) <= (box / 2.0) ** 2
        return float(self.lookup(pts[inside], box).float().mean())


# a cell is never smaller than this many training-box pixels: the estimate looks at every second voxel
# of the lattice, and a finer cell would sit inside one voxel's trilinear support
MIN_CELL_PX = 2


def cells_for(box: int, pixel_size_A: float, cell_A: float | None, cell_px: int = 4) -> int:
    """Cells per axis of a grid over a ``box`` of ``pixel_size_A`` pixels whose cells are ``cell_A`` Å wide
    (at least ``MIN_CELL_PX`` pixels; None: ``cell_px`` pixels, the size regardless of the pixel).

    A cell in pixels is coarse where the box is small: 4 px at box 32 of a 3 Å pixel is 12 Å, and with a
    one-cell margin the grid rendered 40-47 % of the sphere around a molecule whose conformations together
    fill 12 %. A physical cell follows the molecule's shape at every training box."""
    if box < 1 or pixel_size_A <= 0:
        raise ValueError(f"occupancy grid of a {box}-pixel box of {pixel_size_A} Å pixels")
    if cell_A is None:
        px = float(cell_px)
    else:
        if cell_A <= 0:
            raise ValueError(f"occupancy cell size must be positive, got {cell_A} Å")
        px = max(float(MIN_CELL_PX), cell_A / pixel_size_A)
    return max(1, int(round(box / px)))


def dilate(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """Grow a boolean 3-D mask by ``margin`` cells (a cube structuring element)."""
    if margin <= 0:
        return mask.clone()
    x = mask.float()[None, None]
    return F.max_pool3d(x, 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0


#: a cell counts as occupied for the union when this fraction of the latents looked at reach its density
#: (4 of the 64 latents of an estimate)
UNION_FRACTION = 1 / 16


def union_over_latents(cell_values: torch.Tensor) -> torch.Tensor:
    """Per cell, the density (of the map's own sign) that at least ``UNION_FRACTION`` of the latents reach:
    (K, n) signed cell means -> (n,) >= 0.

    A conformation that some of the particles take keeps its cells, as with the plain maximum over the
    latents. But where the field has fitted noise (outside the molecule, at low SNR) a cell's mean changes
    sign and size from latent to latent: its largest |value| over 64 latents beat 5 % of the peak, the
    margin around it became trainable and fitted noise too, and the grid grew at every estimate (adenylate
    kinase at SNR 0.05: 32, 35, 56, 81 % of the sphere at the four estimates of 20 epochs; with the query
    position code 92, 39, 48, 71 %, against 82, 44, 42, 51 % with this union). Negative values are noise of
    the other sign whatever the contrast: the molecule's sign is that of the largest mean over the latents."""
    mean = cell_values.mean(0)
    sign = 1.0 if float(mean[mean.abs().argmax()]) >= 0 else -1.0
    k = max(1, round(cell_values.shape[0] * UNION_FRACTION))
    return (cell_values * sign).topk(k, dim=0).values[-1].clamp_min(0)


def cell_means(values: torch.Tensor, box: int, grid: OccupancyGrid, voxels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` (K, P) over the voxels of each cell -> (K, cells^3).

    ``voxels`` (P,) are the flat ``V[z, y, x]`` indices of ``box``^3 the values belong to (all when None);
    averaging over a cell rather than taking its maximum keeps noise the field has fitted from
    occupying empty cells."""
    dev = values.device
    pts = volume_points(box, device=dev)
    if voxels is not None:
        pts = pts[voxels]
    idx, _ = grid.cell_index(pts, box)
    n = grid.cells ** 3
    sums = torch.zeros(values.shape[0], n, device=dev).index_add_(1, idx, values.float())
    count = torch.zeros(n, device=dev).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    return sums / count.clamp_min(1)
