"""cryoFormer: encoders + structure decoder + hash-grid spatial field + real-space renderer.

One forward pass takes a minibatch of recorded images with their CTFs (and poses when given),
encodes each image's conformation, renders the predicted images and returns the loss terms.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from .decoder import SpatialDensityHead, StructureDecoder, activation_bytes_per_point, points_per_chunk
from .encoders import DeformationEncoder, OrientationEncoder
from .hashgrid import HashGrid
from .lattice import image_plane_points, translate_images, volume_points
from .render import corrupt, rotated_points


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
    cross_values: Literal["queries", "deformation"] = "queries"
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
    pose_mode: Literal["given", "refine", "predict"] = "given"
    pose_aware_encoder: bool = Field(True, description="deformation encoder sees in-plane-derotated images and the view")
    chunk_points: int = 1 << 18
    data_scale: float = 1.0


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


class CryoFormer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.box
        self.grid = HashGrid(cfg.hash_levels, cfg.hash_features, cfg.hash_log2_size, cfg.hash_base,
                             resolve_hash_scale(cfg))
        self.head = SpatialDensityHead(self.grid.n_output_dims, cfg.tokens, cfg.channels, cfg.attention,
                                       cfg.spatial_hidden)
        self.decoder = StructureDecoder(cfg.tokens, cfg.channels, cfg.blocks, cfg.heads, cfg.cross_values)
        if cfg.zdim > 0:
            self.def_encoder = DeformationEncoder(d, cfg.zdim, cfg.enc_dim, cfg.enc_layers, cfg.pose_aware_encoder)
            self.token_head = nn.Linear(cfg.zdim, cfg.tokens * cfg.channels)
        if cfg.pose_mode != "given":
            self.orient_encoder = OrientationEncoder(d, cfg.enc_dim, cfg.enc_layers)
        pts, pix = image_plane_points(d)
        self.register_buffer("points", pts, persistent=False)
        self.register_buffer("pixels", pix, persistent=False)

    # ---------------------------------------------------------------- conformation
    def encode(self, images: torch.Tensor, shift_px: torch.Tensor | None = None, rot: torch.Tensor | None = None):
        """Normalised recorded images -> (mu, logvar) of the latent; images are centred first.

        In 'refine'/'predict' pose modes the pose is the orientation encoder's (detached: the latent
        must not pull the poses)."""
        if self.cfg.zdim == 0:
            return None, None
        x = translate_images(images, shift_px) if shift_px is not None else images
        return self.def_encoder(x, None if rot is None else rot.detach())

    def tokens_from_latent(self, z: torch.Tensor | None, batch: int) -> torch.Tensor:
        f_d = None
        if z is not None and self.cfg.zdim > 0:
            f_d = self.token_head(z).view(z.shape[0], self.cfg.tokens, self.cfg.channels)
        return self.decoder(f_d, batch if z is None else z.shape[0])

    # ---------------------------------------------------------------- field
    def points_per_chunk(self, batch: int) -> int:
        """Points per image in one rendering chunk of ``batch`` images.

        The budget is ``chunk_points`` points' worth of the point-query head's activations; the
        literal head keeps N x N attention per point (2^30 elements at N = 64 if it got as many points),
        so it gets proportionally fewer points."""
        cfg = self.cfg
        dims = dict(tokens=cfg.tokens, channels=cfg.channels, feat_dim=self.grid.n_output_dims,
                    hidden=cfg.spatial_hidden)
        budget = cfg.chunk_points * activation_bytes_per_point("point", **dims)
        return points_per_chunk(cfg.attention, batch=batch, budget_bytes=budget, **dims)

    def density(self, world_pts: torch.Tensor, kv, return_attention: bool = False):
        """Density (B, P) at volume-frame points (B, P, 3) in training-box pixels."""
        b, p, _ = world_pts.shape
        x01 = world_pts.reshape(-1, 3).float() / self.cfg.box + 0.5
        feats = self.grid(x01).view(b, p, -1)
        return self.head(feats, kv, return_attention)

    def render(self, tokens: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """Centred projections (B, D, D) of the conformations ``tokens`` in poses ``rot``."""
        b, d = tokens.shape[0], self.cfg.box
        kv = self.head.keys_values(tokens)
        out = torch.zeros(b, d * d, device=tokens.device, dtype=torch.float32)
        n = self.points.shape[0]
        step = self.points_per_chunk(b)
        for s in range(0, n, step):
            pts = self.points[s:s + step]
            pix = self.pixels[s:s + step]
            world = rotated_points(pts, rot.float())
            # every chunk but the last is recomputed in the backward instead of kept: activations of a
            # D=128 batch would not fit otherwise; the last one is needed right away anyway
            if self.training and torch.is_grad_enabled() and s + step < n:
                dens = checkpoint(self.density, world, kv, use_reentrant=False)
            else:
                dens = self.density(world, kv)
            out.index_add_(1, pix, dens.float())
        return out.view(b, d, d)

    # ---------------------------------------------------------------- training step
    def forward(self, images: torch.Tensor, ctf_params: torch.Tensor | None, rot: torch.Tensor | None,
                shift_px: torch.Tensor | None, *, sample: bool = True,
                eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of a minibatch. ``eps`` (B, zdim): the reparameterisation noise, drawn by the caller
        (the trainer draws it for the whole global batch of a data-parallel step); None = drawn here."""
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
            z = mu + (torch.randn_like(mu) if eps is None else eps) * torch.exp(0.5 * logvar) if sample else mu
            out["kl"] = (-0.5 * (1 + logvar - mu * mu - logvar.exp()).sum(-1)).mean()
            out["mu"] = mu
        tokens = self.tokens_from_latent(z, x.shape[0])
        proj = self.render(tokens, rot)
        pred = corrupt(proj, cfg.pixel_size_A, shift_px, ctf_params)
        out["mse"] = ((pred - x.float()) ** 2).mean()
        out["pred"] = pred
        return out

    # ---------------------------------------------------------------- volumes
    @torch.no_grad()
    def volume(self, z: torch.Tensor | None, box: int | None = None, *, attention: bool = False):
        """Density on a ``box``^3 grid (default: training box) at latent ``z`` (zdim,) or None.

        The field is continuous, so any box samples the same particle extent; voxels outside the
        training sphere are set to zero because the field was never constrained there.
        """
        box = box or self.cfg.box
        scale = self.cfg.box / box
        pts = volume_points(box, device=self.points.device) * scale
        inside = (pts * pts).sum(-1) <= (self.cfg.box / 2.0) ** 2
        tokens = self.tokens_from_latent(None if z is None else z.view(1, -1), 1)
        kv = self.head.keys_values(tokens)
        vol = torch.zeros(box ** 3, device=pts.device)
        att = torch.zeros(box ** 3, self.cfg.tokens, device=pts.device) if attention else None
        idx = torch.nonzero(inside).squeeze(1)
        step = self.points_per_chunk(4)
        for s in range(0, len(idx), step):
            sel = idx[s:s + step]
            res = self.density(pts[sel].unsqueeze(0), kv, return_attention=attention)
            if attention:
                vol[sel] = res[0][0].float()
                att[sel] = res[1][0].float()
            else:
                vol[sel] = res[0].float()
        vol = vol.view(box, box, box) * self.cfg.data_scale
        if attention:
            return vol, att.T.reshape(self.cfg.tokens, box, box, box)
        return vol
