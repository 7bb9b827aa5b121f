"""Data-parallel training on CPU (gloo): 2 ranks == 1 process; a killed rank fails the job cleanly; resume.

Tolerances (measured, 2 ranks vs 1 process, 3 epochs, float32 on CPU): loss history equal to 1e-7
relative, latents to 2e-7, parameters to ~2e-6. The only differences are in the summation order of the
gradient (two half-batch sums averaged by DDP instead of one full-batch sum).

Parameters whose true gradient is exactly zero are compared through the model's output instead: an
additive bias on attention *keys* (``*.k.bias``, ``k_norm.bias``, ``norm_fd.bias``, which only feeds
keys) shifts every logit of a softmax row by the same amount, so it never changes anything; its gradient
is pure rounding noise, which Adam (eps 1e-15) turns into steps of +-lr of random sign, in one process as
much as in two. Those parameters differ by up to lr x steps; the maps the model makes do not.

The model keeps the layer norm on the deformation tokens (``deformation_norm``; the default is without):
without it this tiny model's training is about 1000x more sensitive to the summation order (maps of 2 ranks
and 1 process 9e-4 apart after 3 epochs, against 1e-6 with it), so rounding would hide a real
data-parallel error. The data-parallel code does not depend on the decoder.
"""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest
import torch

from cryoformer.data import ArraySource, ParticleData
from cryoformer.infer import Reconstruction
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.simulate import simulate
from cryoformer.train import TrainConfig, train
from cryoformer_ext.config import JobConfig, JobConfigError
from cryoformer_ext.job.launch import Plan, WorkerFailed, job_plan, spawn

TINY = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32,
            hash_levels=8, hash_log2_size=12, data_scale=1.0,
            occupancy_cells=4, deformation_norm=True)
N, BATCH, EPOCHS = 21, 5, 3  # batches 5,5,5,5,1: 3+2 rows per rank, and a last batch with one row (rank 1: dummy)
GAUGE = re.compile(r"(\.k\.bias|k_norm\.bias|norm_fd\.bias)$")
PARAM_ATOL = 2e-5


def _data() -> ParticleData:
    sim = simulate(N, 16, pixel_size_A=8.0, snr=2.0, seed=3)
    return ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)


def _cfgs() -> tuple[ModelConfig, TrainConfig]:
    # fp32 products (amp off): the ranks split each batch, so with bf16 products (a CPU's default where it
    # multiplies bf16) they would round differently from one process, by bf16's 2^-8, not float rounding
    return ModelConfig(**TINY), TrainConfig(epochs=EPOCHS, batch_size=BATCH, seed=5, log_interval_s=1e9, prefetch=1,
                                            amp=False)


def _train_and_encode(data, ckpt_dir, kill_rank=None, kill_at=None, *, device, log, should_abort):
    """Body of every rank (module level: the spawned workers import it)."""
    import torch.distributed as tdist

    rank = tdist.get_rank() if tdist.is_initialized() else 0

    def hook(epoch: int, step: int) -> None:
        if rank == kill_rank and (epoch, step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    mcfg, tcfg = _cfgs()
    model, hist = train(data, mcfg, tcfg, ckpt_dir, log=log, should_abort=should_abort, step_hook=hook)
    lat = Reconstruction(model, hist).encode(data, batch_size=4)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, hist, lat


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    data = _data()
    state, hist, lat = _train_and_encode(data, tmp_path_factory.mktemp("single"), device=None, log=lambda m: None,
                                         should_abort=lambda: False)
    return data, state, hist, lat


def _assert_same_model(state, ref_state, hist, ref_hist):
    np.testing.assert_allclose(hist, ref_hist, rtol=1e-5)
    checked = 0
    for k, ref in ref_state.items():
        if GAUGE.search(k):
            continue
        torch.testing.assert_close(state[k], ref, rtol=0, atol=PARAM_ATOL, msg=k)
        checked += ref.numel()
    assert checked > 0.99 * sum(v.numel() for v in ref_state.values())
    # the output (maps at a few latents), which the excluded key biases cannot change
    a, b = CryoFormer(ModelConfig(**TINY)), CryoFormer(ModelConfig(**TINY))
    a.load_state_dict(ref_state)
    b.load_state_dict(state)
    z = np.array([[0.0, 0.0], [1.0, -1.0]], np.float32)
    va, vb = Reconstruction(a).volumes(z), Reconstruction(b).volumes(z)
    np.testing.assert_allclose(vb, va, atol=1e-4 * float(np.abs(va).max()))


def test_two_ranks_equal_one_process(reference, tmp_path):
    data, ref_state, ref_hist, ref_lat = reference
    logs: list[str] = []
    state, hist, lat = spawn(_train_and_encode, (data, tmp_path), Plan("spawn", 2), threads=1, log=logs.append)
    assert any("2 ranks" in m for m in logs)
    _assert_same_model(state, ref_state, hist, ref_hist)
    # every particle's latent, in input order (each rank encoded a contiguous shard, gathered on all)
    assert lat.shape == ref_lat.shape == (N, 2)
    np.testing.assert_allclose(lat, ref_lat, atol=1e-5)
    # the checkpoint (written by rank 0) has the single-process format and reloads as one process
    rec = Reconstruction.load(tmp_path)
    np.testing.assert_allclose(rec.encode(data), lat, atol=1e-6)


def test_killed_rank_fails_cleanly_and_rerun_resumes(reference, tmp_path):
    """SIGKILL of rank 1 in epoch 2: a WorkerFailed naming it within seconds, epoch 1 checkpoint kept."""
    data, ref_state, ref_hist, _ = reference
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"worker rank 1 of 2 \(pid \d+\) was killed by SIGKILL") as err:
        spawn(_train_and_encode, (data, tmp_path, 1, (1, 2)), Plan("spawn", 2), threads=1, log=lambda m: None)
    assert err.value.rank == 1 and err.value.kind == "signal"
    assert time.monotonic() - t0 < 60  # no hang: the launcher watches the workers
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 1
    # the checkpoint does not depend on the world size: the rerun here is a single process
    logs: list[str] = []
    state, hist, _ = _train_and_encode(data, tmp_path, device=None, log=logs.append, should_abort=lambda: False)
    assert any("resumed" in m and "after epoch 1" in m for m in logs)
    _assert_same_model(state, ref_state, hist, ref_hist)


HOLD_S = 120.0  # the longest a held rank waits for the abort request before the test fails
HOLDING = "holding epoch 2 after its first step until the abort request is seen"


def _run_job_holding_epoch_2(data, config, out_dir, *, device=None, log, should_abort):
    """A worker's job (replaces ``cryoformer_ext.job.run._run_job`` in the launcher; the spawned workers import
    this module): each rank holds epoch 2 after its first step until it sees the abort request, so the
    request always arrives between two steps of epoch 2, whatever the machine's speed. The abort must then
    stop both ranks at the next step's poll, before that step runs."""
    import functools

    import cryoformer_ext.job.run as job_mod

    def hold(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            log("a step after the abort request ran")
        if (epoch, step) != (1, 0):
            return
        log(HOLDING)
        deadline = time.monotonic() + HOLD_S
        while not should_abort():
            if time.monotonic() > deadline:
                raise AssertionError(f"no abort request within {HOLD_S} s")
            time.sleep(0.01)

    job_mod.train = functools.partial(job_mod.train, step_hook=hold)
    return job_mod._run_job(data, config, out_dir, device=device, log=log, should_abort=should_abort)


def test_run_job_two_cpu_ranks_abort_and_resume(tmp_path, monkeypatch):
    """The job layer end to end: spawn from ``ranks``, abort via the host's check, continue (2 ranks again).

    The host asks to abort once rank 0 logs that it holds epoch 2 after its first step; the workers wait
    there until they see the request (above), so it always arrives between two steps of epoch 2, after
    that epoch's first poll, and both ranks must stop at the next step's poll (with a poll only every
    ``sync_every`` steps, the rest of the tiny epoch would run)."""
    import cryoformer_ext.job.run as job_mod
    from cryoformer_ext.job.run import JobAborted, run_job

    data = _data()
    cfg = JobConfig(epochs=2, zdim=2, train_box=16, tokens=8, channels=16, enc_layers=2, enc_dim=32, batch_size=6,
                    kmeans=2, pcs=1, pc_steps=2, map_box=16, ranks=2, threads=2)
    logs: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(job_mod, "_run_job", _run_job_holding_epoch_2)
        with pytest.raises(JobAborted, match="aborted during epoch 2"):
            run_job(data, cfg, tmp_path, log=logs.append, should_abort=lambda: any(HOLDING in m for m in logs))
    assert not any("a step after the abort request ran" in m or "epoch 2 done" in m for m in logs), logs
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1
    logs.clear()
    result = run_job(data, cfg, tmp_path, log=logs.append)
    assert any("resumed" in m and "after epoch 1" in m for m in logs) and any("2 ranks" in m for m in logs)
    assert result.latents.shape == (N, 2) and len(result.labels) == N
    single = Reconstruction.load(tmp_path / "checkpoints").encode(data)
    np.testing.assert_allclose(result.latents, single, atol=1e-6)
    np.testing.assert_array_equal(np.load(result.latents_file), result.latents)


class _FakeGroup:
    """Stands in for a DistContext: ``any`` is the all-reduce of the ranks' flags (here: one rank's)."""

    def __init__(self, device: str):
        self.device, self.reduces = torch.device(device), 0

    def any(self, flag: bool) -> bool:
        self.reduces += 1
        return flag


def test_abort_poll_steps_per_device():
    """CPU ranks all-reduce the request at every step (an Abort stops them within one step); GPU ranks only
    at the host synchronisations, where reading the flag does not stall the device; one process: every step."""
    from cryoformer.train import abort_polled

    cpu, gpu = _FakeGroup("cpu"), _FakeGroup("cuda")
    assert [abort_polled(cpu, s, 16, lambda: True) for s in range(20)] == [True] * 20
    assert [abort_polled(gpu, s, 16, lambda: True) for s in range(20)] == [s % 16 == 0 for s in range(20)]
    assert (cpu.reduces, gpu.reduces) == (20, 2)
    assert not any(abort_polled(cpu, s, 16, lambda: False) for s in range(5))
    assert [abort_polled(None, s, 16, lambda: True) for s in range(3)] == [True] * 3


def test_job_plan():
    assert job_plan(JobConfig(), env={}).mode == "single"
    assert job_plan(JobConfig(ranks=1), env={}).mode == "single"
    p = job_plan(JobConfig(ranks=3), env={})
    assert (p.mode, p.world, p.backend) == ("spawn", 3, "gloo")
    p = job_plan(JobConfig(ranks=3), env={"RANK": "1", "WORLD_SIZE": "8"})
    assert (p.mode, p.world) == ("joined", 8)
    with pytest.raises(JobConfigError, match="ranks"):
        job_plan(JobConfig(ranks=2, gpus="0"), env={})
    if not torch.cuda.is_available():
        with pytest.raises(JobConfigError, match="no CUDA device"):
            job_plan(JobConfig(gpus="0,1"), env={})
