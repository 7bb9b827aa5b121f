"""The job's default model for a simulated dataset, without importing the job layer's output modules.

``cryoformer_ext.job.run`` imports the writers of maps and plots (mrcfile, matplotlib), which a bare GPU
machine with only torch, numpy and pydantic may not have; the benchmarks need only the model the job
would train. ``tests/test_gpu_check.py`` checks that this equals ``cryoformer_ext.job.run.model_config_for``.
"""

from __future__ import annotations

import torch

from cryoformer.data import ParticleData
from cryoformer.model import ModelConfig
from cryoformer_ext.config import JobConfig

OCCUPANCY_CELL_PX = 4  # as cryoformer_ext.job.run: occupancy grid cell edge in training-box pixels


def default_model_config(data: ParticleData, config: JobConfig, data_scale: float) -> ModelConfig:
    """``cryoformer_ext.job.run.model_config_for`` for a job whose training box is set (or the data's)."""
    tb = config.train_box if config.train_box is not None else min(64, data.box - data.box % 2)
    return ModelConfig(
        box=tb, pixel_size_A=data.pixel_size_A * data.box / tb, zdim=config.zdim, tokens=config.tokens,
        channels=config.channels, heads=4 if config.channels % 4 == 0 else 1, attention=config.attention,
        enc_layers=config.enc_layers, enc_dim=config.enc_dim, pose_mode=config.poses, data_scale=data_scale,
        hash_scale=config.hash_scale, render=config.render, cross_values=config.cross_values,
        encoder_box=None if config.encoder_box is None else min(config.encoder_box, tb),
        occupancy_cells=max(1, tb // OCCUPANCY_CELL_PX) if config.occupancy else 0)


def default_device() -> torch.device:
    """GPU 0 when there is one (the job's choice with ``gpus`` empty), else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
