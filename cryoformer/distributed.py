"""Data-parallel helpers on ``torch.distributed`` (DDP): sharding, global-batch noise, gathering.

The engine never starts processes or a process group; whoever does (``torchrun``, or the job layer's
launcher in ``cryoformer_ext.launch``) initialises the default group, and :func:`current` then returns a
:class:`DistContext` that the trainer and :class:`cryoformer.infer.Reconstruction` use. With no group,
or a group of one, everything runs exactly as a single process.

Contract that makes ``W`` ranks equal one process with the same global batch and seed:

* every rank builds the same global permutation of each epoch and the same global batches;
  rank ``r`` takes rows ``r, r + W, r + 2W, ...`` (strided) of each global batch;
* the loss of a rank is a mean over its rows; it is multiplied by ``W * b_r / B`` (``b_r`` rows of a
  global batch of ``B``) before the backward, so DDP's gradient *average* is the gradient of the
  global-batch mean even when ``B`` is not a multiple of ``W``; a rank with no row in the (last) batch
  runs one dummy row with weight 0 so that every rank takes part in every all-reduce;
* the reparameterisation noise is drawn by the trainer for the whole global batch on every rank (same
  RNG state everywhere), each rank keeps its rows (:meth:`DistContext.own_rows`, a strided view: no
  index tensor to copy to the GPU) and passes them to the model's forward explicitly, so each particle
  gets the noise it gets in one process and the RNG state saved in the checkpoint does not depend on
  the world size.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ sharding
    def batch_rows(self, batch_len: int) -> tuple[np.ndarray, float]:
        """This rank's rows of a global batch and the loss weight ``W * b_r / B`` (0 for a dummy row)."""
        rows = np.arange(self.rank, batch_len, self.world)
        if len(rows) == 0:  # fewer rows than ranks in the last batch: one dummy row that adds nothing
            return np.zeros(1, np.int64), 0.0
        return rows, self.world * len(rows) / batch_len

    def own_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows (:meth:`batch_rows`) of a tensor over the whole global batch."""
        if full.shape[0] <= self.rank:  # the dummy row
            return full[:1]
        return full[self.rank::self.world]

    def shard(self, n: int) -> slice:
        """Contiguous share of ``n`` items (inference): concatenating the ranks' shares gives 0..n-1."""
        bounds = np.linspace(0, n, self.world + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    # ------------------------------------------------------------------ collectives
    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (abort requests)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, *values: float) -> tuple[float, ...]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return tuple(float(v) for v in t.cpu())

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Rank 0's values of ``tensor`` on every rank (in place)."""
        buf = tensor.to(self.device, dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
        tdist.broadcast(buf, 0)
        tensor.copy_(buf.to(tensor.dtype))

    def barrier(self) -> None:
        if self.device.type == "cuda":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def gather_rows(self, local: np.ndarray, n: int) -> np.ndarray:
        """All-gather the contiguous shards (:meth:`shard`) of an (n, ...) float array; input order."""
        sizes = [self._shard_len(n, r) for r in range(self.world)]
        width = max(sizes)
        buf = torch.zeros((width,) + local.shape[1:], dtype=torch.float32, device=self.device)
        buf[:len(local)] = torch.as_tensor(local, dtype=torch.float32, device=self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        tdist.all_gather(parts, buf)
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu().numpy()
        if len(out) != n:  # pragma: no cover - guards the shard arithmetic
            raise RuntimeError(f"gathered {len(out)} rows for {n} particles")
        return out

    def _shard_len(self, n: int, rank: int) -> int:
        bounds = np.linspace(0, n, self.world + 1).round().astype(int)
        return int(bounds[rank + 1] - bounds[rank])

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel
        # the buffers (pixel coordinates) are constants: no per-step buffer broadcast
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else {"broadcast_buffers": False}
        return ddp(model, device_ids=ids, output_device=ids[0] if ids else None,
                   find_unused_parameters=find_unused_parameters, **sync)


def current(device: torch.device | str | None = None) -> DistContext | None:
    """The context of the initialised default group with more than one rank, else None."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    world = tdist.get_world_size()
    if world <= 1:
        return None
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" \
            else torch.device("cpu")
    return DistContext(tdist.get_rank(), world, torch.device(device))
