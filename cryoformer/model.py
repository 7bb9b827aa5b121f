"""cryoFormer: encoders + structure decoder + hash-grid spatial field + real-space renderer.

One forward pass takes a minibatch of recorded images with their CTFs (and poses when given),
encodes each image's conformation, renders the predicted images and returns the loss terms.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from .decoder import SpatialDensityHead, StructureDecoder
from .encoders import DeformationEncoder, OrientationEncoder
from .hashgrid import HashGrid, HashGridPlan, make_plan, plan_bytes, planned_forward
from .lattice import fourier_crop, image_plane_points, translate_images, volume_points
from .memory import activation_budget, points_per_chunk
from .occupancy import OccupancyGrid, cell_means, union_over_latents
from .render import corrupt, pack_rows, project_sparse, rotated_points, sample_reach, voxel_slots


class ModelConfig(BaseModel):
    """Architecture of one model; stored in every checkpoint so a job can be reloaded alone."""

    model_config = ConfigDict(extra="forbid")

    box: int = Field(..., ge=8, description="training box (pixels)")
    pixel_size_A: float = Field(..., gt=0, description="pixel size of the training box")
    zdim: int = 8
    tokens: int = 64
    channels: int = 64
    heads: int = 4
    blocks: int = 3
    cross_values: Literal["queries", "deformation"] = "deformation"
    attention: Literal["point", "literal"] = "point"
    enc_layers: int = 10
    enc_dim: int = 128
    hash_levels: int = 16
    hash_features: int = 2
    hash_log2_size: int = 15
    hash_base: int = 16
    hash_scale: float | None = Field(
        None, description="per-level scale; None = finest level at the training box (1.5 = tcnn sample config)")
    spatial_hidden: int = 16
    query_code_cycles: float = Field(
        2.0, ge=0, description="periods per box of the fixed position code in the point attention's query "
        "(cryoformer.decoder.PositionCode); 0 = none (the paper's query, and checkpoints made before the code)")
    deformation_norm: bool = Field(
        False, description="layer-normalise the deformation tokens F_D before the decoder's cross-attention "
        "(cryoformer.decoder.DeformationBlock); False = F_D as the latent's linear map gives it (checkpoints made "
        "before this field: True)")
    pose_mode: Literal["given", "refine", "predict"] = "given"
    pose_aware_encoder: bool = Field(True, description="deformation encoder sees in-plane-derotated images and the view")
    encoder_box: int | None = Field(
        None, ge=8, description="the deformation encoder sees the image Fourier-cropped to this box (a low-pass); "
        "None = the training box (the paper)")
    render: Literal["canonical", "rotated"] = Field(
        "canonical", description="canonical: the field is evaluated once per step at the voxel grid and each "
        "image's voxel map is projected (trilinear); rotated: the field at each image's rotated grid (the paper)")
    jitter: float = Field(
        1.0, ge=0, le=1, description="canonical renderer: span of the per-step sub-voxel offset of the voxel grid, in "
        "voxels (0 = the field is trained at the voxel centres only)")
    occupancy_cells: int = Field(0, ge=0, description="occupancy grid cells per axis (0 = off: the whole sphere)")
    chunk_points: int | None = Field(None, ge=1, description="points per chunk; None = from the free memory")
    data_scale: float = 1.0

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "ModelConfig":
        """The architecture a checkpoint was made with: a field added since takes the value that rebuilds
        the older model, not today's default."""
        return cls(**{"query_code_cycles": 0.0, "deformation_norm": True, **saved})


def resolve_hash_scale(cfg: ModelConfig) -> float:
    """Per-level scale of the hash grid; by default its finest level has the training box's resolution.

    The tcnn sample value 1.5 puts the finest of 16 levels at 7007 vertices per axis. On a 24-pixel box
    that let the field fit each image's noise (training loss 0.23 against a noise floor of 0.5, maps at
    0.62 correlation with the truth), because rays of different images almost never share a vertex.
    Capping the finest level at the box (Nyquist of the data) gave loss 0.56 and 0.92 correlation.
    """
    if cfg.hash_scale is not None:
        return float(cfg.hash_scale)
    if cfg.box <= cfg.hash_base or cfg.hash_levels < 2:
        return 1.0
    return float((cfg.box / cfg.hash_base) ** (1.0 / (cfg.hash_levels - 1)))


# R3 sequence (Roberts 2018): fractional parts of n * (1/g, 1/g^2, 1/g^3), g the plastic number, are
# evenly spread in the unit cube for every n
_PLASTIC = 1.324717957244746
_R3 = (1 / _PLASTIC, 1 / _PLASTIC ** 2, 1 / _PLASTIC ** 3)


_R3_ON_DEVICE: dict = {}


def jitter_offset(step: int, device=None) -> torch.Tensor:
    """Sub-voxel offset (3,) in [-1/2, 1/2) of training step ``step``: ``(0.5 + step * a) % 1 - 0.5``.

    Computed on the device from a constant copied there once, with the step number as a kernel scalar:
    ``torch.tensor(list, device=cuda)`` every step would be a pageable copy that waits for the GPU. In
    fp64, so that it is the same number as the host formula's (rounded once to fp32) for any step count."""
    dev = torch.device(device if device is not None else "cpu")
    r3 = _R3_ON_DEVICE.get(dev)
    if r3 is None:
        r3 = _R3_ON_DEVICE[dev] = torch.tensor(_R3, dtype=torch.float64, device=dev)
    return (r3 * step + 0.5).remainder_(1.0).sub_(0.5).float()


# the hash-grid corners of the canonical lattice are kept between steps up to this size (about 1 KB a
# point: a box-128 sphere of 1.1 M points would not be kept, its occupied 15 % would)
PLAN_BYTES = 512 << 20


def compacts_columns(device: torch.device) -> bool:
    """Whether the canonical renderer projects only the lattice points that reach occupied voxels.

    The compaction's width is data-dependent, so it costs one host synchronisation per step: free on the
    CPU, where skipping the empty columns saves a third or more of the projection, but on a GPU it would
    stall the launch-bound step every time, while sampling every lattice point there is cheap."""
    return device.type != "cuda"


class CryoFormer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.box
        self.grid = HashGrid(cfg.hash_levels, cfg.hash_features, cfg.hash_log2_size, cfg.hash_base,
                             resolve_hash_scale(cfg))
        self.head = SpatialDensityHead(self.grid.n_output_dims, cfg.tokens, cfg.channels, cfg.attention,
                                       cfg.spatial_hidden, cfg.query_code_cycles)
        self.decoder = StructureDecoder(cfg.tokens, cfg.channels, cfg.blocks, cfg.heads, cfg.cross_values,
                                        norm_fd=cfg.deformation_norm)
        if cfg.zdim > 0:
            self.def_encoder = DeformationEncoder(self.encoder_box, cfg.zdim, cfg.enc_dim, cfg.enc_layers,
                                                  cfg.pose_aware_encoder)
            self.token_head = nn.Linear(cfg.zdim, cfg.tokens * cfg.channels)
        if cfg.pose_mode != "given":
            self.orient_encoder = OrientationEncoder(d, cfg.enc_dim, cfg.enc_layers)
        if cfg.occupancy_cells:
            self.occupancy = OccupancyGrid(cfg.occupancy_cells)
        pts, pix = image_plane_points(d)
        self.register_buffer("points", pts, persistent=False)
        self.register_buffer("pixels", pix, persistent=False)
        self._lattices: dict = {}   # per (box, occupancy state): lattices the renderer reuses every step

    # ---------------------------------------------------------------- conformation
    def encode(self, images: torch.Tensor, shift_px: torch.Tensor | None = None, rot: torch.Tensor | None = None):
        """Normalised recorded images -> (mu, logvar) of the latent; images are centred first.

        In 'refine'/'predict' pose modes the pose is the orientation encoder's (detached: the latent
        must not pull the poses)."""
        if self.cfg.zdim == 0:
            return None, None
        x = translate_images(images, shift_px) if shift_px is not None else images
        if self.encoder_box < self.cfg.box:
            # low-pass: the x (D/d) keeps a smooth image's pixel values while the white noise per pixel
            # falls by D/d, so the encoder's first layer sees the conformation above the noise
            x = fourier_crop(x, self.encoder_box) * (self.cfg.box / self.encoder_box)
        return self.def_encoder(x, None if rot is None else rot.detach())

    @property
    def encoder_box(self) -> int:
        return min(self.cfg.encoder_box or self.cfg.box, self.cfg.box)

    def latent_means(self, images: torch.Tensor, rot: torch.Tensor | None, shift_px: torch.Tensor | None):
        """Posterior-mean latents (B, zdim) of recorded images with their consensus poses, or the
        orientation encoder's poses in 'refine'/'predict' modes (as the encoder saw them in training)."""
        x = images / self.cfg.data_scale
        if self.cfg.pose_mode != "given" or rot is None:
            rot, shift_px = self.orient_encoder(x)
        return self.encode(x, shift_px, rot)[0]

    def tokens_from_latent(self, z: torch.Tensor | None, batch: int) -> torch.Tensor:
        f_d = None
        if z is not None and self.cfg.zdim > 0:
            f_d = self.token_head(z).view(z.shape[0], self.cfg.tokens, self.cfg.channels)
        return self.decoder(f_d, batch if z is None else z.shape[0])

    # ---------------------------------------------------------------- field
    def field_query(self, pts: torch.Tensor, plan: HashGridPlan | None = None) -> tuple[torch.Tensor, ...]:
        """Position-only part of the field at points (..., P, 3) in training-box pixels (``plan``: the
        hash grid's corners of these points, when they were computed before)."""
        if plan is not None:
            feats = planned_forward(self.grid, plan)
        else:
            feats = self.grid(pts.float() / self.cfg.box + 0.5)
        return self.head.spatial_query(feats, pts.float() / self.cfg.box)

    def density(self, pts: torch.Tensor, kv, return_attention: bool = False, plan: HashGridPlan | None = None):
        """Density (B, P) at volume-frame points in training-box pixels: (P, 3) shared by the B
        conformations of ``kv``, or (B, P, 3) one set per conformation."""
        return self.head.attend(self.field_query(pts, plan), kv, return_attention)

    def _chunk(self, batch: int) -> int:
        """Points per image in one piece of :meth:`evaluate`: ``chunk_points`` when set, else as many as
        fit in the activation budget (the literal form keeps N x N per point, so it gets fewer)."""
        cfg = self.cfg
        if cfg.chunk_points is not None:
            return max(1, cfg.chunk_points // max(batch, 1))
        return points_per_chunk(cfg.attention, tokens=cfg.tokens, channels=cfg.channels, batch=batch,
                                budget_bytes=activation_budget(self.points.device),
                                feat_dim=self.grid.n_output_dims, hidden=cfg.spatial_hidden)

    def evaluate(self, pts: torch.Tensor, kv, plan: HashGridPlan | None = None) -> torch.Tensor:
        """:meth:`density` in one piece when its activations fit in memory, else in chunks whose
        activations are recomputed in the backward (training) or not kept at all (inference)."""
        b, n = kv[0].shape[0], pts.shape[-2]
        step = self._chunk(b)
        if n <= step:
            return self.density(pts, kv, plan=plan)
        grad = self.training and torch.is_grad_enabled()
        shared = pts.dim() == 2 and self.cfg.attention == "point"
        query = self.field_query(pts, plan) if shared else None   # position-only work once, not per chunk
        parts = []
        for s in range(0, n, step):
            if shared:
                fn, args = self.head.attend, (tuple(t[s:s + step] for t in query), kv)
            else:
                fn, args = self.density, (pts[..., s:s + step, :], kv)
            parts.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
        return torch.cat(parts, dim=1)

    # ---------------------------------------------------------------- lattices
    def _lattice(self, box: int) -> dict[str, torch.Tensor]:
        """Points of a ``box`` lattice the renderer uses, cached until the occupancy grid changes.

        ``voxels``: flat ``V[z, y, x]`` indices of the voxels inside the sphere and in occupied cells, and
        ``voxel_pts`` their positions in training-box pixels, ``slots`` each voxel's column among them (-1:
        not rendered); ``image_pts``/``image_pix``: the image-plane sphere lattice in ``box`` pixels and its
        pixel index."""
        occ = getattr(self, "occupancy", None)
        key = (box, self.points.device)
        hit = self._lattices.get(key)
        if hit is not None and hit["version"] == (None if occ is None else occ.version):
            return hit
        dev, scale = self.points.device, self.cfg.box / box
        pts = volume_points(box, device=dev) * scale
        keep = (pts * pts).sum(-1) <= (self.cfg.box / 2.0) ** 2
        if occ is not None:
            keep &= occ.lookup(pts, self.cfg.box)
        vox = torch.nonzero(keep).squeeze(1)
        if self.cfg.render == "canonical":  # every lattice point whose trilinear support reaches a voxel
            radius = box / 2.0 + 2.0 if occ is None else self._reach_radius(pts[vox] / scale, box)
            img_pts, img_pix = image_plane_points(box, radius=radius, device=dev)
        else:
            img_pts, img_pix = (self.points, self.pixels) if box == self.cfg.box else image_plane_points(box, device=dev)
        hit = {"voxels": vox, "voxel_pts": pts[vox], "image_pts": img_pts, "image_pix": img_pix,
               "version": None if occ is None else occ.version, "plan": None,
               "full": occ is None or occ.is_full, "reach": sample_reach(keep.view(box, box, box)),
               "slots": voxel_slots(vox, box)}
        self._lattices[key] = hit
        return hit

    def _reach_radius(self, voxel_pts: torch.Tensor, box: int) -> float:
        """Radius (``box`` pixels) of the image-plane lattice of the canonical renderer: beyond it no
        trilinear sample can reach a rendered voxel in any pose, so those points are never rotated.

        A rotation keeps the distance from the centre; a sample reaches voxels less than sqrt(3) away, and
        the sub-voxel jitter moves the map by at most sqrt(3)/2 * jitter. With an occupancy grid this
        drops the lattice points outside the molecule's ball before any per-image work (on the simulated
        molecule at box 64, most of the sphere's 162,000 points per image)."""
        full = box / 2.0 + 2.0
        if len(voxel_pts) == 0:
            return full
        far = float(voxel_pts.norm(dim=-1).max())
        return min(full, far + math.sqrt(3.0) * (1.0 + 0.5 * self.cfg.jitter) + 0.5)

    def _plan(self, lat: dict) -> HashGridPlan | None:
        """The hash grid's corners of a lattice's voxels, made on first use and kept with the lattice.

        Made lazily: training with the sub-voxel jitter never uses it (its points move every step), only
        unjittered evaluation and map export do, and it can take up to ``PLAN_BYTES``."""
        if lat["plan"] is None and not self.grid.uses_tcnn(lat["voxel_pts"]) \
                and plan_bytes(len(lat["voxels"]), self.grid.n_levels) <= PLAN_BYTES:
            lat["plan"] = make_plan(self.grid, lat["voxel_pts"] / self.cfg.box + 0.5)
        return lat["plan"]

    # ---------------------------------------------------------------- rendering
    def render(self, tokens: torch.Tensor, rot: torch.Tensor, box: int | None = None,
               step: int | None = None) -> torch.Tensor:
        """Centred projections (B, box, box) of the conformations ``tokens`` in poses ``rot``; ``step``:
        the training step number (the canonical renderer's sub-voxel offset)."""
        box = box or self.cfg.box
        kv = self.head.keys_values(tokens)
        lat = self._lattice(box)
        if self.cfg.render == "canonical":
            return self._render_canonical(kv, rot, box, lat, step)
        return self._render_rotated(kv, rot, box, lat)

    def _render_canonical(self, kv, rot: torch.Tensor, box: int, lat: dict, step: int | None) -> torch.Tensor:
        """Each conformation's voxel map from one evaluation of the position-only network, then projected.

        In training the voxel grid is moved by a sub-voxel offset that changes every step (the same for
        all images of the step). Sampled at the voxel centres only, the field would be trained only there:
        it could do anything in between, and a map at another box would show it. The offsets follow the
        R3 low-discrepancy sequence of the step number, so they cover the voxel evenly, use no random
        state, and a resumed or data-parallel run uses the same ones."""
        pts, plan, offset = lat["voxel_pts"], None, None
        if step is not None and self.cfg.jitter > 0 and self.training and torch.is_grad_enabled():
            offset = jitter_offset(step, pts.device) * self.cfg.jitter          # voxels of ``box``
            pts = pts + offset * (self.cfg.box / box)
        else:
            plan = self._plan(lat)
        dens = self.evaluate(pts, kv, plan).float()                             # (B, P)
        reach = None if lat["full"] or not compacts_columns(dens.device) else lat["reach"]
        return project_sparse(dens, lat["voxels"], None if reach is None else lat["slots"], box, rot,
                              lat["image_pts"], lat["image_pix"], offset, reach=reach)

    def _render_rotated(self, kv, rot: torch.Tensor, box: int, lat: dict) -> torch.Tensor:
        """The paper's form: the field at each image's rotated lattice, summed along z.

        With an occupancy grid only the points in occupied cells are evaluated: one gather of each
        image's occupied points (padded to the largest count of the batch, the padding weighted 0), one
        evaluation over the batch, one ``index_add`` back. One host synchronisation per step (the
        largest count), not one per image, and a single call keeps the GPU's kernels full."""
        b = kv[0].shape[0]
        world = rotated_points(lat["image_pts"], rot) * (self.cfg.box / box)   # training-box pixels
        out = torch.zeros(b, box * box, device=world.device, dtype=torch.float32)
        if lat["full"]:
            return out.index_add_(1, lat["image_pix"], self.evaluate(world, kv).float()).view(b, box, box)
        order, valid = pack_rows(self.occupancy.lookup(world, self.cfg.box))   # skip empty cells
        pts = torch.gather(world, 1, order.unsqueeze(-1).expand(-1, -1, 3))
        dens = self.evaluate(pts, kv).float() * valid
        flat = lat["image_pix"][order] + (torch.arange(b, device=world.device) * box * box).unsqueeze(1)
        return out.view(-1).index_add_(0, flat.reshape(-1), dens.reshape(-1)).view(b, box, box)

    # ---------------------------------------------------------------- training step
    def forward(self, images: torch.Tensor, ctf_params: torch.Tensor | None, rot: torch.Tensor | None,
                shift_px: torch.Tensor | None, *, sample: bool = True, eps: torch.Tensor | None = None,
                box: int | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of a minibatch. ``eps`` (B, zdim): the reparameterisation noise, drawn by the caller
        (the trainer draws it for the whole global batch of a data-parallel step); None = drawn here.
        ``box`` < the training box renders and compares at that box (the coarse stage of a coarse-to-fine
        schedule); the encoders always see the training box. ``step``: the global training step (see
        :meth:`_render_canonical`)."""
        cfg = self.cfg
        x = images / cfg.data_scale
        out: dict[str, torch.Tensor] = {}
        if cfg.pose_mode != "given":
            rot_pred, shift_pred = self.orient_encoder(x)
            if cfg.pose_mode == "refine" and rot is not None:
                out["pose_loss"] = ((rot_pred - rot) ** 2).sum((-1, -2)).mean()
                if shift_px is not None:
                    out["pose_loss"] = out["pose_loss"] + ((shift_pred - shift_px) ** 2).sum(-1).mean() / cfg.box
            rot, shift_px = rot_pred, shift_pred
        if rot is None:
            raise ValueError("poses are required when pose_mode is 'given'")
        mu, logvar = self.encode(x, shift_px, rot)
        z = None
        if mu is not None:
            if sample:
                z = mu + (torch.randn_like(mu) if eps is None else eps.to(mu)) * torch.exp(0.5 * logvar)
            else:
                z = mu
            out["kl"] = (-0.5 * (1 + logvar - mu * mu - logvar.exp()).sum(-1)).mean()
            out["mu"] = mu
        box = box or cfg.box
        target, pixel_size, shift = x, cfg.pixel_size_A, shift_px
        if box != cfg.box:
            target = fourier_crop(x, box)
            pixel_size = cfg.pixel_size_A * cfg.box / box
            shift = None if shift_px is None else shift_px * (box / cfg.box)
        tokens = self.tokens_from_latent(z, x.shape[0])
        proj = self.render(tokens, rot, box, step)
        pred = corrupt(proj, pixel_size, shift, ctf_params)
        out["mse"] = ((pred - target.float()) ** 2).mean()
        out["pred"] = pred
        return out

    # ---------------------------------------------------------------- volumes
    @torch.no_grad()
    def volume(self, z: torch.Tensor | None, box: int | None = None, *, attention: bool = False):
        """Density on a ``box``^3 grid (default: training box) at latent ``z`` (zdim,) or None.

        The field is continuous, so any box samples the same particle extent; voxels outside the
        training sphere, and in cells of the occupancy grid, are 0: the field was never trained there.
        """
        box = box or self.cfg.box
        lat = self._lattice(box)
        tokens = self.tokens_from_latent(None if z is None else z.view(1, -1), 1)
        kv = self.head.keys_values(tokens)
        vol = torch.zeros(box ** 3, device=self.points.device)
        if not attention:
            vol[lat["voxels"]] = self.evaluate(lat["voxel_pts"], kv, self._plan(lat))[0].float()
            return vol.view(box, box, box) * self.cfg.data_scale
        att = torch.zeros(box ** 3, self.cfg.tokens, device=vol.device)
        step = self._chunk(1)
        for s in range(0, len(lat["voxels"]), step):
            sel = lat["voxels"][s:s + step]
            dens, a = self.density(lat["voxel_pts"][s:s + step], kv, return_attention=True)
            vol[sel], att[sel] = dens[0].float(), a[0].float()
        return vol.view(box, box, box) * self.cfg.data_scale, att.T.reshape(self.cfg.tokens, box, box, box)

    # ---------------------------------------------------------------- occupancy
    @torch.no_grad()
    def estimate_occupancy(self, z: torch.Tensor | None, threshold: float, margin: int, stride: int = 2) -> float:
        """Re-estimate the occupancy grid from the field: the union over the latents ``z`` (K, zdim) of the
        cells whose mean density exceeds ``threshold`` x the largest (:func:`union_over_latents`), grown by
        ``margin`` cells.

        Only the currently occupied voxels are looked at (on a lattice of every ``stride``-th voxel, with at
        least two samples along each axis of a cell, so that a cell's mean is not one voxel's value), so a
        cell that was empty can only come back through the margin of a neighbour with density. The
        position-only part of the field is evaluated once and attended by each latent's tokens. Returns the
        occupied fraction of the training sphere."""
        occ = self.occupancy
        was_training = self.training
        self.eval()
        box = self.cfg.box
        lat = self._lattice(box)
        pts = lat["voxel_pts"]
        vox = lat["voxels"]
        stride = max(1, min(stride, box // (2 * occ.cells)))
        if stride > 1:
            sub = ((pts + box // 2).long() % stride == 0).all(-1)
            pts, vox = pts[sub], vox[sub]
        zs = [None] if z is None or self.cfg.zdim == 0 else list(z)
        shared = self.cfg.attention == "point"
        query = self.field_query(pts) if shared else None
        cells = []
        for zi in zs:
            kv = self.head.keys_values(self.tokens_from_latent(None if zi is None else zi.view(1, -1), 1))
            dens = (self._attend_chunked(query, kv) if shared else self.evaluate(pts, kv)).float()
            cells.append(cell_means(dens, box, occ, vox)[0])
        occ.update(union_over_latents(torch.stack(cells)).view((occ.cells,) * 3), threshold, margin)
        self.train(was_training)
        return occ.sphere_fraction(box)

    def _attend_chunked(self, query: tuple[torch.Tensor, ...], kv) -> torch.Tensor:
        """Density (B, P) of position-only features ``query`` (P, ...) shared by the images of ``kv``, in
        memory-sized pieces (inference: nothing is kept for a backward)."""
        step = self._chunk(kv[0].shape[0])
        n = query[0].shape[0]
        return torch.cat([self.head.attend(tuple(t[s:s + step] for t in query), kv) for s in range(0, n, step)], 1)
