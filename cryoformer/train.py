"""Minibatch training with atomic per-epoch checkpoints, exact resume and progress lines.

Resuming must give the same model as an uninterrupted run: the shuffling order of epoch ``e`` is a
pure function of (seed, e) and the torch RNG state is saved with each checkpoint, so a job that was
aborted, killed or continued by RELION picks up exactly where the last finished epoch left it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .data import ParticleData
from .device import autocast_dtype, bind, cuda_rng_state, head_product_dtype, precision_note, resolve, restore_cuda_rng
from .distributed import DistContext
from .distributed import current as _dist_current
from .compiled import CompileMode
from .ctf import ctf_values
from .hashgrid import level_corners
from .lattice import fourier_crop
from .memory import invalidate_budget
from .model import CryoFormer, ModelConfig
from .native.build import note as native_note

CHECKPOINT_NAME = "last.pt"


class TrainingAborted(RuntimeError):
    """Raised when the caller's abort check turns true; the last epoch checkpoint is kept."""


class CheckpointWriteError(OSError):
    """The checkpoint could not be written (typically a full disk); the previous one is left intact."""

    def __str__(self) -> str:
        return str(self.strerror)


class CheckpointReadError(RuntimeError):
    """A checkpoint exists but cannot be loaded (damaged, truncated, or not a cryoFormer checkpoint)."""


class TrainConfig(BaseModel):
    """Optimisation and schedule settings; saved in each checkpoint next to the model config."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    hash_lr_factor: float = Field(10.0, gt=0, description="hash tables learn faster, as in Instant-NGP")
    encoder_lr_factor: float = Field(1.0, gt=0, description="the deformation encoder's learning rate, x lr")
    lr_final: float = Field(
        1.0, gt=0, le=1, description="learning rates at the last step, as a fraction of their start (cosine decay "
        "over the epochs; 1 = constant)")
    kl_weight: float | None = Field(
        0.0, ge=0, description="weight of the KL term on z; None = 1 / (zdim * box^2) (cryoDRGN's scaling). "
        "Off by default: with it the latent collapsed on simulated two-state data (loss stuck at 0.58 "
        "against 0.52 without, 2000 particles, box 16, 4 epochs)")
    pose_weight: float = Field(1.0, ge=0, description="initial weight of the pose term in 'refine' mode (halves each epoch)")
    seed: int = 0
    device: str = "cpu"
    amp: bool = Field(True, description="bf16 where the hardware multiplies it natively: autocast on GPUs with bf16 tensor "
                                        "cores, the point head's products on CPUs with AVX512-BF16 or AMX (cryoformer.device)")
    log_interval_s: float = Field(10.0, gt=0)
    prefetch: int = Field(2, ge=0, description="minibatches read ahead in a background thread")
    occupancy_threshold: float = Field(
        0.05, ge=0, lt=1, description="a cell is occupied when its mean |density| exceeds this fraction of the "
        "largest cell's, for any of the latents looked at")
    occupancy_margin: int = Field(1, ge=0, description="occupied cells are grown by this many cells")
    occupancy_warmup: int = Field(1000, ge=0, description="images trained on before the first estimate of the "
                                  "occupancy grid (at the latest: the end of the first epoch); until then the "
                                  "whole sphere is rendered, at half the training box")
    occupancy_refresh: int = Field(10000, ge=1, description="images between estimates of the occupancy grid, once "
                                   "the gaps, doubling from the warm-up, reach it")
    occupancy_latents: int = Field(64, ge=1, description="particles whose latents the occupancy grid covers")
    coarse_epochs: int = Field(0, ge=0, description="first epochs rendered and compared at half the training box")
    compile: bool = Field(
        False, description="CUDA: the torch hash grid's per-level arithmetic and the CTF through torch.compile (fewer "
        "kernel launches; the first steps compile); a failure is logged once and that part runs eagerly")
    compile_mode: CompileMode = Field(
        "default", description="with compile: 'reduce-overhead' also replays the compiled parts as CUDA graphs "
        "(re-recorded when an occupancy refresh changes the number of rendered points)")
    sync_every: int = Field(
        16, ge=1, description="steps between the step loop's host synchronisations: the non-finite loss check and, "
        "with several GPU ranks, the all-reduced abort poll (CPU ranks poll at every step)")


class BatchReader:
    """Reads minibatches (images cropped to the training box + per-particle metadata) lazily.

    With ``pin`` the tensors are page-locked (in the reading thread), so that the trainer's
    ``non_blocking`` copy to the GPU is asynchronous; from pageable memory it would block."""

    def __init__(self, data: ParticleData, box: int, pin: bool = False):
        self.data, self.box, self.pin = data, box, pin
        self.scale = box / data.box

    def __call__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        imgs = self.data.images.read(idx)
        batch = {"images": fourier_crop(imgs, self.box)}
        if self.data.ctf is not None:
            batch["ctf"] = torch.as_tensor(self.data.ctf.take(idx))
        if self.data.rot is not None:
            batch["rot"] = torch.as_tensor(self.data.rot[idx])
            batch["shift"] = torch.as_tensor(self.data.shift_px[idx] * self.scale)
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch


def iterate_batches(reader: BatchReader, order: np.ndarray, batch_size: int, prefetch: int,
                    chunks: list[np.ndarray] | None = None, device: torch.device | None = None) -> Iterator[dict]:
    """Minibatches of ``order`` (or the given index ``chunks``, e.g. one rank's share of each batch).

    ``device``: the GPU the batches go to; the reading thread makes it its current device, so that
    pinned buffers belong to that GPU and not to GPU 0."""
    if chunks is None:
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if prefetch <= 0:
        for c in chunks:
            yield reader(c)
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work() -> None:
        try:
            bind(device)
            for c in chunks:
                if stop.is_set():
                    return
                q.put(reader(c))
            q.put(None)
        except BaseException as err:  # surfaced in the consumer
            q.put(err)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def estimate_data_scale(data: ParticleData, box: int, n: int = 500, seed: int = 0) -> float:
    """Pixel standard deviation of (cropped) images, so inputs and targets are O(1)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data), size=min(n, len(data)), replace=False))
    imgs = fourier_crop(data.images.read(idx), box)
    s = float(imgs.std())
    return s if s > 0 else 1.0


def make_optimizer(model: CryoFormer, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with a parameter group per learning rate: the hash tables (``hash_lr_factor``), the deformation
    encoder (``encoder_lr_factor``) and the rest."""
    grid = list(model.grid.parameters())
    # a group of its own only when it differs, so the optimizer state of older checkpoints still loads
    enc = list(model.def_encoder.parameters()) if hasattr(model, "def_encoder") and cfg.encoder_lr_factor != 1 else []
    special = {id(p) for p in grid + enc}
    rest = [p for p in model.parameters() if id(p) not in special]
    groups = [{"params": rest, "lr": cfg.lr}, {"params": grid, "lr": cfg.lr * cfg.hash_lr_factor}]
    if enc:
        groups.append({"params": enc, "lr": cfg.lr * cfg.encoder_lr_factor})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, **adam_options(next(model.parameters()).device))


def adam_options(device: torch.device) -> dict:
    """Fused Adam: one kernel for all parameters instead of a few per tensor. The step is launch-bound on
    a GPU; on a CPU torch's default loops over the 129 tensors one by one, 9 ms a step against 1 ms
    fused, which is 7 % of a training step at train box 32. The same arithmetic, and its state dict loads
    into the unfused optimiser and back (a checkpoint moves between machines)."""
    if device.type == "cuda" or _cpu_fused_adam():
        return {"fused": True}
    return {"foreach": True}


@functools.cache
def _cpu_fused_adam() -> bool:
    """Whether this torch has the CPU kernel of fused Adam (2.4 and later)."""
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def lr_factor(cfg: TrainConfig, progress: float) -> float:
    """Cosine decay from 1 to ``lr_final`` over the run (``progress`` 0..1).

    At a constant rate the field kept moving with every minibatch's noise: on the SNR-0.1 hinge the maps'
    FSC-AUC went up and down by +-0.01 from epoch to epoch after epoch 5 (0.172, 0.161, 0.174, 0.163).
    The cosine keeps the rate near its start while the motion is being learned (above 0.9 for the
    first fifth of the run) and lets the last epochs average the noise out."""
    return cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def set_learning_rates(opt: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group from its own base rate (kept in the group, so it survives a checkpoint), never
    from the current rate: the schedule is then a pure function of the progress and a resume continues it."""
    for g in opt.param_groups:
        g["lr"] = g.setdefault("base_lr", g["lr"]) * factor


def save_checkpoint(path: Path, model: CryoFormer, opt: torch.optim.Optimizer, epoch: int,
                    history: list[float], train_cfg: TrainConfig) -> None:
    """Write the checkpoint atomically (a temporary file, then a rename): a job killed or out of disk while
    writing keeps the previous epoch's checkpoint, which is what a resume starts from."""
    state = _checkpoint_state(model, opt, epoch, history, train_cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # through a Python file object: a full disk then raises OSError(ENOSPC), where torch.save(path)
        # reports only an internal "unexpected pos" error
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error_in_chain(err)  # torch's zip writer reports a failed write as a RuntimeError
        if cause is None:
            raise
        raise _write_error(cause, path) from None


def _checkpoint_state(model: CryoFormer, opt: torch.optim.Optimizer, epoch: int, history: list[float],
                      train_cfg: TrainConfig) -> dict:
    """Everything an exact resume needs: weights, optimiser moments, the epoch and loss history, and the RNG
    states (the noise of the next epoch continues from them)."""
    device = next(model.parameters()).device
    return {
        "format": "cryoformer-checkpoint-1",
        "model_config": model.cfg.model_dump(),
        "train_config": train_cfg.model_dump(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "loss_history": history,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": cuda_rng_state(device),  # the GPU in use only, a CPU tensor (None on CPU)
    }


def _write_error(cause: OSError, path: Path) -> CheckpointWriteError:
    """A failed write as one line a user can act on: a full disk named as such, and whether an earlier
    checkpoint survives (the job can be continued from it) or none was ever saved."""
    full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on device" if full else (cause.strerror or str(cause))
    kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was saved"
    return CheckpointWriteError(cause.errno, f"cannot write the checkpoint {path}: {reason} ({kept})", str(path))


def _os_error_in_chain(err: BaseException | None) -> OSError | None:
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise CheckpointReadError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err}); it is damaged "
                                  "or not a cryoFormer checkpoint: delete it to train from the start") from None


def coarse_box(box: int) -> int:
    """The box of the coarse stage of a coarse-to-fine schedule: half the training box, even, >= 8."""
    return max(8, box // 4 * 2)


def stage_box(box: int, coarse: bool, estimates: int | None) -> int:
    """The box a step renders at: half the training box in the coarse epochs, and while the occupancy grid
    has not been estimated yet (the whole sphere is rendered then, which at the full box would cost as
    much as several epochs of the occupied cells).

    ``estimates``: how often the occupancy grid was estimated (None = no grid), a Python int the trainer
    keeps: reading the grid's device counter every step would wait for the GPU."""
    warming_up = estimates is not None and estimates == 0
    return coarse_box(box) if coarse or warming_up else box


def occupancy_due(cfg: TrainConfig, n: int, before: int, after: int) -> bool:
    """Whether an occupancy estimate falls between ``before`` and ``after`` images trained (a pure
    function of the image count, so a resumed run estimates exactly where the uninterrupted one did)."""
    return estimates_by(cfg, n, after) > estimates_by(cfg, n, before)


def estimates_by(cfg: TrainConfig, n: int, images: int) -> int:
    """How many occupancy estimates fall at or before ``images`` images trained.

    The first falls after ``occupancy_warmup`` images (at the latest, the end of the first epoch); the gaps
    then double until they reach ``occupancy_refresh``. The early field carries a haze that the first
    estimate keeps (up to three quarters of the sphere on a small protein), and every step renders what
    the grid keeps, so the grid is re-made soon while the field sharpens, and rarely once it is settled."""
    first = min(cfg.occupancy_warmup, n)
    if images < first:
        return 0
    if first == 0:
        return 1 + images // cfg.occupancy_refresh
    count, point, gap = 1, first, first
    while gap < cfg.occupancy_refresh:
        if point + gap > images:
            return count
        point, count, gap = point + gap, count + 1, 2 * gap
    return count + (images - point) // cfg.occupancy_refresh


def refresh_occupancy(model: CryoFormer, reader: "BatchReader", n: int, cfg: TrainConfig, device: torch.device) -> float:
    """Estimate the occupancy grid over the latents of a seeded sample of particles; returns the occupied
    fraction of the training sphere. Uses no global RNG state, so it does not change the training noise."""
    rng = np.random.default_rng([cfg.seed, 0x0CC, int(model.occupancy.estimates)])
    idx = np.sort(rng.choice(n, size=min(cfg.occupancy_latents, n), replace=False))
    z = None
    if model.cfg.zdim > 0:
        b = {k: v.to(device) for k, v in reader(idx).items()}
        with torch.no_grad():
            z = model.latent_means(b["images"], b.get("rot"), b.get("shift"))
    return model.estimate_occupancy(z, cfg.occupancy_threshold, cfg.occupancy_margin)


def latent_noise(ctx, batch_len: int, zdim: int, device: torch.device) -> torch.Tensor:
    """Reparameterisation noise of one step, drawn here and passed to the model explicitly.

    With several ranks every rank draws it for the whole global batch (the same RNG state everywhere)
    and keeps its strided rows, so each particle gets the noise it gets in one process and the RNG
    state saved in a checkpoint does not depend on the world size."""
    full = torch.randn(batch_len, zdim, device=device)
    return full if ctx is None else ctx.own_rows(full)


#: what ``TrainConfig.compile`` compiles
COMPILED_PARTS = (level_corners, ctf_values)


def use_compile(on: bool, log: Callable[[str], None], mode: CompileMode = "default") -> None:
    """Turn the compiled hash-grid arithmetic and CTF on (logged) or off for this process's training."""
    for part in COMPILED_PARTS:
        if on:
            part.enable(log, mode)
        else:
            part.disable()
    if on:
        graphs = ", replayed as CUDA graphs" if mode == "reduce-overhead" else ""
        log(f"hash grid level arithmetic and CTF through torch.compile{graphs} (the first steps compile)")


def abort_polled(ctx: DistContext | None, step: int, sync_every: int, should_abort: Callable[[], bool]) -> bool:
    """The abort poll at the start of every step (and so of every epoch).

    Several ranks must stop at the same step (one that stopped alone would leave the others waiting in
    DDP's all-reduce), so their requests are all-reduced. On CPU ranks (gloo) that costs microseconds and
    happens at every step: an Abort stops every rank within one step. On GPUs reading the reduced flag
    waits for the device, so it happens at the step loop's host synchronisations (every ``sync_every``
    steps, well under a second of GPU work)."""
    if ctx is None:
        return should_abort()
    if ctx.device.type == "cpu" or step % sync_every == 0:
        return ctx.any(should_abort())
    return False


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class _Run:
    """The fixed parts of one training run, gathered once after setup so that the epoch and step functions
    share them without a dozen arguments each."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    model: CryoFormer
    net: torch.nn.Module  # the model, or its DDP wrapper with several ranks
    opt: torch.optim.Optimizer
    reader: BatchReader
    device: torch.device
    ctx: DistContext | None
    path: Path
    n: int
    steps_per_epoch: int
    kl_w: float
    amp_dtype: torch.dtype | None
    log: Callable[[str], None]
    should_abort: Callable[[], bool]
    step_hook: Callable[[int, int], None] | None


@dataclass
class _Progress:
    """Running state across the epochs: the counters of the progress lines (throughput, ETA) and the host's
    count of occupancy estimates (reading the grid's device counter every step would wait for the GPU)."""

    t_start: float
    total_imgs: int
    estimates: int | None
    done_imgs: int = 0
    last_log: float = 0.0


@dataclass
class _Epoch:
    """One epoch's schedule and loss sums. ``mse_sum`` (mse x images, the logged loss) and ``loss_total``
    (the full loss, only for the non-finite check) stay on the device; ``loss_sum`` is their last reading
    on the host, taken every ``sync_every`` steps, at log lines and at the epoch's last step."""

    index: int
    pose_w: float
    coarse: bool
    global_batches: list[np.ndarray]
    shares: list[tuple[np.ndarray, float]] | None  # this rank's rows and loss weight per batch (several ranks)
    mse_sum: torch.Tensor
    loss_total: torch.Tensor
    loss_sum: float = 0.0
    count: int = 0
    checked: int = 0
    t_start: float = field(default_factory=time.time)


def train(data: ParticleData, model_cfg: ModelConfig, cfg: TrainConfig, ckpt_dir: Path, *,
          log: Callable[[str], None] = print, should_abort: Callable[[], bool] = lambda: False,
          step_hook: Callable[[int, int], None] | None = None) -> tuple[CryoFormer, list[float]]:
    """Train (or resume) a model; returns it and the per-epoch mean losses.

    In an initialised ``torch.distributed`` group of several ranks (see :mod:`cryoformer.distributed`),
    every rank calls this with the same arguments; each trains on its rows of every global batch under
    DDP, only rank 0 logs and writes the checkpoint, and the result equals a single process's.

    The step loop does not wait for the GPU: losses are summed on the device and read (with the
    non-finite check and, with several GPU ranks, the abort poll) only every ``cfg.sync_every`` steps, at
    log lines and at the end of each epoch.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / CHECKPOINT_NAME
    device = resolve(cfg.device)
    bind(device)
    ctx = _dist_current(device)
    if ctx is not None and not ctx.is_main:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for the group
    if model_cfg.pose_mode == "given" and not data.has_poses:
        raise ValueError("the particles have no poses: use pose mode 'predict'")

    model_cfg, model, opt, start_epoch, history = _start_or_resume(path, model_cfg, cfg, device, log)
    if start_epoch >= cfg.epochs:
        log(f"training already finished ({start_epoch} epochs)")
        return model, history
    run = _Run(cfg=cfg, model_cfg=model_cfg, model=model, net=_wrap(model, model_cfg, ctx), opt=opt,
               reader=BatchReader(data, model_cfg.box, pin=device.type == "cuda"), device=device, ctx=ctx,
               path=path, n=len(data), steps_per_epoch=math.ceil(len(data) / cfg.batch_size),
               kl_w=cfg.kl_weight if cfg.kl_weight is not None else 1.0 / (max(model_cfg.zdim, 1) * model_cfg.box ** 2),
               amp_dtype=autocast_dtype(device, cfg.amp), log=log, should_abort=should_abort, step_hook=step_hook)
    use_compile(cfg.compile and device.type == "cuda", log, cfg.compile_mode)
    model.head.product_dtype = head_product_dtype(device, cfg.amp)
    _log_start(run)
    t_start = time.time()
    model.train()
    occupancy = getattr(model, "occupancy", None)
    # read from the device once here (after a checkpoint load) and then counted on the host
    prog = _Progress(t_start=t_start, total_imgs=(cfg.epochs - start_epoch) * run.n,
                     estimates=None if occupancy is None else int(occupancy.estimates))
    for epoch in range(start_epoch, cfg.epochs):
        ep = _train_epoch(run, prog, epoch)
        _finish_epoch(run, ep, history)
    return model, history


def _start_or_resume(path: Path, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
                     log: Callable[[str], None]) -> tuple[ModelConfig, CryoFormer, torch.optim.Optimizer, int, list[float]]:
    """The model and optimiser, fresh or from the checkpoint at ``path``, with the RNG where the run left it.

    The seed is set before the model is made (its initial weights draw from it); a resumed run then
    overwrites the weights and the RNG state, so its noise continues exactly where the saved epoch ended.
    The checkpoint's model config wins over the caller's: the weights only fit the model they came from."""
    torch.manual_seed(cfg.seed)
    resumed = None
    if path.exists():
        resumed = load_checkpoint(path, "cpu")  # the RNG states must stay CPU tensors; weights move below
        model_cfg = ModelConfig.from_checkpoint(resumed["model_config"])
    model = CryoFormer(model_cfg).to(device)
    invalidate_budget()  # memory budgets of an earlier run on this device are out of date
    opt = make_optimizer(model, cfg)
    if resumed is None:
        return model_cfg, model, opt, 0, []
    model.load_state_dict(resumed["model"])
    opt.load_state_dict(resumed["optimizer"])
    start_epoch, history = int(resumed["epoch"]), list(resumed["loss_history"])
    torch.set_rng_state(resumed["torch_rng"].cpu())
    restore_cuda_rng(resumed.get("cuda_rng"), device)
    log(f"resumed from {path} after epoch {start_epoch}/{cfg.epochs}")
    return model_cfg, model, opt, start_epoch, history


def _wrap(model: CryoFormer, model_cfg: ModelConfig, ctx: DistContext | None) -> torch.nn.Module:
    """DDP around the model with several ranks, so that it all-reduces the gradients; parameters that a
    config never uses (zdim 0: cross-attention) need ``find_unused_parameters``."""
    return model if ctx is None else ctx.wrap(model, find_unused_parameters=model_cfg.zdim == 0)


def _log_start(run: _Run) -> None:
    """The run's first line: what is trained, how, and on what (precision, hash-grid backend, ranks), so a
    log tells on its own which path a job took."""
    m, cfg = run.model_cfg, run.cfg
    run.log(f"training {run.n} particles, box {m.box} ({m.pixel_size_A:.3f} A/px), "
            f"{cfg.epochs} epochs x {run.steps_per_epoch} steps of {cfg.batch_size}, device {run.device}, "
            + precision_note(run.device, cfg.amp) + ", " + run.model.grid.backend_note(run.device)
            + (", " + native_note() if run.device.type == "cpu" else "")
            + (f", {run.ctx.world} ranks" if run.ctx is not None else ""))


def _plan_epoch(run: _Run, epoch: int) -> tuple[_Epoch, Iterator[dict]]:
    """The epoch's shuffled batches and schedule. The order is a pure function of (seed, epoch), so a
    resumed run sees the batches the uninterrupted one saw; with several ranks each reads only its rows
    of every global batch (see cryoformer.distributed)."""
    cfg, n = run.cfg, run.n
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    ep = _Epoch(index=epoch, pose_w=cfg.pose_weight * 0.5 ** epoch, coarse=epoch < cfg.coarse_epochs,
                global_batches=[order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)], shares=None,
                mse_sum=torch.zeros((), dtype=torch.float64, device=run.device),
                loss_total=torch.zeros((), dtype=torch.float64, device=run.device))
    chunks = None
    if run.ctx is not None:
        ep.shares = [run.ctx.batch_rows(len(c)) for c in ep.global_batches]
        chunks = [c[rows] for c, (rows, _) in zip(ep.global_batches, ep.shares)]
    return ep, iterate_batches(run.reader, order, cfg.batch_size, cfg.prefetch, chunks, run.device)


def _train_epoch(run: _Run, prog: _Progress, epoch: int) -> _Epoch:
    """One epoch of steps. The abort poll comes first in every step, so an abort never leaves a half-done
    step, and the checkpoint of the previous epoch stays the one to resume from."""
    ep, batches = _plan_epoch(run, epoch)
    for step, batch in enumerate(batches):
        if abort_polled(run.ctx, step, run.cfg.sync_every, run.should_abort):
            raise TrainingAborted(f"aborted during epoch {epoch + 1}; the checkpoint after epoch {epoch} is kept")
        _optimise(run, prog, ep, step, batch)
        _refresh_occupancy_if_due(run, prog, epoch, step)
        if run.step_hook is not None:
            run.step_hook(epoch, step)
        _check_and_report(run, prog, ep, step)
    return ep


def _optimise(run: _Run, prog: _Progress, ep: _Epoch, step: int, batch: dict[str, torch.Tensor]) -> None:
    """One optimiser step on one minibatch; its losses are added to the epoch's device-side sums without
    reading them (a read would wait for the GPU). The latent noise is drawn before the forward, in the
    same order every run, so the RNG stream, and a resumed run with it, is reproducible."""
    cfg, mcfg, ctx, device = run.cfg, run.model_cfg, run.ctx, run.device
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    set_learning_rates(run.opt, lr_factor(cfg, (ep.index + step / run.steps_per_epoch) / cfg.epochs))
    eps = latent_noise(ctx, len(ep.global_batches[step]), mcfg.zdim, device) if mcfg.zdim > 0 else None
    with torch.autocast(device.type, dtype=run.amp_dtype or torch.bfloat16, enabled=run.amp_dtype is not None):
        out = run.net(b["images"], b.get("ctf"), b.get("rot"), b.get("shift"), eps=eps,
                      box=stage_box(mcfg.box, ep.coarse, prog.estimates), step=ep.index * run.steps_per_epoch + step)
    loss = out["mse"]
    if "kl" in out:
        loss = loss + run.kl_w * out["kl"]
    if "pose_loss" in out:
        loss = loss + ep.pose_w * out["pose_loss"]
    run.opt.zero_grad(set_to_none=True)
    # a rank's mean x W b_r / B: DDP's gradient average is then the global-batch mean's gradient
    (loss if ctx is None else loss * ep.shares[step][1]).backward()
    run.opt.step()
    bs = b["images"].shape[0] if ctx is None or ep.shares[step][1] > 0 else 0
    ep.mse_sum += out["mse"].detach().double() * bs
    ep.loss_total += loss.detach().double()
    ep.count += bs
    prog.done_imgs += bs if ctx is None else len(ep.global_batches[step])


def _refresh_occupancy_if_due(run: _Run, prog: _Progress, epoch: int, step: int) -> None:
    """Re-estimate the occupancy grid when the image count crosses an estimate point (a pure function of
    the count, so a resumed run estimates where the uninterrupted one did). With several ranks rank 0's
    grid is used by all: the ranks must render the same points."""
    occupancy = getattr(run.model, "occupancy", None)
    cfg, n = run.cfg, run.n
    seen = epoch * n + step * cfg.batch_size
    if occupancy is None or not occupancy_due(cfg, n, seen, min(seen + cfg.batch_size, (epoch + 1) * n)):
        return
    frac = refresh_occupancy(run.model, run.reader, n, cfg, run.device)
    if run.ctx is not None:
        run.ctx.broadcast_(occupancy.occupied)
        occupancy.version += 1
    prog.estimates += 1
    invalidate_budget()
    run.log(f"occupancy grid estimated ({prog.estimates}): {frac:.1%} of the sphere is rendered")


def _check_and_report(run: _Run, prog: _Progress, ep: _Epoch, step: int) -> None:
    """The step loop's only host synchronisation, every ``sync_every`` steps and at progress lines: read the
    device-side sums, stop on a non-finite loss (before any checkpoint of it is written), and log progress
    every ``log_interval_s`` and at the epoch's last step."""
    cfg = run.cfg
    now = time.time()
    due_log = now - prog.last_log >= cfg.log_interval_s or step == run.steps_per_epoch - 1
    if due_log or (step + 1) % cfg.sync_every == 0:
        ep.loss_sum, total = torch.stack((ep.mse_sum, ep.loss_total)).tolist()  # the one host synchronisation
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at epoch {ep.index + 1}, steps {ep.checked + 1}-{step + 1}")
        ep.checked = step + 1
    if due_log:
        prog.last_log = now
        rate = prog.done_imgs / max(now - prog.t_start, 1e-9)
        eta = (prog.total_imgs - prog.done_imgs) / max(rate, 1e-9)
        run.log(f"epoch {ep.index + 1}/{cfg.epochs} step {step + 1}/{run.steps_per_epoch} "
                f"loss {ep.loss_sum / max(ep.count, 1):.5f} {rate:.1f} img/s ETA {_fmt_time(eta)}")


def _finish_epoch(run: _Run, ep: _Epoch, history: list[float]) -> None:
    """The epoch's mean loss over all ranks and its checkpoint. Only rank 0 writes (the checkpoint does not
    depend on the world size); the barrier keeps the other ranks from starting the next epoch, and so
    from outrunning an abort, before the checkpoint exists."""
    loss_sum, count = ep.loss_sum, ep.count
    if run.ctx is not None:
        loss_sum, count = run.ctx.sum(loss_sum, count)
    history.append(loss_sum / max(count, 1))
    if run.ctx is None or run.ctx.is_main:
        save_checkpoint(run.path, run.model, run.opt, ep.index + 1, history, run.cfg)
    if run.ctx is not None:
        run.ctx.barrier()
    run.log(f"epoch {ep.index + 1} done: mean loss {history[-1]:.5f} in {time.time() - ep.t_start:.1f} s; "
            "checkpoint saved")
