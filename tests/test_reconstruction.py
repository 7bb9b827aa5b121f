"""End-to-end reconstruction quality on simulated data with known answers (slow: minutes on 2 cores)."""

import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cryoformer.data import ArraySource, CTFParams, ParticleData
from cryoformer.infer import Reconstruction
from cryoformer.metrics import fsc, resolution_px
from cryoformer.model import ModelConfig
from cryoformer.poses import random_rotations
from cryoformer.simulate import simulate, true_volume
from cryoformer.train import TrainConfig, estimate_data_scale, train
from cryoformer_ext.outputs import write_mrc
from cryoformer_ext.star_io import read_particles_star, write_simulated_star


@pytest.mark.slow
@pytest.mark.relion
def test_homogeneous_reconstruction_of_relion_project_particles(tmp_path):
    """Particles made by RELION's own projector (with CTF and noise) -> our homogeneous reconstruction
    with the given poses reaches FSC >= 0.5 against the true map at 3 pixels or finer."""
    box, apix, n = 24, 5.0, 400
    rng = np.random.default_rng(11)
    truth = true_volume(0.5, box)
    write_mrc(tmp_path / "map.mrc", truth, apix)
    rot = random_rotations(n, rng)
    du = rng.uniform(8000, 20000, n)
    ctf = CTFParams.constant(n, defocus_u_A=du, defocus_v_A=du - rng.uniform(0, 1000, n),
                             defocus_angle_deg=rng.uniform(0, 180, n))
    write_simulated_star(tmp_path / "in.star", rot=rot, shift_px=rng.uniform(-2, 2, (n, 2)), ctf=ctf,
                         pixel_size_A=apix, box=box, stack_path="unused.mrcs")
    subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "in.star", "--ctf", "--add_noise",
                    "--white_noise", "0.3", "--o", "sim"], cwd=tmp_path, check=True, capture_output=True)
    star = read_particles_star(tmp_path / "sim.star", tmp_path)
    data = star.data
    cfg = ModelConfig(box=box, pixel_size_A=apix, zdim=0, data_scale=estimate_data_scale(data, box))
    model, hist = train(data, cfg, TrainConfig(epochs=4, batch_size=8, seed=0, log_interval_s=1e9),
                        tmp_path / "ck", log=lambda m: None)
    vol = Reconstruction(model).volumes(None)[0]
    curve = fsc(vol, truth)
    res = resolution_px(curve, 0.5)
    assert res <= 3.0, (res, np.round(curve, 3))
    assert hist[-1] < hist[0]
