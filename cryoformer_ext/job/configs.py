"""The engine's model and training settings of a job, from its parameters.

Kept apart from :mod:`cryoformer_ext.job.run`, which imports the writers of maps and plots (mrcfile,
matplotlib): the benchmarks and the GPU check build the job's model on machines that have only torch,
numpy and pydantic, and must build exactly the model a job trains.
"""

from __future__ import annotations

import torch

from cryoformer.data import ParticleData
from cryoformer.model import ModelConfig
from cryoformer.occupancy import cells_for
from cryoformer.train import TrainConfig

from cryoformer_ext.config import JobConfig, JobConfigError

OCCUPANCY_CELL_PX = 4  # occupancy grid cell edge in training-box pixels when occupancy_cell_A is 0


def select_device(config: JobConfig) -> torch.device:
    """The first of ``gpus``, else GPU 0 when there is one: here rather than with the run, so that the
    benchmarks train on the device a job would without importing the job's writers."""
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


def train_config_for(config: JobConfig, particles: int, device: torch.device | str = "cpu") -> TrainConfig:
    return TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                       lr_final=lr_final_for(config, particles), seed=config.seed, device=str(device), amp=config.amp,
                       occupancy_margin=config.occupancy_margin, occupancy_refresh=config.occupancy_refresh,
                       coarse_epochs=coarse_epochs_for(config))


#: the default decay: to this fraction of the start rates, in runs of at least DECAY_MIN_IMAGES images
DEFAULT_LR_FINAL, DECAY_MIN_IMAGES = 0.1, 10_000


def lr_final_for(config: JobConfig, particles: int) -> float:
    """The learning rates' end value. On the suite (2,000 particles, 6-20 epochs) a cosine decay to a tenth
    steadied the latent and the maps of the last epochs and did not delay the motion; in a 4-epoch run of 200
    particles (800 images) it left the consensus map unformed (its solvent mask held 51 % of the true
    density, against over 80 % at a constant rate), so a run that short keeps its rates."""
    if config.lr_final is not None:
        return config.lr_final
    return DEFAULT_LR_FINAL if particles * config.epochs >= DECAY_MIN_IMAGES else 1.0


#: the default coarse stage: a sixth of the epochs, never more than this many
DEFAULT_COARSE_EPOCHS_MAX = 3


def coarse_epochs_for(config: JobConfig) -> int:
    """Epochs at half the training box. The latent starts to follow the motion only after some thousands of
    images whatever the box; at half the box those images cost a quarter as much, and the maps catch up within
    an epoch or two at the full box. A sixth of the epochs (at most 3) keeps most of a short run at full box."""
    if config.coarse_epochs is not None:
        return config.coarse_epochs
    return min(DEFAULT_COARSE_EPOCHS_MAX, config.epochs // 6)


def model_config_for(data: ParticleData, config: JobConfig, data_scale: float) -> ModelConfig:
    tb = training_box(config, data.box)
    return ModelConfig(
        box=tb, pixel_size_A=data.pixel_size_A * data.box / tb, zdim=config.zdim, tokens=config.tokens,
        channels=config.channels, heads=4 if config.channels % 4 == 0 else 1, attention=config.attention,
        enc_layers=config.enc_layers, enc_dim=config.enc_dim, pose_mode=config.poses, data_scale=data_scale,
        hash_scale=config.hash_scale, render=config.render, cross_values=config.cross_values,
        query_code_cycles=config.query_code, deformation_norm=config.deformation_norm,
        encoder_box=None if config.encoder_box is None else min(config.encoder_box, tb),
        occupancy_cells=occupancy_cells_for(tb, data.pixel_size_A * data.box / tb, config) if config.occupancy else 0)


def occupancy_cells_for(tb: int, pixel_size_A: float, config: JobConfig) -> int:
    """Cells per axis of the occupancy grid of a job (``occupancy_cell_A`` 0: cells of a fixed pixel size)."""
    return cells_for(tb, pixel_size_A, config.occupancy_cell_A or None, OCCUPANCY_CELL_PX)
