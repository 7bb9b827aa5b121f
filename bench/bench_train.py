"""Training throughput of the default model: images/s, time per epoch and peak RSS at D=64 and D=128.

Runs on whatever device is present (CPU here; CUDA + bf16 autocast on a GPU machine). Each box size is
measured in a fresh subprocess so that peak RSS belongs to that size alone. Writes
``bench/results/train_<device>.json``.

    python bench/bench_train.py                      # D=64 and D=128, default model
    python bench/bench_train.py --boxes 64 --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(box: int, n_images: int, batch: int, threads: int | None) -> dict:
    import numpy as np
    import torch

    from cryoformer.data import ArraySource, ParticleData
    from cryoformer.simulate import simulate
    from cryoformer.train import TrainConfig, estimate_data_scale, train
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job import model_config_for, select_device

    if threads:
        torch.set_num_threads(threads)
    sim = simulate(n_images, box, pixel_size_A=4.0 * 32 / box, snr=1.0, seed=0)
    data = ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)
    job = JobConfig(train_box=box, batch_size=batch)
    device = select_device(job)
    mcfg = model_config_for(data, job, estimate_data_scale(data, box))
    steps: list[float] = []
    last = [time.perf_counter()]

    def hook(epoch: int, step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(data, mcfg, TrainConfig(epochs=1, batch_size=batch, device=str(device), log_interval_s=1e9),
              Path(tmp), log=lambda m: None, step_hook=hook)
        wall = time.perf_counter() - t0
    timed = steps[1:] if len(steps) > 1 else steps  # the first step includes warm-up
    per_img = sum(timed) / (len(timed) * batch)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "box": box, "device": str(device), "threads": torch.get_num_threads(), "batch_size": batch,
        "images_timed": len(timed) * batch, "images_per_s": 1.0 / per_img,
        "time_per_epoch_100k_particles_h": 1e5 * per_img / 3600.0,
        "wall_s_including_setup": wall, "peak_rss_GB": rss_kb / 1024 ** 2,
        "sphere_points_per_image": int(0.5236 * box ** 3),
        "peak_gpu_mem_GB": torch.cuda.max_memory_allocated() / 1024 ** 3 if device.type == "cuda" else None,
        "model": {k: v for k, v in mcfg.model_dump().items() if k not in ("data_scale",)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--images", type=int, default=None, help="images per measurement (default 64 at D=64, 24 at D=128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        n = a.images or (64 if a.child <= 64 else 24)
        print(json.dumps(measure(a.child, n, a.batch, a.threads)))
        return
    rows = []
    for box in a.boxes:
        cmd = [sys.executable, __file__, "--child", str(box), "--batch", str(a.batch)]
        if a.images:
            cmd += ["--images", str(a.images)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"D={box}: {r['images_per_s']:.2f} images/s, {r['time_per_epoch_100k_particles_h']:.1f} h per "
              f"100k-particle epoch, peak RSS {r['peak_rss_GB']:.2f} GB ({r['device']}, {r['threads']} threads)",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    dev = rows[0]["device"].split(":")[0] if rows else "cpu"
    out = RESULTS / f"train_{dev}.json"
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_count": os.cpu_count(), "results": rows}
    out.write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
