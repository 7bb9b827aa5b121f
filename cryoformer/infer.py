"""A trained model loaded for inference: latents of particles and volumes at latents.

This is the only object the job layer and the analysis need after training; it hides the
model, the training box and the data normalisation behind array-in, array-out methods.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import ParticleData
from .distributed import current as _dist_current
from .lattice import fourier_resample_volume
from .model import CryoFormer, ModelConfig
from .train import CHECKPOINT_NAME, BatchReader, load_checkpoint


def latest_checkpoint(directory: str | Path) -> Path:
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no checkpoint ({CHECKPOINT_NAME}) found")
    return path


class Reconstruction:
    def __init__(self, model: CryoFormer, loss_history: list[float] | None = None, epoch: int = 0):
        self.model = model.eval()
        self.loss_history = list(loss_history or [])
        self.epoch = epoch

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "Reconstruction":
        path = Path(path)
        if path.is_dir():
            path = latest_checkpoint(path)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        state = load_checkpoint(path, dev)
        model = CryoFormer(ModelConfig.from_checkpoint(state["model_config"])).to(dev)
        model.load_state_dict(state["model"])
        return cls(model, state.get("loss_history"), int(state.get("epoch", 0)))

    @property
    def device(self) -> torch.device:
        return self.model.points.device

    @property
    def zdim(self) -> int:
        return self.model.cfg.zdim

    @property
    def train_box(self) -> int:
        return self.model.cfg.box

    @property
    def train_pixel_size_A(self) -> float:
        return self.model.cfg.pixel_size_A

    def voxel_size_A(self, box: int | None = None) -> float:
        return self.train_pixel_size_A * self.train_box / (box or self.train_box)

    @torch.no_grad()
    def encode(self, data: ParticleData, batch_size: int = 64, indices: np.ndarray | None = None,
               distributed: bool | None = None) -> np.ndarray:
        """Posterior-mean latents (N, zdim) for the particles, in input order.

        In a ``torch.distributed`` group of several ranks (``distributed`` None = when there is one),
        every rank must call this: each encodes a contiguous shard and all get the gathered result.
        """
        idx_all = np.arange(len(data)) if indices is None else np.asarray(indices)
        if self.zdim == 0:
            return np.zeros((len(idx_all), 0), np.float32)
        ctx = _dist_current(self.device) if distributed is not False else None
        if ctx is not None:
            part = self.encode(data, batch_size, idx_all[ctx.shard(len(idx_all))], distributed=False)
            return ctx.gather_rows(part, len(idx_all))
        reader = BatchReader(data, self.train_box)
        out = np.empty((len(idx_all), self.zdim), np.float32)
        for s in range(0, len(idx_all), batch_size):
            b = {k: v.to(self.device) for k, v in reader(idx_all[s:s + batch_size]).items()}
            mu = self.model.latent_means(b["images"], b.get("rot"), b.get("shift"))
            out[s:s + len(mu)] = mu.float().cpu().numpy()
        return out

    @torch.no_grad()
    def volumes(self, z: np.ndarray | None, box: int | None = None) -> np.ndarray:
        """Maps ``V[z, y, x]`` (K, box, box, box) at each latent row of ``z`` (or one consensus map).

        Evaluated on the training box's grid, where the field was trained, and Fourier-resampled to ``box``
        (:func:`cryoformer.lattice.fourier_resample_volume`): a larger box interpolates, a smaller one
        low-passes, neither invents frequencies the training data never had."""
        box = box or self.train_box
        tb = self.train_box if box % 2 == 0 and self.train_box % 2 == 0 else box
        if z is None or self.zdim == 0:
            n = 1 if z is None else len(z)
            vol = fourier_resample_volume(self.model.volume(None, tb).cpu().numpy(), box)
            return np.repeat(vol[None], n, axis=0)
        zz = torch.as_tensor(np.asarray(z, np.float32).reshape(-1, self.zdim), device=self.device)
        return np.stack([fourier_resample_volume(self.model.volume(zi, tb).cpu().numpy(), box) for zi in zz])

    def occupancy_mask(self, box: int | None = None) -> np.ndarray | None:
        """1 where the model has density at all (occupied cells of its occupancy grid inside the training
        sphere), 0 elsewhere, on a ``box``^3 grid; None when it renders the whole sphere."""
        occ = getattr(self.model, "occupancy", None)
        if occ is None or int(occ.estimates) == 0:
            return None
        box = box or self.train_box
        mask = np.zeros(box ** 3, np.float32)
        mask[self.model._lattice(box)["voxels"].cpu().numpy()] = 1.0
        return mask.reshape(box, box, box)

    @torch.no_grad()
    def attention_maps(self, z: np.ndarray | None, box: int | None = None) -> np.ndarray:
        """Per-voxel attention weights over the structure queries (tokens, box, box, box)."""
        zz = None if z is None or self.zdim == 0 else torch.as_tensor(np.asarray(z, np.float32).reshape(self.zdim), device=self.device)
        _, att = self.model.volume(zz, box or self.train_box, attention=True)
        return att.cpu().numpy()

    @torch.no_grad()
    def predict_poses(self, data: ParticleData, batch_size: int = 64,
                      distributed: bool | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Orientation-encoder poses (rot, shift_px in the input box's pixels), when it was trained.

        Sharded over the ranks of a ``torch.distributed`` group like :meth:`encode`."""
        if self.model.cfg.pose_mode == "given":
            return None
        reader = BatchReader(data, self.train_box)
        ctx = _dist_current(self.device) if distributed is not False else None
        lo, hi = (0, len(data)) if ctx is None else (ctx.shard(len(data)).start, ctx.shard(len(data)).stop)
        rots, shifts = [], []
        if ctx is not None:  # a rank may have an empty shard
            rots, shifts = [np.zeros((0, 3, 3), np.float32)], [np.zeros((0, 2), np.float32)]
        for s in range(lo, hi, batch_size):
            b = reader(np.arange(s, min(s + batch_size, hi)))
            r, t = self.model.orient_encoder(b["images"].to(self.device) / self.model.cfg.data_scale)
            rots.append(r.cpu().numpy())
            shifts.append(t.cpu().numpy() / reader.scale)
        if ctx is not None:
            rot = ctx.gather_rows(np.concatenate(rots).reshape(-1, 9), len(data)).reshape(-1, 3, 3)
            return rot, ctx.gather_rows(np.concatenate(shifts), len(data))
        return np.concatenate(rots), np.concatenate(shifts)
