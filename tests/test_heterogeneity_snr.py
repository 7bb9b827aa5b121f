"""Heterogeneity at realistic SNR (slow): three conformations of the hinge at SNR 0.1 are told apart.

Real particles sit at SNR 0.01-0.1; the method is tested there, not only at SNR 1. This is the project's
benchmark (``bench/bench_vs_cryodrgn.py``: box 64, SNR 0.1, 10 states, 5,000 particles, trained at box 32)
made small enough for CI: 2,000 particles of 3 states, simulated at box 64 and SNR 0.1 (noise variance 10x
the signal's over the box, the benchmark's definition) and trained at box 32, with the job defaults except
the epochs and a 4-dimensional latent. Measured while tuning: trained at box 24 from box 48 for 8 epochs the
states were not separated (kNN 0.48); at box 32 for 10 epochs with a cosine learning-rate decay, kNN 0.894;
for 12 epochs at the default constant rate, kNN 0.898 (cross-validated R^2 0.74), still rising, hence 16. The latents must separate the states (kNN accuracy >= 0.9, chance
1/3) and the map at each state's mean latent must match its own truth best where the states differ. With the
decoder blind to the latent (z * 0, a control run) the kNN accuracy was 0.346.
"""

import numpy as np
import pytest

from cryoformer.data import ArraySource, ParticleData
from cryoformer.infer import Reconstruction
from cryoformer.simulate import simulate, true_volume
from cryoformer.train import estimate_data_scale, train
from cryoformer_ext.config import JobConfig
from cryoformer_ext.job.run import model_config_for, train_config_for
from cryoformer_ext.analysis.recovery import latent_scores, state_scores

DATA_BOX, TRAIN_BOX, N, STATES, SNR, EPOCHS = 64, 32, 2000, 3, 0.1, 16


@pytest.mark.slow
def test_three_states_separate_at_snr_0_1(tmp_path):
    sim = simulate(N, DATA_BOX, pixel_size_A=4.0 * 64 / DATA_BOX, snr=SNR, states=STATES, seed=5)
    data = ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)
    job = JobConfig(epochs=EPOCHS, zdim=4, train_box=TRAIN_BOX)
    mcfg = model_config_for(data, job, estimate_data_scale(data, TRAIN_BOX))
    model, _ = train(data, mcfg, train_config_for(job, len(data)).model_copy(update={"log_interval_s": 1e9}), tmp_path,
                     log=lambda m: None)
    rec = Reconstruction(model)
    z = rec.encode(data)
    labels = np.rint(sim.conformation * (STATES - 1)).astype(int)
    scores = latent_scores(z, sim.conformation, labels)
    assert scores.knn_accuracy >= 0.9, scores
    states = state_scores(lambda zz: rec.volumes(zz), z, sim.conformation, np.unique(sim.conformation),
                          lambda t: true_volume(t, TRAIN_BOX), TRAIN_BOX)
    assert states.recovered == STATES, states
