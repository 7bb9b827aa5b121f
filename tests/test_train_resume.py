"""Interrupting and resuming training gives the same model as an uninterrupted run."""

import numpy as np
import pytest
import torch

from cryoformer.data import ArraySource, ParticleData
from cryoformer.model import ModelConfig
from cryoformer.simulate import simulate
from cryoformer.train import TrainConfig, TrainingAborted, train

TINY = dict(box=16, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32, hash_levels=8,
            hash_log2_size=12, occupancy_cells=4)


def _data():
    sim = simulate(24, 16, pixel_size_A=8.0, snr=2.0, seed=3)
    return ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)


def _cfgs():
    return ModelConfig(pixel_size_A=8.0, data_scale=1.0, **TINY), TrainConfig(epochs=3, batch_size=8, seed=5,
                                                                              log_interval_s=1e9, prefetch=1)


def test_resume_equals_uninterrupted(tmp_path):
    data = _data()
    mcfg, tcfg = _cfgs()
    full, hist_full = train(data, mcfg, tcfg, tmp_path / "full", log=lambda m: None)

    calls = {"n": 0}

    def abort_in_epoch_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 3 + 1  # 3 steps per epoch: abort at the 2nd step of epoch 2

    with pytest.raises(TrainingAborted):
        train(data, mcfg, tcfg, tmp_path / "split", log=lambda m: None, should_abort=abort_in_epoch_two)
    ck = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1
    messages = []
    resumed, hist_res = train(data, mcfg, tcfg, tmp_path / "split", log=messages.append)
    assert any("resumed" in m for m in messages)
    # tolerance: identical arithmetic on CPU, so equal to float rounding
    np.testing.assert_allclose(hist_res, hist_full, rtol=1e-6)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # and training did change the weights (the comparison above is not vacuous)
    fresh = type(full)(mcfg)
    assert not torch.allclose(fresh.grid.params, full.grid.params)


def test_checkpoint_is_written_atomically(tmp_path):
    data = _data()
    mcfg, tcfg = _cfgs()
    tcfg = tcfg.model_copy(update={"epochs": 1})
    train(data, mcfg, tcfg, tmp_path, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_learning_rates_follow_the_cosine_and_resume_with_it(tmp_path, monkeypatch):
    """The rates each step uses: the start value at the first step, falling to lr_final x start at the end,
    and after an interruption the resumed run uses the rates the uninterrupted one used."""
    import cryoformer.train as T

    def record(path, should_abort=lambda: False):
        seen = []
        real_step = torch.optim.Adam.step

        def step(opt, *a, **k):
            seen.append([g["lr"] for g in opt.param_groups])
            return real_step(opt, *a, **k)

        monkeypatch.setattr(torch.optim.Adam, "step", step)
        try:
            train(_data(), mcfg, tcfg, path, log=lambda m: None, should_abort=should_abort)
        except TrainingAborted:
            pass
        monkeypatch.undo()
        return np.array(seen)

    mcfg, tcfg = _cfgs()
    tcfg = tcfg.model_copy(update={"lr_final": 0.2})
    full = record(tmp_path / "full")
    assert full.shape == (9, 2)                                       # 3 epochs x 3 steps; groups: rest, hash grid
    assert np.allclose(full[0], [tcfg.lr, tcfg.lr * tcfg.hash_lr_factor])
    assert np.all(np.diff(full[:, 0]) < 0)
    last_progress = (2 + 2 / 3) / 3
    assert np.isclose(full[-1, 0] / full[0, 0], 0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi * last_progress)))
    assert T.lr_factor(tcfg, 1.0) == pytest.approx(0.2)

    calls = {"n": 0}

    def abort_in_epoch_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    first = record(tmp_path / "split", abort_in_epoch_two)
    rest = record(tmp_path / "split")
    assert np.allclose(np.concatenate([first[:3], rest]), full)
