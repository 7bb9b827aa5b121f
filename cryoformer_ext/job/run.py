"""One cryoFormer job from particles to latents, maps and plots, independent of RELION or cryoSPARC.

Both adapters and the ``cryoformer train`` command call :func:`run_job`; they only differ in how
they read particles and how they hand results back to their host program.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from cryoformer.train import CHECKPOINT_NAME, TrainingAborted, estimate_data_scale, load_checkpoint, train

from cryoformer_ext.analysis.analyze import AnalysisResult, MapRecord, analyze
from cryoformer_ext.config import NO_CTF_HINT, NO_CTF_LOG, JobConfig, JobConfigError
from cryoformer_ext.jobdir import (ANALYSIS_SUBDIR, CHECKPOINT_DIR, CONFIG_FILE, LATENTS_FILE, LOSS_FILE,
                                   PREDICTED_POSES_FILE, InputScale, write_input_scale)
from cryoformer_ext.analysis.solvent_mask import SoftMaskSettings
from cryoformer_ext.job.configs import model_config_for, select_device, train_config_for, training_box
from cryoformer_ext.job.launch import ABORT_TYPES, Plan, WorkerFailed, job_plan, joined_group, spawn, threads_per_rank
from cryoformer_ext.formats.atomic import atomic_path, atomic_write_text, save_npy

ANALYSIS_DIR = ANALYSIS_SUBDIR
ENCODE_CHUNK = 8192  # particles encoded between two abort checks

#: ModelConfig fields measured from the data rather than set by a parameter: Continue keeps the checkpoint's
MEASURED_FIELDS = frozenset({"data_scale"})
#: the job parameter behind a ModelConfig field whose name is not a parameter's
PARAMETER_OF = {"box": "train_box", "pixel_size_A": "train_box", "pose_mode": "poses", "heads": "channels",
                "occupancy_cells": "occupancy_cell_A", "query_code_cycles": "query_code"}


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

    @property
    def plots(self) -> list[Path]:
        """The analysis plots (PNG), for hosts that show them next to the job (cryoSPARC's event log)."""
        return self.analysis.plots


def output_map_box(config: JobConfig, particle_box: int) -> int:
    """Box of every output map: the particles' own (so the next job uses maps and mask as they are)
    unless ``map_box`` asks for another."""
    return int(config.map_box or particle_box)


def mask_settings(config: JobConfig) -> SoftMaskSettings:
    return SoftMaskSettings(threshold_fraction=config.mask_threshold, extend_px=config.mask_extend,
                            soft_edge_px=config.mask_soft_edge)


def architecture_changes(old: ModelConfig, new: ModelConfig) -> list[str]:
    """How the model this run's parameters ask for differs from a checkpoint's, one entry per parameter.

    Compared: every ModelConfig field the job sets (``new.model_fields_set``: whatever
    :func:`model_config_for` maps from the parameters, so a new model parameter is covered without a
    list here), except those measured from the data.
    """
    changes: dict[str, str] = {}
    order = list(ModelConfig.model_fields)  # fields named like a parameter first: they name the change best
    for name in sorted(new.model_fields_set - MEASURED_FIELDS,
                       key=lambda f: (f not in JobConfig.model_fields, order.index(f))):
        a, b = getattr(old, name), getattr(new, name)
        same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6))
        param = name if name in JobConfig.model_fields else PARAMETER_OF.get(name, name)
        if same or param in changes:
            continue
        if name == "pixel_size_A":  # same training box, other pixel size: other particles
            changes[param] = (f"pixel size of the training box = {a:g} Å in the checkpoint, {b:g} Å now "
                              "(other particles?)")
        elif name == "occupancy_cells":  # the parameter is in Å, the checkpoint holds the cell count
            changes[param] = (f"occupancy_cell_A: the occupancy grid has {a} cells per axis in the checkpoint, {b} "
                              "now (0 = 4-pixel cells)")
        else:
            changes[param] = f"{param} = {a} in the checkpoint, {b} now"
    return list(changes.values())


def check_continue(ckpt_dir: Path, model_cfg: ModelConfig) -> None:
    """Refuse to continue a checkpoint with parameters that change the model (it would silently train the old one)."""
    path = Path(ckpt_dir) / CHECKPOINT_NAME
    if not path.exists():
        return
    old = ModelConfig.from_checkpoint(load_checkpoint(path)["model_config"])
    changes = architecture_changes(old, model_cfg)
    if changes:
        raise JobConfigError(
            f"{path}: Continue cannot change the model: {'; '.join(changes)}. To keep training this model, set "
            f"these parameters back to the checkpoint's values; to train with the new values, start a new job "
            f"(or delete {path.parent})")


def _abort_if(should_abort: Callable[[], bool], when: str, ctx=None) -> None:
    if should_abort() if ctx is None else ctx.any(should_abort()):
        raise JobAborted(f"aborted {when}; training is complete and its checkpoint is kept: Continue redoes only "
                         "the inference and the analysis")


class _AbortableGenerator:
    """The trained model as the analysis sees it, stopping at the next map when the host asks to abort."""

    def __init__(self, rec: Reconstruction, should_abort: Callable[[], bool]):
        self._rec, self._should_abort = rec, should_abort

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rec, name)

    def volumes(self, z, box=None):
        _abort_if(self._should_abort, "during the analysis")
        return self._rec.volumes(z, box)


def _encode(rec: Reconstruction, data: ParticleData, should_abort: Callable[[], bool], ctx) -> np.ndarray:
    """Latents of every particle, in chunks with an abort check between them (one call in a group)."""
    if ctx is not None:  # a collective: every rank must take part, so no early exit here
        return rec.encode(data)
    parts = []
    for s in range(0, len(data), ENCODE_CHUNK):
        _abort_if(should_abort, "during the inference")
        parts.append(rec.encode(data, indices=np.arange(s, min(s + ENCODE_CHUNK, len(data)))))
    return np.concatenate(parts)


def run_job(data: ParticleData, config: JobConfig, out_dir: str | os.PathLike, *,
            log: Callable[[str], Any] = print, should_abort: Callable[[], bool] = lambda: False) -> JobResult | None:
    """Train (or resume), infer latents, analyse; every output lands in ``out_dir`` atomically.

    Data-parallel (``cryoformer_ext.job.launch``, docs/distributed.md): with several ``gpus`` or ``ranks`` > 1
    this process starts the workers and returns rank 0's result (:class:`WorkerFailed` when a worker
    dies); under torchrun (RANK/WORLD_SIZE set) this process is one rank and only rank 0 gets a result
    (the others return None after their share of training and inference).
    """
    if not config.ctf:
        log(NO_CTF_LOG)
        data = dataclasses.replace(data, ctf=None)
    elif data.ctf is None:
        raise JobConfigError(f"the particles have no CTF parameters. {NO_CTF_HINT}")
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
    config.for_particles(data.has_poses, explicit=True)  # a pose mode the particles cannot serve is an error
    device = select_device(config) if device is None else device
    ctx = dist_current(device)
    main = ctx is None or ctx.is_main  # rank 0 (or the only process) writes every output
    scale = estimate_data_scale(data, training_box(config, data.box), seed=config.seed)
    model_cfg = model_config_for(data, config, scale)
    check_continue(out_dir / CHECKPOINT_DIR, model_cfg)
    if main:
        atomic_write_text(out_dir / CONFIG_FILE, config.model_dump_json(indent=2))
        write_input_scale(out_dir, InputScale(box=data.box, pixel_size_A=data.pixel_size_A))
    train_cfg = train_config_for(config, len(data), device)
    try:
        model, history = train(data, model_cfg, train_cfg, out_dir / CHECKPOINT_DIR, log=log,
                               should_abort=should_abort)
    except TrainingAborted as err:
        raise JobAborted(str(err)) from None
    timings["train"] = time.perf_counter() - t0
    if main:
        atomic_write_text(out_dir / LOSS_FILE, json.dumps(history))
    _abort_if(should_abort, "after training", ctx)

    t1 = time.perf_counter()
    rec = Reconstruction(model, history, config.epochs)
    latents = _encode(rec, data, should_abort, ctx)  # in a group: each rank its shard, gathered in input order
    latents_file = save_npy(out_dir / LATENTS_FILE, latents) if main else None
    poses = rec.predict_poses(data)
    if not main:
        return None
    if poses is not None:
        with atomic_path(out_dir / PREDICTED_POSES_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, rot=poses[0], shift_px=poses[1])
    timings["inference"] = time.perf_counter() - t1
    log(f"latents of {len(latents)} particles written to {latents_file}")
    _abort_if(should_abort, "after the inference")

    t2 = time.perf_counter()
    n = len(data)
    result = analyze(latents if config.zdim > 0 else None, _AbortableGenerator(rec, should_abort),
                     out_dir / ANALYSIS_DIR, k=min(config.kmeans, n),
                     n_pcs=min(config.pcs, config.zdim), pc_steps=config.pc_steps, seed=config.seed,
                     map_box=output_map_box(config, data.box), loss_history=history, mask_settings=mask_settings(config),
                     settings={"job": config.model_dump(), "model": model_cfg.model_dump(),
                               "n_particles": n, "input_box": data.box, "input_pixel_size_A": data.pixel_size_A},
                     log=log)
    _abort_if(should_abort, "during the analysis")
    timings["analysis"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    labels = None if result.labels is None else np.asarray(result.labels, dtype=np.int64)
    return JobResult(out_dir=out_dir, latents=latents, labels=labels, maps=result.maps,
                     map_pixel_size_A=result.map_pixel_size_A,
                     latents_file=latents_file, summary_file=result.summary_file, analysis=result,
                     predicted_poses=poses, timings_s=timings)
