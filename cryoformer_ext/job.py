"""One cryoFormer job from particles to latents, maps and plots, independent of RELION or cryoSPARC.

Both adapters and the ``cryoformer train`` command call :func:`run_job`; they only differ in how
they read particles and how they hand results back to their host program.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cryoformer.data import ParticleData
from cryoformer.distributed import current as dist_current
from cryoformer.infer import Reconstruction
from cryoformer.model import ModelConfig
from cryoformer.train import TrainConfig, TrainingAborted, estimate_data_scale, train

from .analysis import AnalysisResult, MapRecord, analyze
from .config import JobConfig, JobConfigError
from .launch import ABORT_TYPES, Plan, WorkerFailed, job_plan, joined_group, spawn, threads_per_rank
from .outputs import atomic_write_text, save_npy

CHECKPOINT_DIR = "checkpoints"
LATENTS_FILE = "latents.npy"
CONFIG_FILE = "job_config.json"
ANALYSIS_DIR = "analysis"
LOSS_FILE = "loss_history.json"
OCCUPANCY_CELL_PX = 4  # occupancy grid cell edge in training-box pixels


class JobAborted(RuntimeError):
    """The host asked the job to stop; the last epoch checkpoint is kept for a later continue."""


class JobResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    out_dir: Path
    latents: np.ndarray = Field(repr=False)
    labels: np.ndarray | None = Field(None, repr=False)
    maps: list[MapRecord]
    map_pixel_size_A: float
    latents_file: Path
    summary_file: Path
    analysis: AnalysisResult = Field(repr=False)
    predicted_poses: tuple[np.ndarray, np.ndarray] | None = Field(None, repr=False)
    timings_s: dict[str, float]


def select_device(config: JobConfig) -> torch.device:
    ids = config.gpu_ids()
    if ids:
        if not torch.cuda.is_available():
            raise JobConfigError(f"parameter 'gpus' = {config.gpus!r}, but no CUDA device is available here")
        if max(ids) >= torch.cuda.device_count():
            raise JobConfigError(f"parameter 'gpus' = {config.gpus!r}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device(f"cuda:{ids[0]}")
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def training_box(config: JobConfig, box: int) -> int:
    tb = config.train_box if config.train_box is not None else min(64, box - box % 2)
    if tb > box:
        raise JobConfigError(f"parameter 'train_box' = {tb} is larger than the particle box {box}")
    return tb


def train_config_for(config: JobConfig, device: torch.device | str = "cpu") -> TrainConfig:
    return TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                       device=str(device), amp=config.amp, occupancy_margin=config.occupancy_margin,
                       occupancy_refresh=config.occupancy_refresh, coarse_epochs=config.coarse_epochs)


def model_config_for(data: ParticleData, config: JobConfig, data_scale: float) -> ModelConfig:
    tb = training_box(config, data.box)
    return ModelConfig(
        box=tb, pixel_size_A=data.pixel_size_A * data.box / tb, zdim=config.zdim, tokens=config.tokens,
        channels=config.channels, heads=4 if config.channels % 4 == 0 else 1, attention=config.attention,
        enc_layers=config.enc_layers, enc_dim=config.enc_dim, pose_mode=config.poses, data_scale=data_scale,
        hash_scale=config.hash_scale, render=config.render,
        occupancy_cells=max(1, tb // OCCUPANCY_CELL_PX) if config.occupancy else 0)


def run_job(data: ParticleData, config: JobConfig, out_dir: str | os.PathLike, *,
            log: Callable[[str], Any] = print, should_abort: Callable[[], bool] = lambda: False) -> JobResult | None:
    """Train (or resume), infer latents, analyse; every output lands in ``out_dir`` atomically.

    Data-parallel (``cryoformer_ext.launch``, docs/distributed.md): with several ``gpus`` or ``ranks`` > 1
    this process starts the workers and returns rank 0's result (:class:`WorkerFailed` when a worker
    dies); under torchrun (RANK/WORLD_SIZE set) this process is one rank and only rank 0 gets a result
    (the others return None after their share of training and inference).
    """
    plan = job_plan(config)
    if plan.mode == "spawn":
        return _run_spawned(data, config, Path(out_dir), plan, log=log, should_abort=should_abort)
    if plan.mode == "joined":
        with joined_group(config) as device:
            return _run_job(data, config, out_dir, device=device, log=log, should_abort=should_abort)
    return _run_job(data, config, out_dir, log=log, should_abort=should_abort)


def _run_spawned(data: ParticleData, config: JobConfig, out_dir: Path, plan: Plan, *,
                 log: Callable[[str], Any], should_abort: Callable[[], bool]) -> JobResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return spawn(_run_job, (data, config, out_dir), plan, threads=threads_per_rank(config, plan.world),
                     log=log, should_abort=should_abort)
    except WorkerFailed as err:
        if err.kind in ABORT_TYPES:
            raise JobAborted(str(err)) from None
        raise WorkerFailed(f"{err}. The checkpoint of the last finished epoch is kept in "
                           f"{out_dir / CHECKPOINT_DIR}: run the job again to resume", rank=err.rank,
                           kind=err.kind) from None


def _run_job(data: ParticleData, config: JobConfig, out_dir: str | os.PathLike, *,
             device: torch.device | None = None, log: Callable[[str], Any] = print,
             should_abort: Callable[[], bool] = lambda: False) -> JobResult | None:
    """One process's job: all of it, or one rank's part in a group (``device`` given, group initialised)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if config.threads and device is None:  # workers: threads_per_rank() was applied by the launcher
        torch.set_num_threads(config.threads)
    if config.poses != "predict" and not data.has_poses:
        raise JobConfigError(f"parameter 'poses' = '{config.poses}', but the particles have no poses "
                             "(use poses = predict)")
    device = select_device(config) if device is None else device
    ctx = dist_current(device)
    main = ctx is None or ctx.is_main  # rank 0 (or the only process) writes every output
    if main:
        atomic_write_text(out_dir / CONFIG_FILE, config.model_dump_json(indent=2))
    scale = estimate_data_scale(data, training_box(config, data.box), seed=config.seed)
    model_cfg = model_config_for(data, config, scale)
    train_cfg = train_config_for(config, device)
    try:
        model, history = train(data, model_cfg, train_cfg, out_dir / CHECKPOINT_DIR, log=log,
                               should_abort=should_abort)
    except TrainingAborted as err:
        raise JobAborted(str(err)) from None
    timings["train"] = time.perf_counter() - t0
    if main:
        atomic_write_text(out_dir / LOSS_FILE, json.dumps(history))
    if should_abort() if ctx is None else ctx.any(should_abort()):
        raise JobAborted("aborted after training; the final checkpoint is kept")

    t1 = time.perf_counter()
    rec = Reconstruction(model, history, config.epochs)
    latents = rec.encode(data)  # in a group: each rank encodes its shard, gathered in input order
    latents_file = save_npy(out_dir / LATENTS_FILE, latents) if main else None
    poses = rec.predict_poses(data)
    if not main:
        return None
    if poses is not None:
        with open(out_dir / ".predicted_poses.npz.tmp", "wb") as fh:
            np.savez(fh, rot=poses[0], shift_px=poses[1])
        os.replace(out_dir / ".predicted_poses.npz.tmp", out_dir / "predicted_poses.npz")
    timings["inference"] = time.perf_counter() - t1
    log(f"latents of {len(latents)} particles written to {latents_file}")

    t2 = time.perf_counter()
    n = len(data)
    result = analyze(latents if config.zdim > 0 else None, rec, out_dir / ANALYSIS_DIR, k=min(config.kmeans, n),
                     n_pcs=min(config.pcs, config.zdim), pc_steps=config.pc_steps, seed=config.seed,
                     map_box=config.map_box, loss_history=history,
                     settings={"job": config.model_dump(), "model": model_cfg.model_dump(),
                               "n_particles": n, "input_box": data.box, "input_pixel_size_A": data.pixel_size_A},
                     log=log)
    timings["analysis"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    labels = None if result.labels is None else np.asarray(result.labels, dtype=np.int64)
    return JobResult(out_dir=out_dir, latents=latents, labels=labels, maps=result.maps,
                     map_pixel_size_A=rec.voxel_size_A(config.map_box or rec.train_box),
                     latents_file=latents_file, summary_file=result.summary_file, analysis=result,
                     predicted_poses=poses, timings_s=timings)
