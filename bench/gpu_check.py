"""Every GPU path end to end, in about 3 minutes on one GPU (a 330 s budget): writes one JSON results file.

Checks, in order (each records its numbers and its status: ``ok``, ``failed``, or ``skipped`` with why):

* ``hashgrid``: the tcnn and torch hash grids give the same encoding and table gradient (fp32); skipped
  when tinycudann does not run on this GPU (the reason is printed);
* ``train``: a 2-epoch training run of the job's default model: finite, and the loss falls between the
  first and the last steps rendered at the training box (the occupancy warm-up renders at half the box);
* ``kill_and_continue``: a run killed (SIGKILL) in epoch 2, then rerun in the same folder (RELION's
  Continue), ends with the model of the uninterrupted ``train`` run (exactly on the CPU; on a GPU within
  the spread of a second uninterrupted run);
* ``precision``: bf16 against fp32: the same weights' map evaluated under bf16 autocast and in fp32,
  and maps of a bf16-trained and an fp32-trained model (correlation >= 0.99), each against the truth;
* ``host_syncs``: with the occupancy grid on, the step loop waits for the GPU only every ``sync_every``
  steps and where the grid is estimated (``torch.cuda.set_sync_debug_mode``);
* ``throughput``: training images/s and peak GPU memory at box 64, 128 and 256 (default model, batch 8),
  timed after the first occupancy estimate, with the fraction of the sphere rendered; and box 64 with the
  hash grid through ``torch.compile``;
* ``ddp``: two GPUs through the job's launcher (NCCL) equal the one-GPU ``train`` run; skipped on one GPU.

Each check has a time limit (``LIMITS_GPU``) and all share the budget (``--budget-s``): a check that hangs
fails with "out of time" and the next one runs. Needs only torch, numpy, pydantic and this repository.

    python bench/gpu_check.py --out gpu_check.json   # on a GPU machine (default bench/results/gpu_check.json)
    python bench/gpu_check.py --cpu-dry-run          # here: the same code on the CPU at a tiny size

``--cpu-dry-run`` runs every check on the CPU with a tiny model, CUDA-only calls stubbed
(synchronize, memory statistics, sync debug mode) and the trainer's precision rule redirected to
CPU bf16 autocast (what a compute-capability >= 8 GPU selects), so the script is known to start and
to reach its end before a GPU is spent on it; its numbers say nothing about a GPU. The tcnn check
then compares the torch grid's generic (CUDA) code path with its CPU fast path instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import numpy as np
import torch
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# seconds each check may take on a GPU (the sum stays under the 330 s budget only if nothing hangs; the budget
# is enforced on top) and in a dry run
LIMITS_GPU = {"hashgrid": 30, "train": 70, "kill_and_continue": 120, "precision": 70, "ddp": 100,
              "host_syncs": 40, "throughput": 120}
LIMITS_DRY = {k: 300 for k in LIMITS_GPU}
NEEDS_TRAIN = {"kill_and_continue", "precision", "ddp"}
TINY_MODEL = dict(zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32, hash_levels=8, hash_log2_size=12)
MIN_CORR = 0.99


class Spec(BaseModel):
    """One training run, reproducible in another process from these numbers alone."""

    box: int
    n: int
    epochs: int = 2
    batch: int = 8
    tiny: bool = False
    seed: int = 0
    amp: bool = True
    deterministic: bool = True
    occupancy_warmup: int | None = None  # images before the first occupancy estimate (None: the default)
    compile: bool = False  # the hash grid's level arithmetic and the CTF through torch.compile (TrainConfig.compile)
    compile_mode: str = "default"  # "reduce-overhead": the compiled parts replayed as CUDA graphs


# ---------------------------------------------------------------------------------------- device
class Device:
    """The CUDA calls this script makes, stubbed on the CPU in a dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)

    def sync(self) -> None:
        if not self.dry_run:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if not self.dry_run:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return None if self.dry_run else torch.cuda.max_memory_allocated(self.device) / 1024 ** 3

    def count(self) -> int:
        return 2 if self.dry_run else torch.cuda.device_count()  # dry run: two gloo CPU ranks

    def sync_debug(self, mode: str) -> None:
        if not self.dry_run:
            torch.cuda.set_sync_debug_mode(mode)

    def describe(self) -> dict:
        from cryoformer.device import autocast_dtype
        from cryoformer.hashgrid import _tcnn_available

        info = {"dry_run": self.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version(), "tinycudann": _tcnn_available(),
                "autocast": str(autocast_dtype(self.device, True))}
        if not self.dry_run:
            info.update(name=torch.cuda.get_device_name(self.device), gpus=torch.cuda.device_count(),
                        capability=list(torch.cuda.get_device_capability(self.device)),
                        memory_GB=torch.cuda.get_device_properties(self.device).total_memory / 1024 ** 3)
        return info


def enable_dry_run() -> None:
    """Make the trainer pick bf16 autocast on the CPU, as it does on a GPU of capability >= 8."""
    import cryoformer.device as dev
    import cryoformer.train as tr

    def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
        return torch.bfloat16 if amp else None

    dev.autocast_dtype = tr.autocast_dtype = autocast_dtype
    tr.precision_note = lambda device, amp: ("bf16 autocast" if amp else "fp32") + " (CPU dry run)"


@contextlib.contextmanager
def deterministic(on: bool):
    """Deterministic kernels where torch has them (tcnn's and some scatter-adds stay atomic)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ------------------------------------------------------------------------------------------ runs
def make_data(spec: Spec):
    from cryoformer.data import ArraySource, ParticleData
    from cryoformer.simulate import simulate

    sim = simulate(spec.n, spec.box, pixel_size_A=4.0 * 32 / spec.box, snr=1.0, seed=spec.seed)
    return ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px), sim


def model_config(spec: Spec, data):
    from cryoformer.model import ModelConfig
    from cryoformer.train import estimate_data_scale
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job.configs import model_config_for, occupancy_cells_for  # without the job's writers

    scale = estimate_data_scale(data, spec.box, seed=spec.seed)
    if spec.tiny:  # a smaller model, with the job's default occupancy grid
        cells = occupancy_cells_for(spec.box, data.pixel_size_A, JobConfig())
        return ModelConfig(box=spec.box, pixel_size_A=data.pixel_size_A, data_scale=scale, occupancy_cells=cells,
                           **TINY_MODEL)
    return model_config_for(data, JobConfig(train_box=spec.box), scale)


@contextlib.contextmanager
def recording_losses(into: list):
    """Appends (rendered box, mse on the device) of every training step to ``into``: the losses of the
    occupancy warm-up (rendered at half the box) are on another scale than the full box's."""
    from cryoformer.model import CryoFormer

    real = CryoFormer.forward

    def forward(model, *a, **k):
        out = real(model, *a, **k)
        if model.training:
            into.append((k.get("box") or model.cfg.box, out["mse"].detach()))
        return out

    CryoFormer.forward = forward
    try:
        yield into
    finally:
        CryoFormer.forward = real


def run_training(spec: Spec, ckpt_dir: Path, device: torch.device, *,
                 step_hook: Callable[[int, int], None] | None = None, log=lambda m: None):
    from cryoformer.train import TrainConfig, train

    data, sim = make_data(spec)
    extra = {} if spec.occupancy_warmup is None else {"occupancy_warmup": spec.occupancy_warmup}
    tcfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch, seed=spec.seed, device=str(device), amp=spec.amp,
                       log_interval_s=1e9, compile=spec.compile, compile_mode=spec.compile_mode, **extra)
    with deterministic(spec.deterministic):
        model, history = train(data, model_config(spec, data), tcfg, ckpt_dir, log=log, step_hook=step_hook)
    return model, history, data, sim


def maps_at_particles(model, data, idx: np.ndarray) -> np.ndarray:
    """Maps at the model's own latents of particles ``idx`` (comparable across models)."""
    from cryoformer.infer import Reconstruction

    rec = Reconstruction(model)
    return rec.volumes(rec.encode(data, indices=idx, distributed=False) if rec.zdim else None)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation inside the inscribed sphere, where the field is trained."""
    from cryoformer.lattice import sphere_mask

    m = sphere_mask(a.shape[-1]).numpy()
    x, y = a[..., m].ravel().astype(np.float64), b[..., m].ravel().astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum() + 1e-300))


def per_map_corr(a: np.ndarray, b: np.ndarray) -> float:
    return min(corr(x, y) for x, y in zip(a, b))


def truth_corr(maps: np.ndarray, sim, idx: np.ndarray) -> float:
    from cryoformer.simulate import true_volume

    return float(np.mean([corr(m, true_volume(float(sim.conformation[i]), m.shape[-1])) for m, i in zip(maps, idx)]))


# ---------------------------------------------------------------------------------------- checks
def check_hashgrid(env: Device, spec: Spec) -> dict:
    import cryoformer.hashgrid as hg
    from cryoformer.model import resolve_hash_scale

    data, _ = make_data(spec.model_copy(update={"n": 8}))
    cfg = model_config(spec, data)
    kw = dict(n_levels=cfg.hash_levels, n_features=cfg.hash_features, log2_table_size=cfg.hash_log2_size,
              base_resolution=cfg.hash_base, per_level_scale=resolve_hash_scale(cfg))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1 << (12 if env.dry_run else 18), 3, generator=gen).to(env.device)
    up = torch.randn(x.shape[0], cfg.hash_levels * cfg.hash_features, generator=gen).to(env.device)
    ref = hg.HashGrid(**kw, backend="torch").to(env.device)
    with torch.no_grad():
        ref.params.normal_(0, 0.1, generator=torch.Generator(device=env.device).manual_seed(2))
    if env.dry_run:
        other, label = hg.HashGrid(**kw, backend="torch").to(env.device), "torch generic path (stand-in for tcnn)"
        fast = hg._cpu_fast_paths
    elif hg.tcnn_probe(env.device) is None:
        other, label, fast = hg.HashGrid(**kw, backend="tcnn").to(env.device), "tcnn", None
    else:
        return {"ok": None, "skipped": f"the torch grid runs on this GPU: tinycudann {hg.tcnn_probe(env.device)}"}
    other.load_state_dict(ref.state_dict())

    def run(grid, generic: bool = False):
        if generic:
            hg._cpu_fast_paths = lambda _x: False
        try:
            grid.params.grad = None
            t0 = time.perf_counter()
            out = grid(x)
            (out * up).sum().backward()
            env.sync()
            dt = time.perf_counter() - t0
            with torch.no_grad():
                inf = grid(x)
            return out.detach(), inf, grid.params.grad.detach().clone(), dt
        finally:
            if generic:
                hg._cpu_fast_paths = fast

    run(ref), run(other, env.dry_run)  # warm-up (tcnn builds its module on first use)
    o1, i1, g1, t1 = run(ref)
    o2, i2, g2, t2 = run(other, env.dry_run)
    d_out = float((o1 - o2).abs().max() / o1.abs().max())
    d_grad = float((g1 - g2).abs().max() / g1.abs().max())
    d_inf = float((i2 - o2).abs().max() / o2.abs().max())
    return {"ok": d_out <= 1e-4 and d_grad <= 1e-4 and d_inf <= 1e-6, "compared": f"torch vs {label}",
            "points": x.shape[0], "max_rel_diff_encoding": d_out, "max_rel_diff_table_grad": d_grad,
            "max_rel_diff_no_grad_vs_grad_forward": d_inf, "fwd_bwd_s_torch": t1, "fwd_bwd_s_other": t2,
            "criterion": "torch vs other <= 1e-4 relative; no_grad vs training forward <= 1e-6"}


def check_train(env: Device, spec: Spec, out: Path, keep: dict) -> dict:
    """Finite losses that fall, compared at one box: the mean loss of the first and the last steps (a
    tenth of them, at least 2) among those rendered at the training box (the occupancy warm-up renders
    at half the box, whose loss is on another scale)."""
    env.reset_peak()
    t0 = time.perf_counter()
    logs: list[str] = []
    steps: list = []
    with recording_losses(steps):
        model, hist, data, sim = run_training(spec, out / "uninterrupted", env.device, log=logs.append)
    env.sync()
    wall = time.perf_counter() - t0
    keep.update(model=model, history=hist, data=data, sim=sim)
    full = [float(v) for b, v in steps if b == spec.box]
    w = max(2, len(full) // 10)
    first, last = (float(np.mean(full[:w])), float(np.mean(full[-w:]))) if len(full) >= 2 * w else (math.nan,) * 2
    finite = all(math.isfinite(h) for h in hist) and all(math.isfinite(v) for v in full)
    return {"ok": finite and last < first, "loss_first_steps_at_box": first, "loss_last_steps_at_box": last,
            "steps_compared": w, "steps_at_full_box": len(full), "steps_at_half_box": len(steps) - len(full),
            "loss_history": hist, "wall_s": wall, "images_per_s_incl_setup": spec.epochs * spec.n / wall,
            "peak_gpu_GB": env.peak_gb(), "log": [m for m in logs if "training" in m][:1],
            "occupancy_log": [m for m in logs if "occupancy" in m], "spec": spec.model_dump()}


def _worker_cmd(spec: Spec, ckpt: Path, dry_run: bool, kill: tuple[int, int] | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec.model_dump_json(), "--ckpt", str(ckpt)]
    if kill:
        cmd += ["--kill-at", f"{kill[0]},{kill[1]}"]
    return cmd + (["--cpu-dry-run"] if dry_run else [])


def _compare_runs(ckpt: Path, ref_ckpt: Path, device, keep: dict, n: int) -> dict:
    """How far a run's final checkpoint is from the in-process ``train`` run's."""
    from cryoformer.model import CryoFormer, ModelConfig
    from cryoformer.train import load_checkpoint

    run, ref = load_checkpoint(ckpt / "last.pt"), load_checkpoint(ref_ckpt / "last.pt")
    weights = [k for k, v in ref["model"].items() if v.is_floating_point()]
    grids = [k for k in ref["model"] if k.endswith("occupancy.occupied")]
    model = CryoFormer(ModelConfig.from_checkpoint(run["model_config"])).to(device)
    model.load_state_dict(run["model"])
    idx = np.arange(min(4, n))
    # the last epoch only: the first one mixes the half-box warm-up with a few full-box steps, so its mean
    # swings with where the chaotic GPU trajectories put those few steps
    return {"loss_history_max_rel_diff": float(np.max(np.abs(np.subtract(run["loss_history"], ref["loss_history"]))
                                                      / np.abs(ref["loss_history"]))),
            "last_epoch_loss_rel_diff": float(abs(run["loss_history"][-1] - ref["loss_history"][-1])
                                              / abs(ref["loss_history"][-1])),
            "max_abs_param_diff": max(float((run["model"][k].float() - ref["model"][k].float()).abs().max())
                                      for k in weights),
            "occupancy_cells_differing": sum(int((run["model"][k] != ref["model"][k]).sum()) for k in grids),
            "min_map_corr": per_map_corr(maps_at_particles(model, keep["data"], idx),
                                         maps_at_particles(keep["model"], keep["data"], idx))}


def check_kill_and_continue(env: Device, spec: Spec, out: Path, keep: dict) -> dict:
    """A run killed in epoch 2 and continued ends where the uninterrupted run does. On the CPU exactly; on a
    GPU the arithmetic does not repeat (atomic scatter-adds, non-deterministic attention kernels, and an
    occupancy grid estimated from that field), so the continued run is held to the spread of a second
    uninterrupted run in a process of its own: the last epoch's loss within 3x its difference (+ 5e-3), maps
    as alike as theirs."""
    from cryoformer.train import load_checkpoint

    ckpt = out / "killed"
    kill = (1, min(2, math.ceil(spec.n / spec.batch) - 1))  # epoch 2, third step
    first = subprocess.run(_worker_cmd(spec, ckpt, env.dry_run, kill), capture_output=True, text=True,
                           timeout=_time_left())
    if first.returncode != -signal.SIGKILL:
        return {"ok": False, "error": f"the run to kill ended with {first.returncode}: {first.stderr[-2000:]}"}
    epoch_kept = int(load_checkpoint(ckpt / "last.pt")["epoch"])
    second = subprocess.run(_worker_cmd(spec, ckpt, env.dry_run, None), capture_output=True, text=True,
                            timeout=_time_left())
    if second.returncode != 0:
        return {"ok": False, "error": f"Continue failed ({second.returncode}): {second.stderr[-2000:]}"}
    resumed = _compare_runs(ckpt, out / "uninterrupted", env.device, keep, spec.n)
    r = {"checkpoint_epoch_after_kill": epoch_kept, "resumed_log": "resumed" in second.stdout, **resumed}
    if env.dry_run:
        ok = resumed["loss_history_max_rel_diff"] <= 1e-5 and resumed["min_map_corr"] >= 0.999
        r["criterion"] = "CPU: loss histories within 1e-5 (relative), maps correlate >= 0.999"
    else:
        again = subprocess.run(_worker_cmd(spec, out / "again", False, None), capture_output=True, text=True,
                               timeout=_time_left())
        if again.returncode != 0:
            return {"ok": False, "error": f"the second uninterrupted run failed: {again.stderr[-2000:]}", **r}
        floor = _compare_runs(out / "again", out / "uninterrupted", env.device, keep, spec.n)
        r["uninterrupted_twice"] = floor
        tol = 3 * floor["last_epoch_loss_rel_diff"] + 5e-3
        ok = resumed["last_epoch_loss_rel_diff"] <= tol and resumed["min_map_corr"] >= min(
            0.99, floor["min_map_corr"] - 2e-3)
        r["criterion"] = (f"last epoch's loss within {tol:.4f} (3x two uninterrupted runs' + 5e-3), maps as alike "
                          "as two uninterrupted runs' (-0.002) or >= 0.99")
    r["ok"] = ok and epoch_kept == 1 and r["resumed_log"]
    return r


def check_precision(env: Device, spec: Spec, out: Path, keep: dict) -> dict:
    from cryoformer.train import autocast_dtype  # the trainer's rule (redirected in a dry run)

    dtype = autocast_dtype(env.device, True)
    if dtype is None:
        return {"ok": None, "skipped": "this GPU trains in fp32 only (compute capability < 8.0)"}
    model, data, sim = keep["model"], keep["data"], keep["sim"]
    idx = np.arange(min(4, spec.n))
    from cryoformer.infer import Reconstruction

    # the same weights, the same map (at a particle's latent: a heterogeneous model never trains without
    # one, so its latent-free map is out of distribution), evaluated in bf16 and in fp32
    rec = Reconstruction(model)
    z0 = None
    if rec.zdim:
        z0 = torch.as_tensor(rec.encode(data, indices=idx[:1], distributed=False)[0], device=env.device)
    with torch.no_grad():
        fp32 = model.volume(z0)
        with torch.autocast(env.device.type, dtype=dtype):
            low = model.volume(z0)
    fwd = corr(fp32.float().cpu().numpy(), low.float().cpu().numpy())
    fmodel, fhist, _, _ = run_training(spec.model_copy(update={"amp": False, "deterministic": False}),
                                       out / "fp32", env.device)
    maps_bf16 = maps_at_particles(model, data, idx)
    maps_fp32 = maps_at_particles(fmodel, data, idx)
    trained = per_map_corr(maps_bf16, maps_fp32)
    # the dry run's 2-epoch box-16 model has maps of little contrast, where bf16 rounding weighs far more
    # than in a trained model; it proves the check runs, the GPU run holds the 0.99
    need = 0.8 if env.dry_run else MIN_CORR
    return {"ok": fwd >= need and trained >= need, "dtype": str(dtype), "forward_map_corr": fwd,
            "trained_min_map_corr": trained, "bf16_map_vs_truth": truth_corr(maps_bf16, sim, idx),
            "fp32_map_vs_truth": truth_corr(maps_fp32, sim, idx), "loss_history_bf16": keep["history"],
            "loss_history_fp32": fhist,
            "criterion": f"map correlations >= {need}: the same weights evaluated in bf16 and fp32, "
                         "and bf16-trained vs fp32-trained (at each model's latents of the same particles)"}


def check_host_syncs(env: Device, spec: Spec, out: Path) -> dict:
    """The step loop with the job's defaults (occupancy grid on) waits for the GPU only every
    ``sync_every`` steps, and where the occupancy grid is estimated (that step and the next, which builds
    the new lattices); ``torch.cuda.set_sync_debug_mode`` reports every wait, pageable copies included."""
    from cryoformer.train import TrainConfig, occupancy_due

    k = TrainConfig().sync_every
    batch = 2 if env.dry_run else spec.batch
    n = batch * (3 * k + 2)
    s = spec.model_copy(update={"epochs": 1, "n": n, "batch": batch, "deterministic": False,
                                "occupancy_warmup": batch * (k + 2)})
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        env.sync_debug("warn")
        try:
            run_training(s, out / "syncs", env.device, step_hook=lambda e, st: marks.append(len(seen)))
        finally:
            env.sync_debug("default")
    syncs = [w for w in seen if "synchronizing" in str(w.message)]
    marks_syncs = [sum(1 for w in seen[:m] if "synchronizing" in str(w.message)) for m in marks]
    per_bucket = np.diff([0] + marks_syncs).tolist()  # bucket i: after the hook of step i-1 up to that of step i
    steps = len(marks)
    tcfg = TrainConfig(occupancy_warmup=s.occupancy_warmup)
    estimated = [st for st in range(steps) if occupancy_due(tcfg, n, st * batch, min((st + 1) * batch, n))]
    allowed = {0} | {st + 1 for st in range(steps) if (st + 1) % k == 0 or st in (0, steps - 1)}
    allowed |= {b for st in estimated for b in (st, st + 1)}
    unexpected = [i for i, c in enumerate(per_bucket) if c and i not in allowed]
    return {"ok": not unexpected, "measured": not env.dry_run, "sync_every": k, "steps": steps,
            "occupancy_estimated_at_steps": estimated,
            "total_syncs": len(syncs), "syncs_per_step": per_bucket, "steps_with_unexpected_syncs": unexpected,
            "first_sites": sorted({str(w.message)[:160] + f" @ {Path(w.filename).name}:{w.lineno}" for w in syncs})[:5]}


def _throughput_row(env: Device, box: int, tiny: bool, n_steps: int, warmup: int, out: Path,
                    compiled: str | None = None) -> dict:
    """images/s of the steps after the first occupancy estimate (and two more steps, which build the new
    lattices and warm the kernels up): before it, the whole sphere is rendered at half the box."""
    batch = 8
    spec = Spec(box=box, n=warmup + batch * (n_steps + 3), epochs=1, tiny=tiny, deterministic=False,
                occupancy_warmup=warmup, compile=compiled is not None, compile_mode=compiled or "default")
    marks: dict[str, Any] = {}
    logs: list[str] = []

    def log(msg: str) -> None:
        logs.append(msg)
        if "occupancy grid estimated" in msg and "estimated_step" not in marks:
            marks["estimated_step"] = marks.get("step", -1) + 1

    def hook(epoch: int, step: int) -> None:
        marks["step"] = step
        if "estimated_step" in marks and step == marks["estimated_step"] + 2:
            env.sync()
            env.reset_peak()
            marks["t"], marks["from"] = time.perf_counter(), step

    run_training(spec, out / f"speed{box}{'_' + compiled if compiled else ''}", env.device, step_hook=hook, log=log)
    env.sync()
    if "t" not in marks:
        raise RuntimeError(f"box {box}: no occupancy estimate within the run; log: {logs[-3:]}")
    dt = time.perf_counter() - marks["t"]
    imgs = spec.n - (marks["from"] + 1) * batch
    frac = [m.split(": ", 1)[1].split(" ")[0] for m in logs if "occupancy grid estimated" in m]
    return {"box": box, "compiled": compiled, "batch": batch, "images_timed": imgs, "images_per_s": imgs / dt,
            "compile_log": [m for m in logs if "compile" in m],
            "sphere_fraction_rendered": frac[0] if frac else None, "peak_gpu_GB_after_estimate": env.peak_gb()}


def check_throughput(env: Device, boxes: list[int], tiny: bool, n_steps: int, out: Path) -> dict:
    rows = []
    warmup = 16 if tiny else 64
    for box in boxes:
        try:
            rows.append(_throughput_row(env, box, tiny, n_steps if box <= 128 else max(2, n_steps // 2), warmup, out))
        except CheckTimeout:
            rows.append({"box": box, "error": "out of time"})
            break
        print(f"  throughput box {box}: {rows[-1]}", flush=True)
    extra: dict[str, Any] = {"compiled_box_64": None, "compiled_cuda_graphs_box_64": None}
    if not tiny and rows and "images_per_s" in rows[-1]:  # what the opt-in torch.compile modes give
        for key, mode in (("compiled_box_64", "default"), ("compiled_cuda_graphs_box_64", "reduce-overhead")):
            try:
                extra[key] = _throughput_row(env, 64, tiny, n_steps, warmup, out, compiled=mode)
            except CheckTimeout:
                extra[key] = {"error": "out of time"}
                break
            print(f"  throughput box 64, compiled ({mode}): {extra[key]}", flush=True)
    done = [r for r in rows if "images_per_s" in r]
    return {"ok": len(done) == len(boxes) and all(r["images_per_s"] > 0 for r in done), "rows": rows, **extra,
            "note": "timed after the first occupancy estimate (the grid of a barely trained field: its rendered "
                    "fraction is printed), batch 8, the job's default model"}


def ddp_worker(spec_json: str, ckpt: str, dry_run: bool, *, device, log, should_abort):
    """One rank of the two-GPU run (module level: spawned workers import it)."""
    if dry_run:
        enable_dry_run()
    spec = Spec.model_validate_json(spec_json)
    model, hist, data, _ = run_training(spec, Path(ckpt), device, log=log)
    import torch.distributed as tdist

    from cryoformer.infer import Reconstruction

    lat = Reconstruction(model).encode(data, indices=np.arange(min(4, spec.n)))  # sharded over the ranks
    if tdist.get_rank() != 0:
        return None
    return {"history": hist, "maps": Reconstruction(model).volumes(lat)}


def check_ddp(env: Device, spec: Spec, out: Path, keep: dict) -> dict:
    from cryoformer_ext.job.launch import Plan, physical_gpus, spawn

    if env.count() < 2:
        return {"ok": None, "skipped": f"{env.count()} GPU visible: data-parallel training needs two"}
    plan = Plan("spawn", 2, [] if env.dry_run else physical_gpus([0, 1]))
    logs: list[str] = []
    t0 = time.perf_counter()
    res = spawn(ddp_worker, (spec.model_dump_json(), str(out / "ddp"), env.dry_run), plan, threads=1 if env.dry_run
                else max(1, (os.cpu_count() or 2) // 2), log=logs.append)
    wall = time.perf_counter() - t0
    idx = np.arange(min(4, spec.n))
    c = per_map_corr(res["maps"], maps_at_particles(keep["model"], keep["data"], idx))
    rel = float(np.max(np.abs(np.subtract(res["history"], keep["history"])) / np.abs(keep["history"])))
    return {"ok": rel <= 1e-2 and c >= MIN_CORR, "backend": plan.backend, "wall_s": wall,
            "loss_history_max_rel_diff_vs_one_gpu": rel, "min_map_corr_vs_one_gpu": c,
            "log": [m for m in logs if "ranks" in m][:2],
            "criterion": f"loss histories within 1e-2 (relative), maps correlate >= {MIN_CORR}"}


# ------------------------------------------------------------------------------------------ main
class CheckTimeout(Exception):
    """A check ran past its time limit (raised in the main thread by SIGALRM)."""


_DEADLINE = [math.inf]  # perf_counter time at which the running check must end


def _time_left() -> float:
    return max(1.0, _DEADLINE[0] - time.perf_counter())


def _on_alarm(signum, frame) -> None:
    raise CheckTimeout("ran past its time limit")


def _status(r: dict) -> str:
    return "skipped" if "skipped" in r else ("ok" if r["ok"] else "failed")


def _run_check(name: str, fn: Callable[[], dict], results: dict, limit_s: float, budget_end: float) -> None:
    """Runs one check within ``limit_s`` seconds (and the run's overall budget): a check that hangs or is
    slow fails with "out of time" and the next one starts."""
    t0 = time.perf_counter()
    limit = min(limit_s, budget_end - t0)
    if limit < 1:
        r = {"ok": False, "error": "out of time: the run's budget was spent before this check"}
    else:
        _DEADLINE[0] = t0 + limit
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            r = fn()
        except (CheckTimeout, subprocess.TimeoutExpired):
            r = {"ok": False, "error": f"out of time: stopped after {limit:.0f} s"}
        except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
            r = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            _DEADLINE[0] = math.inf
    r["seconds"] = round(time.perf_counter() - t0, 2)
    r["status"] = _status(r)
    results["checks"][name] = r
    print(f"{name:<18} {r['status']:<8} {r['seconds']:7.1f} s  {r.get('skipped') or r.get('error') or ''}", flush=True)


def worker_main(spec_json: str, ckpt: Path, kill_at: str | None, dry_run: bool) -> int:
    """A training run in its own process: the kill-and-continue check kills it, then reruns it."""
    spec = Spec.model_validate_json(spec_json)
    device = Device(dry_run).device
    target = tuple(int(v) for v in kill_at.split(",")) if kill_at else None

    def hook(epoch: int, step: int) -> None:
        if (epoch, step) == target:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(spec, ckpt, device, step_hook=hook, log=print)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="run everything on the CPU at a tiny size")
    p.add_argument("--out", type=Path, default=None, help="results file (default bench/results/gpu_check*.json)")
    p.add_argument("--box", type=int, default=None, help="box of the train / continue / precision / DDP checks")
    p.add_argument("--n", type=int, default=None, help="particles of those checks")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget of all checks (default 330 s on a "
                   "GPU: the whole script, start-up included, within 6 minutes; none in a dry run)")
    p.add_argument("--boxes", type=int, nargs="+", default=None, help="throughput boxes (default 64 128 256)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--kill-at", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if dry:
        enable_dry_run()
        torch.set_num_threads(1)
    if args.worker:
        return worker_main(args.worker, args.ckpt, args.kill_at, dry)
    if not dry and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu-dry-run to check that the script works")
    from cryoformer.device import bind

    env = Device(dry)
    bind(env.device)
    # the dry run estimates its occupancy grid after 8 images, so that both epochs train at the full box
    spec = Spec(box=args.box or (16 if dry else 64), n=args.n or (32 if dry else 1024), tiny=dry,
                occupancy_warmup=8 if dry else None)
    results: dict[str, Any] = {"command": " ".join(["python", "bench/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "environment": env.describe(),
                               "spec": spec.model_dump(), "checks": {}}
    keep: dict[str, Any] = {}
    t0 = time.perf_counter()
    end = t0 + (args.budget_s or (math.inf if dry else 330.0))
    limits = LIMITS_DRY if dry else LIMITS_GPU
    boxes = args.boxes or ([16, 24] if dry else [64, 128, 256])
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = Path(tmp)
        checks: list[tuple[str, Callable[[], dict]]] = [
            ("hashgrid", lambda: check_hashgrid(env, spec)),
            ("train", lambda: check_train(env, spec, out, keep)),
            ("kill_and_continue", lambda: check_kill_and_continue(env, spec, out, keep)),
            ("precision", lambda: check_precision(env, spec, out, keep)),
            ("ddp", lambda: check_ddp(env, spec, out, keep)),
            ("host_syncs", lambda: check_host_syncs(env, spec, out)),
            ("throughput", lambda: check_throughput(env, boxes, dry, 2 if dry else 25, out))]
        for name, fn in checks:
            if name in NEEDS_TRAIN and not keep:
                results["checks"][name] = {"ok": False, "status": "failed", "error": "the train check did not finish"}
                continue
            _run_check(name, fn, results, limits[name], end)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    counts = {k: sum(1 for c in results["checks"].values() if c["status"] == k) for k in ("ok", "skipped", "failed")}
    results["summary"] = counts
    results["ok"] = counts["failed"] == 0 and len(results["checks"]) == 7
    path = args.out or RESULTS / ("gpu_check_cpu_dry_run.json" if dry else "gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp_path, path)
    print(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed in {results['total_s']} s "
          f"({'no failure' if results['ok'] else 'SOME CHECKS FAILED'}); wrote {path}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
