"""Training throughput of the default model: images/s, time per epoch and peak RSS at D=64 and D=128.

Runs on whatever device is present (CPU here; CUDA + bf16 autocast on a GPU machine). Each box size is
measured in a fresh subprocess so that peak RSS belongs to that size alone. ``--baseline REF`` measures
the code of that git ref too (a temporary worktree), one after the other in the same run, and writes
the ratio of the two throughputs, by wall time and by the process's CPU time (on a shared machine the
wall time includes waiting for a core; the load average is written with each row). Writes
``bench/results/train_<device>.json``.

A model that renders only its occupied cells measures its steady state: its occupancy grid is set from
the simulated molecule's five conformations with the training defaults (threshold, margin), which is what
training estimates once the field has learned the molecule (the first ``occupancy_warmup`` images of a
job render the whole sphere). The fraction of the sphere rendered is written with the numbers.

    python bench/bench_train.py                      # D=64 and D=128, default model
    python bench/bench_train.py --baseline e2296ed   # and the code of that commit, with the ratio
    python bench/bench_train.py --boxes 64 --images 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("cryoformer") is None:
    # a machine without the package installed: this tree's code. Never otherwise: a baseline's child finds
    # that commit's code through PYTHONPATH, and this tree anywhere on the path would shadow it (the old
    # commits' packages have no __init__.py, and a regular package wins over a namespace one)
    sys.path.append(str(Path(__file__).resolve().parents[1]))
import gitref  # noqa: E402
from profile_step import prepare_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(box: int, n_images: int, batch: int, threads: int | None, job_overrides: dict | None = None) -> dict:
    import torch

    from cryoformer.data import ArraySource, ParticleData
    from cryoformer.simulate import simulate
    from cryoformer.train import TrainConfig, estimate_data_scale, train
    from cryoformer_ext.config import JobConfig
    model_config_for, select_device = gitref.job_setting("model_config_for"), gitref.job_setting("select_device")

    if threads:
        torch.set_num_threads(threads)
    sim = simulate(n_images, box, pixel_size_A=4.0 * 32 / box, snr=1.0, seed=0)
    data = ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)
    # overrides apply only to parameters this code version has (the baseline's JobConfig is older)
    extra_job = {k: v for k, v in (job_overrides or {}).items() if k in JobConfig.model_fields}
    job = JobConfig(train_box=box, batch_size=batch, **extra_job)
    device = select_device(job)
    mcfg = model_config_for(data, job, estimate_data_scale(data, box))
    extra: dict = {}
    steps: list[float] = []
    cpu_steps: list[float] = []
    last = [time.perf_counter(), time.process_time()]

    def hook(epoch: int, step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        steps.append(now - last[0])
        cpu_steps.append(cpu - last[1])
        last[0], last[1] = now, cpu

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tcfg = TrainConfig(epochs=1, batch_size=batch, device=str(device), log_interval_s=1e9)
        if "occupancy_warmup" in TrainConfig.model_fields:  # steady state: the grid is set, not estimated
            tcfg = tcfg.model_copy(update={"occupancy_warmup": 10 ** 9})
            _set_initial_occupancy(Path(tmp), mcfg, tcfg, extra)
        train(data, mcfg, tcfg, Path(tmp), log=lambda m: None, step_hook=hook)
        wall = time.perf_counter() - t0
    # the first step includes warm-up; the last one the occupancy estimate that ends every job's first
    # epoch (later ones come every 10,000 images): neither is the steady state
    timed = steps[1:-1] if len(steps) > 2 else steps
    per_img = sum(timed) / (len(timed) * batch)
    # CPU seconds of this process (all its threads): on a machine shared with other jobs the wall time
    # includes waiting for a core, the CPU time much less so
    cpu_timed = cpu_steps[1:-1] if len(cpu_steps) > 2 else cpu_steps
    cpu_per_img = sum(cpu_timed) / (len(cpu_timed) * batch)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "box": box, "device": str(device), "threads": torch.get_num_threads(), "batch_size": batch,
        "images_timed": len(timed) * batch, "images_per_s": 1.0 / per_img,
        "images_per_cpu_s": 1.0 / cpu_per_img, "load_average_1min": os.getloadavg()[0],
        "time_per_epoch_100k_particles_h": 1e5 * per_img / 3600.0,
        "wall_s_including_setup": wall, "peak_rss_GB": rss_kb / 1024 ** 2,
        "sphere_points_per_image": int(0.5236 * box ** 3),
        "peak_gpu_mem_GB": torch.cuda.max_memory_allocated() / 1024 ** 3 if device.type == "cuda" else None,
        "job_overrides": extra_job, **_cpu_paths(device, tcfg),
        "model": {k: v for k, v in mcfg.model_dump().items() if k not in ("data_scale",)}, **extra,
        "code_path": str(Path(list(sys.modules["cryoformer"].__path__)[0]).resolve().parent),
    }


def _cpu_paths(device, tcfg) -> dict:
    """What the measured code ran on a CPU: the point head's product dtype and the C kernels (code
    without them: nothing)."""
    try:
        from cryoformer.device import head_product_dtype
        from cryoformer.native.build import note
    except ImportError:
        return {}
    return {"head_products": str(head_product_dtype(device, tcfg.amp)).replace("torch.", ""), "kernels": note()}


def _set_initial_occupancy(ckpt_dir: Path, mcfg, tcfg, extra: dict) -> None:
    """A checkpoint at epoch 0 whose model has the molecule's occupancy grid; training resumes from it."""
    import torch

    from cryoformer.model import CryoFormer
    from cryoformer.train import make_optimizer, save_checkpoint

    torch.manual_seed(tcfg.seed)
    model = CryoFormer(mcfg)
    extra.update(prepare_model(model))
    save_checkpoint(ckpt_dir / "last.pt", model, make_optimizer(model, tcfg), 0, [], tcfg)


def run_children(code_root: Path | None, a) -> list[dict]:
    rows = []
    for box in a.boxes:
        cmd = [sys.executable, __file__, "--child", str(box), "--batch", str(a.batch)]
        if a.images:
            cmd += ["--images", str(a.images)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if a.job != "{}":
            cmd += ["--job", a.job]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=gitref.env_for(code_root))
        if proc.returncode:
            raise SystemExit(f"box {box} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        expected = (code_root or gitref.REPO).resolve()
        if Path(r.pop("code_path")) != expected:  # a machine path: checked, not kept in the results
            raise SystemExit(f"box {box}: the child measured the code in another folder than {expected}")
        r["code"] = gitref.describe(code_root)
        print(f"[{r['code']}] D={box}: {r['images_per_s']:.2f} images/s ({r['images_per_cpu_s']:.2f} per CPU s), "
              f"{r['time_per_epoch_100k_particles_h']:.1f} h "
              f"per 100k-particle epoch, peak RSS {r['peak_rss_GB']:.2f} GB, sphere rendered "
              f"{r.get('occupancy_fraction_of_sphere') or 1.0:.0%} ({r['device']}, {r['threads']} threads)",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--images", type=int, default=None, help="images per measurement (default 64 at D=64, 24 at D=128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline", default=None, help="git ref whose code is measured too (e.g. e2296ed)")
    p.add_argument("--job", default="{}", help="job parameters over the defaults, as JSON (e.g. '{\"render\": "
                   "\"rotated\"}'); the baseline gets those its version has")
    p.add_argument("--out", default=None, help="results file stem in bench/results/ (default train_<device>)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        n = a.images or (64 if a.child <= 64 else 24)
        print(json.dumps(measure(a.child, n, a.batch, a.threads, json.loads(a.job))))
        return
    results: dict = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "cpu_count": os.cpu_count()}
    if a.baseline:
        with gitref.checkout(a.baseline) as tree:
            results["baseline"] = {"ref": a.baseline, "results": run_children(tree, a)}
    rows = run_children(None, a)
    results["results"] = rows
    if a.baseline:
        base = {r["box"]: r for r in results["baseline"]["results"]}
        results["speedup"] = {str(r["box"]): r["images_per_s"] / base[r["box"]]["images_per_s"]
                              for r in rows if r["box"] in base}
        results["speedup_cpu_time"] = {str(r["box"]): r["images_per_cpu_s"] / base[r["box"]]["images_per_cpu_s"]
                                       for r in rows if r["box"] in base}
        for box, ratio in results["speedup"].items():
            print(f"D={box}: {ratio:.1f}x the images/s of {a.baseline} "
                  f"({results['speedup_cpu_time'][box]:.1f}x per CPU second)")
    RESULTS.mkdir(exist_ok=True)
    dev = rows[0]["device"].split(":")[0] if rows else "cpu"
    out = RESULTS / f"{a.out or 'train_' + dev}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
