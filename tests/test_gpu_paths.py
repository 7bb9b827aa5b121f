"""The CUDA code paths, tested on a CPU, where no GPU runs this code.

What needs a GPU is reached by monkeypatching ``torch.cuda`` functions that record the devices and
dtypes they are called with (RNG state, ``set_device``, capability, id mapping), by CPU autocast where its
dtype rules are CUDA's (a matmul runs in bf16 under both), by counting host synchronisations with a
patched ``Tensor.item``/``__float__``/``__bool__``/``tolist`` (each is a device-to-host wait on CUDA),
and by shape arithmetic for the rendering chunks. ``bench/gpu_check.py`` runs the same paths on a GPU.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoformer.compiled import CompiledFunction
from cryoformer.data import ArraySource, ParticleData
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.simulate import simulate
from cryoformer.train import BatchReader, TrainConfig, iterate_batches, load_checkpoint, train

TINY = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32,
            hash_levels=8, hash_log2_size=12, data_scale=1.0)


@pytest.fixture(autouse=True)
def torch_forms_only(monkeypatch):
    """The CPU's C kernels (cryoformer.native) never run on a GPU: these tests stand in for the GPU with
    the torch forms, which a CUDA device runs."""
    import cryoformer.native.build as native_build

    monkeypatch.setenv("CRYOFORMER_NATIVE", "0")
    native_build.library.cache_clear()
    yield
    native_build.library.cache_clear()


@functools.lru_cache(maxsize=None)
def _sim(n: int = 24):
    return simulate(n, 16, pixel_size_A=8.0, snr=2.0, seed=3)


def _data(n: int = 24) -> ParticleData:
    sim = _sim(n)
    return ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)


# ------------------------------------------------------------------------------------------ 1. RNG
class _FakeCudaRng:
    """torch.cuda's per-device generator API, with the real one's argument check."""

    def __init__(self):
        self.calls: list[tuple] = []

    def get_rng_state(self, device="cuda"):
        self.calls.append(("get", torch.device(device)))
        return torch.arange(16, dtype=torch.uint8) + (torch.device(device).index or 0)

    def set_rng_state(self, new_state, device="cuda"):
        if new_state.device.type != "cpu" or new_state.dtype != torch.uint8:
            raise TypeError("RNG state must be a torch.ByteTensor")
        self.calls.append(("set", torch.device(device), new_state.clone()))

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restored every GPU's state"))
        return self


def test_cuda_rng_round_trip_uses_the_gpu_in_use_and_cpu_byte_tensors(monkeypatch, tmp_path):
    from cryoformer.device import cuda_rng_state, restore_cuda_rng

    rng = _FakeCudaRng().install(monkeypatch)
    gpu = torch.device("cuda", 1)  # gpus = 1: the state of GPU 1, not the list of all GPUs' states
    torch.save({"cuda_rng": cuda_rng_state(gpu)}, tmp_path / "ck.pt")
    saved = load_checkpoint(tmp_path / "ck.pt")["cuda_rng"]
    restore_cuda_rng(saved, gpu)
    assert [c[:2] for c in rng.calls] == [("get", gpu), ("set", gpu)]
    assert torch.equal(rng.calls[1][2], torch.arange(16, dtype=torch.uint8) + 1)
    # resumed on another id, with fewer GPUs visible: the one saved state goes to the GPU in use
    rng.calls.clear()
    restore_cuda_rng(saved, torch.device("cuda", 0))
    assert rng.calls[0][1] == torch.device("cuda", 0)
    # a checkpoint in the old format (every visible GPU's state): this GPU's entry, no IndexError
    old = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    rng.calls.clear()
    restore_cuda_rng(old, torch.device("cuda", 1))
    restore_cuda_rng(old, torch.device("cuda", 5))
    assert [int(c[2][0]) for c in rng.calls] == [1, 0]
    # CPU: nothing of CUDA's is touched
    assert cuda_rng_state(torch.device("cpu")) is None
    restore_cuda_rng(saved, torch.device("cpu"))
    assert len(rng.calls) == 2


def test_cpu_training_with_gpus_present_neither_saves_nor_restores_cuda_rng(monkeypatch, tmp_path):
    """A CPU job on a GPU machine: the checkpoint holds no CUDA state and Continue does not set one."""
    rng = _FakeCudaRng().install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = _data(8)
    tcfg = TrainConfig(epochs=1, batch_size=8, seed=5, log_interval_s=1e9, prefetch=0)
    train(data, ModelConfig(**TINY), tcfg, tmp_path, log=lambda m: None)
    assert load_checkpoint(tmp_path / "last.pt")["cuda_rng"] is None
    train(data, ModelConfig(**TINY), tcfg.model_copy(update={"epochs": 2}), tmp_path, log=lambda m: None)
    assert rng.calls == []


# ----------------------------------------------------------------------------- 2. fp32 geometry
@pytest.mark.parametrize("render", ["canonical", "rotated"])
def test_sample_coordinates_stay_fp32_under_autocast(render):
    from cryoformer.poses import random_rotations
    from cryoformer.render import rotated_points

    model = CryoFormer(ModelConfig(**{**TINY, "box": 64, "render": render}))
    rot = torch.as_tensor(random_rotations(2, np.random.default_rng(0)), dtype=torch.float32)
    exact = rotated_points(model.points, rot)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = rotated_points(model.points, rot)
    assert auto.dtype == torch.float32
    assert torch.equal(auto, exact)
    # and what the model samples the field at, in a training forward under autocast
    seen = []
    real = model.density

    def spy(world_pts, kv, return_attention=False, plan=None):
        seen.append(world_pts.dtype)
        return real(world_pts, kv, return_attention, plan)

    model.density = spy
    model.cfg = model.cfg.model_copy(update={"chunk_points": 1 << 30})
    sim = simulate(2, 64, pixel_size_A=2.0, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.as_tensor(sim.images), None, torch.as_tensor(sim.rot), None)
    assert seen and set(seen) == {torch.float32}


# ------------------------------------------------------------------- 3, 11. the tcnn backend
def _fake_tinycudann(seen: list[dict]):
    """A stand-in for the tinycudann module: records what its Encoding is called with."""
    from cryoformer.hashgrid import hashgrid_level_table

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, config, seed=1337, dtype=None):
            super().__init__()
            lv = hashgrid_level_table(config["n_levels"], config["log2_hashmap_size"], config["base_resolution"],
                                      config["per_level_scale"])
            self.n_out = config["n_levels"] * config["n_features_per_level"]
            self.params = torch.nn.Parameter(torch.zeros((lv[-1]["offset"] + lv[-1]["size"]) * self.n_out // config["n_levels"]))

        def forward(self, x):
            seen.append({"x_requires_grad": x.requires_grad, "params_requires_grad": self.params.requires_grad,
                         "grad_mode": torch.is_grad_enabled()})
            return x.sum(-1, keepdim=True) * self.params[:self.n_out]  # depends on x and on the params

    return types.SimpleNamespace(Encoding=Encoding)


@pytest.fixture
def fake_tcnn(monkeypatch):
    import cryoformer.hashgrid as hg

    seen: list[dict] = []
    monkeypatch.setitem(sys.modules, "tinycudann", _fake_tinycudann(seen))
    hg._tcnn_available.cache_clear()
    # the tcnn path runs on CUDA tensors only: let CPU tensors pass for it
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "device", lambda dev: __import__("contextlib").nullcontext())
    yield seen
    hg._tcnn_available.cache_clear()


def test_tcnn_backend_gets_no_position_gradient(fake_tcnn):
    """poses refine/predict: positions come from the orientation encoder and must not get a gradient
    through the field, on the tcnn backend as on the torch one."""
    from cryoformer.hashgrid import HashGrid

    grid = HashGrid(n_levels=2, log2_table_size=8, backend="tcnn")
    x = torch.rand(10, 3, requires_grad=True)
    grid(x * 1.0).sum().backward()
    assert fake_tcnn[-1]["x_requires_grad"] is False
    assert x.grad is None


def test_tcnn_backend_runs_inference_under_no_grad(fake_tcnn):
    """tcnn runs its training forward when the params require grad; export and timing use no_grad."""
    from cryoformer.hashgrid import HashGrid

    grid = HashGrid(n_levels=2, log2_table_size=8, backend="tcnn")
    x = torch.rand(10, 3)
    with torch.no_grad():
        y_inf = grid(x)
    assert fake_tcnn[-1]["params_requires_grad"] is False
    y_train = grid(x)  # training still trains the shared parameter
    assert fake_tcnn[-1]["params_requires_grad"] is True
    y_train.sum().backward()
    assert grid.params.grad is not None and grid.params.grad.abs().sum() > 0
    assert torch.equal(y_inf, y_train.detach())


# ------------------------------------------------------------ 4. no host->device copy per level
def test_hash_grid_makes_no_tensor_from_host_data(monkeypatch):
    """``torch.tensor(list, device=cuda)`` is a synchronous copy; per level and pass it was hundreds a step."""
    from cryoformer.hashgrid import HashGrid

    grid = HashGrid(n_levels=16, log2_table_size=12, base_resolution=4, per_level_scale=1.6, backend="torch")
    x = torch.rand(500, 3)
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _n=name, **k: made.append(_n) or _real(*a, **k))
    grid(x).square().sum().backward()
    assert made == []
    assert any(lv["hashed"] for lv in grid.level_table()) and not all(lv["hashed"] for lv in grid.level_table())


# ------------------------------------------------------------------ 5. no host sync per step
class _SyncCounter:
    """Counts tensor-to-host reads (on CUDA each waits for the GPU) of each training step, from the
    first forward on; ``step_calls[s]`` holds what ran after the hook of step ``s - 1`` up to the hook
    of step ``s``.

    Reads from inside ``torch.optim`` are not counted: Adam keeps its step counter on the CPU
    (``capturable=False``), so its ``.item()`` is no device synchronisation on a GPU either."""

    NAMES = ("item", "__float__", "__bool__", "__int__", "tolist")
    OPTIM = os.path.join(os.path.dirname(torch.__file__), "optim")

    def __init__(self, monkeypatch):
        self.step_calls: list[list[str]] = [[]]
        self.active = False
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **k):
                if self.active and not self._in_optimizer():
                    self.step_calls[-1].append(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        real_forward = CryoFormer.forward

        def forward(model, *a, **k):
            self.active = True
            return real_forward(model, *a, **k)

        monkeypatch.setattr(CryoFormer, "forward", forward)

    def _in_optimizer(self) -> bool:
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename.startswith(self.OPTIM):
                return True
            f = f.f_back
        return False

    def hook(self, epoch: int, step: int) -> None:
        self.step_calls.append([])


class _HostCopyCounter:
    """Counts tensors made from host data in the model's forward (``torch.tensor``/``as_tensor``, and
    ``Tensor.to(device)`` of a tensor that is not page-locked or not ``non_blocking``): on CUDA each is a
    pageable host-to-device copy that waits for the stream. (The batches come pinned from the reading
    thread: ``test_batches_are_pinned_in_the_reading_thread_bound_to_the_gpu``.)"""

    def __init__(self, monkeypatch, sync: "_SyncCounter"):
        self.sync = sync
        self.in_forward = False
        self.step_calls: list[list[str]] = [[]]
        real_forward = CryoFormer.forward  # the sync counter's wrapper

        def forward(model, *a, **k):
            self.in_forward = True
            try:
                return real_forward(model, *a, **k)
            finally:
                self.in_forward = False

        monkeypatch.setattr(CryoFormer, "forward", forward)
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)
            def made(data, *a, _real=real, _name=name, **k):
                # as_tensor of a tensor is the tensor itself (or a cast on its device): no host copy
                if not (_name == "as_tensor" and torch.is_tensor(data)):
                    self._note(_name)
                return _real(data, *a, **k)

            monkeypatch.setattr(torch, name, made)
        real_to = torch.Tensor.to

        def to(t, *a, **k):
            target = next((x for x in list(a) + [k.get("device")] if isinstance(x, (str, torch.device))), None)
            if target is not None and not (k.get("non_blocking") and t.is_pinned()):
                self._note("to")
            return real_to(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _note(self, name: str) -> None:
        if self.in_forward:
            self.step_calls[-1].append(name)


def _sync_run(monkeypatch, tmp_path, n=40, batch=2, sync_every=4, model_cfg=None, **train_kw):
    data = _data(n)
    tcfg = TrainConfig(epochs=1, batch_size=batch, seed=5, log_interval_s=1e9, prefetch=0, sync_every=sync_every,
                       **train_kw)
    counter = _SyncCounter(monkeypatch)
    copies = _HostCopyCounter(monkeypatch, counter)
    real_hook = counter.hook

    def hook(epoch, step):
        real_hook(epoch, step)
        copies.step_calls.append([])

    train(data, model_cfg or ModelConfig(**TINY), tcfg, tmp_path, log=lambda m: None, step_hook=hook)
    return counter.step_calls, copies.step_calls


def _assert_syncs_only_every(step_calls, sync_every, steps, also=()):
    """Reads only right after the hook of every ``sync_every``-th step (the loss check, and the abort
    poll at the start of the next step), of the first step (its progress line) and of the last, and in
    the slots ``also``."""
    synced = {i for i, calls in enumerate(step_calls) if calls}
    assert synced, "no synchronisation at all: the loss check is gone"
    allowed = {s + 1 for s in range(steps) if (s + 1) % sync_every == 0 or s in (0, steps - 1)} | set(also)
    assert synced <= allowed, (sorted(synced), [len(c) for c in step_calls])


def test_step_loop_does_not_wait_for_the_device(monkeypatch, tmp_path):
    step_calls, copies = _sync_run(monkeypatch, tmp_path)
    _assert_syncs_only_every(step_calls, 4, 20)
    assert not any(copies[1:]), [len(c) for c in copies]


def test_step_loop_with_occupancy_waits_only_where_the_grid_changes(monkeypatch, tmp_path):
    """The defaults (occupancy grid, canonical render with a jittered grid): no device read and no copy
    from pageable host memory in a step, except the first (lattices and constants are made there) and
    the steps that estimate the grid (at 8, 16 and 32 images: steps 3, 7 and 15 of 2 images) and the next
    ones (new lattices)."""
    from cryoformer.train import occupancy_due

    cfg = ModelConfig(**{**TINY, "occupancy_cells": 4, "render": "canonical", "jitter": 1.0})
    step_calls, copies = _sync_run(monkeypatch, tmp_path, model_cfg=cfg, occupancy_warmup=8)
    tcfg = TrainConfig(occupancy_warmup=8)
    estimated = [s for s in range(20) if occupancy_due(tcfg, 40, 2 * s, 2 * s + 2)]
    assert estimated == [3, 7, 15]
    allowed = {0} | set(estimated) | {s + 1 for s in estimated}
    _assert_syncs_only_every(step_calls, 4, 20, also=allowed)
    assert {i for i, c in enumerate(copies) if c} <= allowed, [len(c) for c in copies]


@pytest.fixture
def one_rank_group(monkeypatch):
    """A real gloo process group of one rank, with the trainer taking its data-parallel path."""
    import torch.distributed as tdist

    import cryoformer.train as tr
    from cryoformer.distributed import DistContext

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(tr, "_dist_current", lambda device=None: DistContext(0, 1, torch.device("cpu")))
    yield
    tdist.destroy_process_group()


def test_data_parallel_step_loop_on_cpu_ranks_polls_abort_every_step_and_reads_the_loss_every_k(
        monkeypatch, tmp_path, one_rank_group):
    """CPU ranks all-reduce the abort request at every step (reading it costs nothing there; the GPU ranks'
    every-k rule is checked in ``test_abort_poll_steps_per_device``); the losses are still read only every
    ``sync_every`` steps, and the forward runs under no function mode with the noise passed in."""
    import torch.distributed as tdist

    reduced = []
    real = tdist.all_reduce
    monkeypatch.setattr(tdist, "all_reduce", lambda t, *a, **k: reduced.append(t.numel()) or real(t, *a, **k))
    modes = []
    real_forward = CryoFormer.forward

    def forward(self, *a, **k):  # no TorchFunctionMode around the forward, the noise comes as an argument
        modes.append((len(torch.overrides._get_current_function_mode_stack()), k.get("eps") is not None))
        return real_forward(self, *a, **k)

    monkeypatch.setattr(CryoFormer, "forward", forward)
    step_calls, _ = _sync_run(monkeypatch, tmp_path)
    # the poll's flag is read with .item(), the loss sums with .tolist()
    _assert_syncs_only_every([[c for c in calls if c != "item"] for calls in step_calls], 4, 20)
    assert [calls.count("item") for calls in step_calls] == [0] + [1] * 19 + [0]  # the polls of steps 1-19
    assert set(modes) == {(0, True)}
    assert reduced.count(1) == 20  # the abort flag, at every step


def test_nonfinite_loss_is_still_caught(monkeypatch, tmp_path):
    """Checked every ``sync_every`` steps instead of every step: still before any checkpoint is written."""
    data = _data(16)
    real_forward = CryoFormer.forward
    calls = []

    def forward(self, *a, **k):  # the loss turns NaN from the second step on
        out = real_forward(self, *a, **k)
        calls.append(1)
        if len(calls) >= 2:
            out["mse"] = out["mse"] * float("nan")
        return out

    monkeypatch.setattr(CryoFormer, "forward", forward)
    tcfg = TrainConfig(epochs=1, batch_size=2, log_interval_s=1e9, prefetch=0, sync_every=3)
    with pytest.raises(FloatingPointError, match=r"loss became nan at epoch 1, steps 2-3"):
        train(data, ModelConfig(**TINY), tcfg, tmp_path, log=lambda m: None)
    assert not (tmp_path / "last.pt").exists()


# --------------------------------------------------------------------------- 6. precision
@pytest.mark.parametrize("capability, amp, want", [
    ((9, 0), True, torch.bfloat16), ((8, 0), True, torch.bfloat16), ((8, 6), True, torch.bfloat16),
    ((7, 5), True, None), ((7, 0), True, None), ((6, 1), True, None), ((9, 0), False, None)])
def test_bf16_only_on_compute_capability_8_and_up(monkeypatch, capability, amp, want):
    from cryoformer.device import autocast_dtype, precision_note

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    gpu = torch.device("cuda", 2)
    assert autocast_dtype(gpu, amp) is want
    assert not amp or asked[-1] == gpu  # the capability of the GPU in use, not of GPU 0
    note = precision_note(gpu, amp)
    assert note.startswith("bf16") if want else note.startswith("fp32")
    assert autocast_dtype(torch.device("cpu"), amp) is None


# --------------------------------------------------------- 8, 9. pinning and the current device
def test_batches_are_pinned_in_the_reading_thread_bound_to_the_gpu(monkeypatch):
    main = threading.get_ident()
    pinned, bound = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(threading.get_ident()) or t)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append((threading.get_ident(), torch.device(d))))
    reader = BatchReader(_data(8), 16, pin=True)
    gpu = torch.device("cuda", 1)
    batches = list(iterate_batches(reader, np.arange(8), 4, prefetch=2, device=gpu))
    assert len(batches) == 2 and "index" not in batches[0]  # the unused index tensor is gone
    assert len(pinned) == 2 * len(batches[0]) and main not in pinned
    assert bound and bound[0][1] == gpu and bound[0][0] == pinned[0]  # set before pinning, same thread


def test_training_binds_its_gpu_first(monkeypatch, tmp_path):
    """``gpus = 1``: the trainer makes GPU 1 current before anything else touches CUDA."""
    class Bound(Exception):
        pass

    bound = []

    def set_device(d):
        bound.append(torch.device(d))
        raise Bound  # stop here: nothing after it can run on a CPU build

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(Bound):
        train(_data(8), ModelConfig(**TINY), TrainConfig(epochs=1, device="cuda:1"), tmp_path, log=lambda m: None)
    assert bound == [torch.device("cuda", 1)]
    from cryoformer.device import bind, resolve

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    bind(resolve("cuda"))
    bind(resolve("cpu"))
    assert bound[1:] == [torch.device("cuda", 3)]


# ---------------------------------------------------------------------- 10. explicit noise
def test_noise_is_an_argument_and_equals_the_drawn_one():
    from cryoformer.distributed import DistContext

    model = CryoFormer(ModelConfig(**TINY))
    sim = _sim()
    args = (torch.as_tensor(sim.images[:5]), torch.as_tensor(sim.ctf.take(np.arange(5))),
            torch.as_tensor(sim.rot[:5]), torch.as_tensor(sim.shift_px[:5]))
    torch.manual_seed(7)
    eps = torch.randn(5, 2)
    torch.manual_seed(7)
    drawn = model(*args)["mse"]
    given = model(*args, eps=eps)["mse"]
    assert torch.equal(drawn, given)
    assert not torch.equal(model(*args, eps=eps + 1.0)["mse"], given)
    # a rank's rows of the global batch's noise are the rows batch_rows gives it, dummy row included
    full = torch.randn(5, 2)
    for rank in range(3):
        ctx = DistContext(rank, 3, torch.device("cpu"))
        rows, _ = ctx.batch_rows(5)
        assert torch.equal(ctx.own_rows(full), full[torch.as_tensor(rows)])
        rows, w = DistContext(rank, 3, torch.device("cpu")).batch_rows(1)
        assert torch.equal(ctx.own_rows(full[:1]), full[:1][torch.as_tensor(rows)])


# ------------------------------------------------------------ literal attention chunk size
def _chunk_shapes(model: CryoFormer, batch: int, box: int | None = None) -> list[tuple]:
    """(images, points) of each piece the spatial attention is evaluated on in one training render
    (or one map export when ``box`` is given); the attention itself is replaced by zeros."""
    shapes = []

    def attend(query, kv, return_attention=False):
        p = query[0].shape[-3] if model.cfg.attention == "literal" else query[0].shape[-2]
        shapes.append((kv[0].shape[0], p))
        zeros = torch.zeros(kv[0].shape[0], p)
        return (zeros, torch.zeros(*zeros.shape, model.cfg.tokens)) if return_attention else zeros

    model.head.attend = attend
    with torch.no_grad():
        if box is None:
            model.train()
            model.render(torch.zeros(batch, model.cfg.tokens, model.cfg.channels), torch.eye(3).expand(batch, 3, 3))
        else:
            model.eval()
            model.volume(None, box)
    return shapes


def test_literal_attention_chunks_are_sized_by_the_tokens(monkeypatch):
    """With 8 GiB free (a budget of 4 GiB), a box-64 batch of the point form is evaluated in one piece, and
    the literal form's (B, P, N, N) tensors are cut into pieces that fit the budget (at the old fixed
    2^18-point chunks one such tensor had 2^30 elements, 4 GiB)."""
    monkeypatch.setenv("CRYOFORMER_MEMORY_BYTES", str(8 << 30))
    base = dict(box=64, pixel_size_A=2.0, zdim=8, tokens=64, channels=64)  # the job's defaults
    point = CryoFormer(ModelConfig(**base))
    literal = CryoFormer(ModelConfig(**base, attention="literal"))
    batch = 8
    assert len(_chunk_shapes(point, batch)) == 1          # no recomputation: it fits
    shapes = _chunk_shapes(literal, batch)
    biggest = max(b * p for b, p in shapes) * 64 * 64     # the (B, P, N, N) logits of one piece
    assert len(shapes) > 1 and 3 * biggest * 4 <= 4 << 30, f"{biggest} elements"
    assert sum(p for _, p in shapes) == len(literal._lattice(64)["voxels"])  # every point evaluated once
    vol_shapes = _chunk_shapes(literal, 1, box=64)         # the map export too
    assert 3 * max(p for _, p in vol_shapes) * 64 * 64 * 4 <= 4 << 30


def test_points_per_chunk_helper():
    from cryoformer.memory import activation_bytes_per_point, points_per_chunk

    kw = dict(tokens=64, channels=64, feat_dim=32, hidden=16)
    budget = 1 << 30
    p = points_per_chunk("literal", batch=8, budget_bytes=budget, **kw)
    assert p * 8 * activation_bytes_per_point("literal", **kw) <= budget
    assert (p + 1) * 8 * activation_bytes_per_point("literal", **kw) > budget
    assert points_per_chunk("literal", batch=8, budget_bytes=1, **kw) == 1
    # halving the tokens roughly quarters the N x N part: more points fit
    assert points_per_chunk("literal", batch=8, budget_bytes=budget, **{**kw, "tokens": 32}) > 2 * p


# ------------------------------------------------------------------- 7, 12: GPU ids, torchrun
def _fake_gpus(monkeypatch, count: int, set_device=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", set_device or (lambda d: None))


def test_bench_distributed_binds_ranks_inside_the_allocation(monkeypatch, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_distributed

    import cryoformer_ext.job.launch as launch

    _fake_gpus(monkeypatch, 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    plans = []

    def spawn(fn, args, plan, **kw):
        plans.append(plan)
        return {"images_per_s": 1.0, "wall_s": 1.0, "timed_images": 1, "cpu_s_all_ranks": 1.0, "images_per_cpu_s": 1.0}

    monkeypatch.setattr(launch, "spawn", spawn)
    bench_distributed.main(["--ranks", "1,2", "--n", "4", "--box", "16", "--out", str(tmp_path / "r.json")])
    assert [p.gpus for p in plans] == [["4"], ["4", "5"]]


def test_torchrun_rank_without_a_gpu_id_gets_a_clear_error(monkeypatch):
    from cryoformer_ext.config import JobConfig, JobConfigError
    from cryoformer_ext.job.launch import joined_group

    _fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(JobConfigError, match=r"'gpus' = '0,1' names 2 GPU\(s\), but this is local rank 2 of 4"):
        with joined_group(JobConfig(gpus="0,1")):
            pass


@pytest.mark.parametrize("has_device_id", [False, True])
def test_process_group_device_id_only_where_torch_has_it(monkeypatch, has_device_id):
    """torch 2.2 (pyproject's floor) may lack ``init_process_group(device_id=)``."""
    import torch.distributed as tdist

    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job.launch import joined_group

    bound = []
    _fake_gpus(monkeypatch, 2, set_device=lambda d: bound.append(torch.device(d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    got = {}

    def init_22(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None,
                group_name="", pg_options=None):
        got.update(backend=backend)

    def init_new(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None,
                 group_name="", pg_options=None, device_id=None):
        got.update(backend=backend, device_id=device_id)

    monkeypatch.setattr(tdist, "init_process_group", init_new if has_device_id else init_22)
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    with joined_group(JobConfig()) as device:
        assert device == torch.device("cuda", 1)
    assert bound == [torch.device("cuda", 1)]
    assert got == ({"backend": "nccl", "device_id": torch.device("cuda", 1)} if has_device_id else {"backend": "nccl"})


# ------------------------------------------------------------------- the CUDA memory budget
def test_cuda_budget_counts_the_allocator_cache_and_is_kept_until_invalidated(monkeypatch):
    """``cudaMemGetInfo`` counts PyTorch's cached blocks as used: after a step that cached 30 of 40 GiB the
    free memory alone would halve the budget. Budget = free + reserved - allocated, asked once."""
    from cryoformer import memory

    gib = 1 << 30
    state = {"free": 40 * gib, "reserved": 0, "allocated": 0}
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: asked.append(d) or (state["free"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["allocated"])
    gpu = torch.device("cuda", 0)
    memory.invalidate_budget()
    assert memory.activation_budget(gpu) == 20 * gib
    # the first step cached 30 GiB of which 2 GiB stay allocated (weights, optimiser state)
    state.update(free=10 * gib, reserved=30 * gib, allocated=2 * gib)
    assert memory.activation_budget(gpu) == 20 * gib and len(asked) == 1   # not re-read every step
    memory.invalidate_budget()                                                # the occupancy grid changed
    assert memory.activation_budget(gpu) == (10 + 30 - 2) * gib // 2
    assert len(asked) == 2
    memory.invalidate_budget()


def test_training_recomputes_the_budget_only_when_the_occupancy_grid_changes(monkeypatch, tmp_path):
    import cryoformer.train as tr

    calls = []
    real = tr.invalidate_budget
    monkeypatch.setattr(tr, "invalidate_budget", lambda: calls.append(1) or real())
    cfg = ModelConfig(**{**TINY, "occupancy_cells": 4})
    tcfg = TrainConfig(epochs=1, batch_size=2, log_interval_s=1e9, prefetch=0, occupancy_warmup=8,
                       occupancy_refresh=12)
    train(_data(40), cfg, tcfg, tmp_path, log=lambda m: None)
    assert len(calls) == 1 + 4  # at the start, and at 8, 16 (the gap doubles), 28 and 40 images


# ------------------------------------------------------------------- the latent in fp32
def test_latent_mean_logvar_and_kl_stay_fp32_under_bf16_autocast():
    """The noise must not be rounded to bf16 (8 mantissa bits) on its way into z, nor the KL term."""
    model = CryoFormer(ModelConfig(**{**TINY, "chunk_points": 1 << 30}))
    sim = _sim()
    args = (torch.as_tensor(sim.images[:4]), None, torch.as_tensor(sim.rot[:4]), torch.as_tensor(sim.shift_px[:4]))
    eps = torch.full((4, 2), 1.0 + 2.0 ** -12)  # 1 in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args, eps=eps)
        mu, logvar = model.encode(args[0] / model.cfg.data_scale, args[3], args[2])
    assert out["mu"].dtype == torch.float32 and mu.dtype == logvar.dtype == torch.float32
    assert out["kl"].dtype == torch.float32
    # the fp32 reference of the same formula, from the same fp32 mean and log-variance
    ref_kl = (-0.5 * (1 + logvar - mu * mu - logvar.exp()).sum(-1)).mean()
    assert torch.allclose(out["kl"], ref_kl, rtol=1e-6, atol=0)
    # the last encoder layer is fp32: mean and log-variance are not bf16-representable numbers
    assert not torch.equal(mu, mu.bfloat16().float())


# ------------------------------------------------------------------- tcnn probe
def _probing_tcnn(fail: str | None, no_dtype: bool = False):
    """A fake tinycudann whose Encoding records its calls; ``fail``: the first forward raises this
    (a build without the GPU's architecture); ``no_dtype``: bindings too old for ``dtype``."""
    calls = []

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, config, seed=1337, **kw):
            super().__init__()
            if no_dtype and "dtype" in kw:
                raise TypeError("__init__() got an unexpected keyword argument 'dtype'")
            calls.append(("init", config["n_levels"], kw.get("dtype")))
            self.params = torch.nn.Parameter(torch.zeros(16))

        def forward(self, x):
            calls.append(("forward", x.shape[0]))
            if fail:
                raise RuntimeError(fail)
            return torch.zeros(x.shape[0], 4)

    return types.SimpleNamespace(Encoding=Encoding), calls


@pytest.fixture
def tcnn_installed(monkeypatch):
    import cryoformer.hashgrid as hg

    def install(fake):
        monkeypatch.setitem(sys.modules, "tinycudann", fake)
        hg._tcnn_available.cache_clear()
        hg._TCNN_PROBES.clear()

    monkeypatch.setattr(torch.cuda, "device", lambda dev: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(hg, "_probe_points", lambda device: torch.rand(256, 3))  # no CUDA tensor here
    yield install
    hg._tcnn_available.cache_clear()
    hg._TCNN_PROBES.clear()


@pytest.mark.parametrize("fail, no_dtype, want", [
    ("CUDA error: no kernel image is available for execution on the device", False,
     "hash grid torch (fp32; tinycudann not used: its first forward failed: RuntimeError: CUDA error: no kernel image"),
    (None, True, "hash grid torch (fp32; tinycudann not used: its first forward failed: RuntimeError: these "
                 "tinycudann bindings take no dtype and would run the hash grid in fp16"),
    (None, False, "hash grid tinycudann (fp32)")])
def test_tcnn_is_chosen_only_when_a_tiny_forward_runs(tcnn_installed, fail, no_dtype, want):
    from cryoformer.hashgrid import HashGrid, tcnn_probe

    fake, calls = _probing_tcnn(fail, no_dtype)
    tcnn_installed(fake)
    grid = HashGrid(n_levels=2, log2_table_size=8)
    gpu = torch.device("cuda", 0)
    note = grid.backend_note(gpu)
    assert note.startswith(want), note
    assert (tcnn_probe(gpu) is None) == (want == "hash grid tinycudann (fp32)")
    assert calls.count(("forward", 256)) == (0 if no_dtype else 1)   # probed once per device, then kept
    if not no_dtype:
        assert calls[0] == ("init", 2, torch.float32)


def test_training_log_names_the_hash_grid_backend_and_precision(tcnn_installed, tmp_path):
    from cryoformer.hashgrid import HashGrid

    lines = []
    train(_data(8), ModelConfig(**TINY), TrainConfig(epochs=1, batch_size=8, prefetch=0, amp=False), tmp_path,
          log=lines.append)
    assert "fp32, hash grid torch (fp32), CPU kernels in torch (CRYOFORMER_NATIVE=0)" in lines[0]
    # a broken tcnn build on a GPU: the log says torch ran, and why
    fake, _ = _probing_tcnn("CUDA error: no kernel image is available")
    tcnn_installed(fake)
    assert "tinycudann not used: its first forward failed" in HashGrid().backend_note(torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="backend='tcnn' but tinycudann does not run"):
        HashGrid(backend="tcnn").backend_note(torch.device("cuda", 0))


# ------------------------------------------------------------------- fused Adam
def test_adam_is_fused_where_torch_has_the_kernel(monkeypatch):
    """CUDA always; a CPU when torch has the fused CPU kernel (2.4 and later), else one ``foreach`` pass
    over the tensors rather than a loop over them."""
    import cryoformer.train as tr

    assert tr.adam_options(torch.device("cuda", 1)) == {"fused": True}
    assert tr.adam_options(torch.device("cpu")) == {"fused": True}      # the torch these tests install
    assert tr.make_optimizer(CryoFormer(ModelConfig(**TINY)), TrainConfig()).defaults.get("fused")
    monkeypatch.setattr(tr, "_cpu_fused_adam", lambda: False)
    assert tr.adam_options(torch.device("cpu")) == {"foreach": True}
    assert tr.adam_options(torch.device("cuda", 0)) == {"fused": True}


# ------------------------------------------------------------------- Slurm without torchrun
def test_srun_tasks_without_torchrun_are_refused_with_the_launch_to_use():
    """``srun -n 4 cryoformer train``: four processes that are no group would each train the whole job into
    one folder; under torchrun (RANK set) or in a batch script's single process nothing is refused."""
    from cryoformer_ext.config import JobConfig, JobConfigError
    from cryoformer_ext.job.launch import job_plan

    srun = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2"}
    with pytest.raises(JobConfigError, match=r"Slurm task 2 of 4 \(srun -n 4\).*srun --ntasks-per-node=1 torchrun"):
        job_plan(JobConfig(), srun)
    assert job_plan(JobConfig(), {**srun, "RANK": "2", "WORLD_SIZE": "4"}).mode == "joined"
    # the batch script itself (an allocation of 4 tasks, no srun step) and a one-task srun step run as one job
    assert job_plan(JobConfig(), {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).mode == "single"
    assert job_plan(JobConfig(), {**srun, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}).mode == "single"


# ------------------------------------------------------------------- torch.compile of the hash grid
def test_compiled_hash_grid_is_used_on_cuda_and_falls_back_once_when_compiling_fails(monkeypatch):
    """The compiled level arithmetic replaces the eager one only for CUDA tensors (stood in for by patching
    ``is_cuda``); a compile failure is logged once and the encoding stays the eager one's."""
    import cryoformer.hashgrid as hg

    x = torch.rand(300, 3)
    grid = hg.HashGrid(n_levels=4, log2_table_size=8, base_resolution=4, backend="torch")
    eager = grid(x)
    calls, lines = [], []

    def fake_compile(fn, **kw):
        def compiled(xt, lv):
            calls.append(lv["level"])
            if broken:
                raise RuntimeError("inductor: no C++ compiler\nlong traceback")
            return fn(xt, lv)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    corners = CompiledFunction(hg._level_corners, "the hash grid")
    monkeypatch.setattr(hg, "level_corners", corners)
    broken = False
    corners.enable(lines.append)
    assert torch.equal(grid(x), eager) and calls == [0, 1, 2, 3]
    broken = True
    corners.disable()
    corners.enable(lines.append)
    calls.clear()
    assert torch.equal(grid(x), eager) and torch.equal(grid(x), eager)
    assert calls == [0]                         # tried once, then eager
    assert lines == ["torch.compile of the hash grid failed (RuntimeError: inductor: no C++ compiler); running it eagerly"]


def test_training_compiles_the_grid_and_the_ctf_only_on_cuda(monkeypatch, tmp_path):
    import cryoformer.train as tr

    asked = []
    for part in tr.COMPILED_PARTS:
        monkeypatch.setattr(part, "enable", lambda log=print, mode="default", p=part: asked.append((p.what, mode)))
        monkeypatch.setattr(part, "disable", lambda p=part: asked.append((p.what, "off")))
    lines = []
    train(_data(8), ModelConfig(**TINY), TrainConfig(epochs=1, batch_size=8, prefetch=0, compile=True), tmp_path,
          log=lines.append)
    assert asked == [("the hash grid", "off"), ("the CTF", "off")]
    assert not any("torch.compile" in m for m in lines)   # CPU: eager
    asked.clear()
    tr.use_compile(True, lines.append, "reduce-overhead")
    assert asked == [("the hash grid", "reduce-overhead"), ("the CTF", "reduce-overhead")]
    assert "replayed as CUDA graphs" in lines[-1]


def test_compiled_ctf_is_what_the_renderer_applies_on_cuda(monkeypatch):
    """``corrupt`` goes through the compiled CTF for CUDA tensors (stood in for by patching ``is_cuda``) with
    the mode asked for, and gives the eager images; a failing compiled CTF falls back to them."""
    import cryoformer.ctf as ctf_mod
    import cryoformer.render as render_mod
    from cryoformer.render import corrupt

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, 16, 16, generator=g)
    params = torch.tensor([[12000.0, 11000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0]]).repeat(3, 1)
    eager = corrupt(proj, 2.0, None, params)
    modes, calls = [], []

    def fake_compile(fn, *, dynamic, mode):
        modes.append(mode)

        def compiled(*a):
            calls.append(len(a))
            if broken:
                raise RuntimeError("cudagraphs: capture failed")
            return fn(*a)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    part = CompiledFunction(ctf_mod.compute_ctf, "the CTF")
    monkeypatch.setattr(render_mod, "ctf_values", part)
    broken, lines = False, []
    part.enable(lines.append, "reduce-overhead")
    assert torch.equal(corrupt(proj, 2.0, None, params), eager) and modes == ["reduce-overhead"] and calls == [3]
    part.enable(lines.append, "reduce-overhead")
    part.enable(lines.append, "default")             # another mode: compiled again, with it
    assert modes == ["reduce-overhead", "default"]
    part.disable()
    broken = True
    part.enable(lines.append)
    assert torch.equal(corrupt(proj, 2.0, None, params), eager)
    assert torch.equal(corrupt(proj, 2.0, None, params), eager) and calls == [3, 3]   # tried once, then eager
    assert lines == ["torch.compile of the CTF failed (RuntimeError: cudagraphs: capture failed); running it eagerly"]


def test_fused_adam_state_moves_to_the_unfused_optimiser_and_steps_alike():
    """A checkpoint of a GPU run (fused Adam) continues on a CPU (unfused) and the reverse: the same next
    step from the same state (the fused kernel on the CPU stands in for CUDA's)."""
    import copy

    p = torch.nn.Parameter(torch.randn(50))
    fused = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-15, fused=True)
    for _ in range(3):
        p.grad = torch.randn(50)
        fused.step()
    state = fused.state_dict()
    grad = torch.randn(50)
    after = []
    for options in ({}, {"foreach": True}, {"fused": True}):
        q = torch.nn.Parameter(p.detach().clone())
        opt = torch.optim.Adam([q], lr=1e-2, betas=(0.9, 0.99), eps=1e-15, **options)
        opt.load_state_dict(copy.deepcopy(state))
        q.grad = grad.clone()
        opt.step()
        after.append(q.detach())
    assert not torch.equal(after[0], p.detach())
    assert torch.allclose(after[0], after[1], rtol=0, atol=1e-7)
    assert torch.allclose(after[0], after[2], rtol=0, atol=1e-7)
