"""Streaming at scale: time to the first training step and peak RSS on a 1,000,000-particle STAR + MRCS.

1. Generates the dataset on disk without holding it in memory (default: 1M particles, box 16, under
   /tmp): ``--base`` real particles are simulated with :func:`cryoformer.simulate.simulate` (poses,
   CTF, analytic projections), and every chunk of the memory-mapped MRCS stack repeats them with fresh
   noise at ``--snr``. The RELION 3.1 STAR (optics + particles, poses and CTF per row, the same
   columns as :func:`cryoformer_ext.formats.star.write_simulated_star`) is written as text in chunks.
   The cost of ``write_simulated_star`` itself is measured in a child process on ``--writer-rows``
   rows (it formats the whole table in memory).
2. In a fresh child process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) runs the user path of
   ``cryoformer train``: ``read_particles_star`` then ``cryoformer_ext.job.run.run_job`` (epochs 1); the child
   notes the time of each phase and of the first completed training step (the trainer's first
   "epoch 1/1 step 1/..." progress line, logged right after step 1), trains for ``--train-s`` seconds and
   aborts through ``should_abort``. The parent polls ``/proc/<pid>/status`` VmHWM; the child reports
   ``ru_maxrss`` and VmRSS after each phase.
3. ``--breakdown`` adds a child that times and sizes each step of ``read_particles_star`` separately
   (file text, block line scan, ``starfile.read``, numeric columns, image-name parsing, stack check).

Writes ``bench/results/streaming.json``; deletes the generated files unless ``--keep``.

    OMP_NUM_THREADS=1 python bench/bench_streaming.py                 # 1M particles, box 16
    OMP_NUM_THREADS=1 python bench/bench_streaming.py --n 100000 --breakdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
STAR_NAME, STACK_NAME = "particles.star", "particles.mrcs"


def _proc_status_kb(pid: int | str = "self") -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM", "VmRSS")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _mem_gb() -> dict[str, float]:
    st = _proc_status_kb()
    return {"rss_GB": st.get("VmRSS", 0) / 1024 ** 2, "hwm_GB": st.get("VmHWM", 0) / 1024 ** 2}


# ---------------------------------------------------------------------------------------------------
# dataset generation


def _star_header(pixel: float, box: int, kv: float, cs: float, amp: float) -> str:
    optics = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
              "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    parts = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
             "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
             "rlnCtfScalefactor", "rlnOpticsGroup", "rlnRandomSubset", "rlnCryoformerTrueConformation"]
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(optics, 1)]
    lines += [f"opticsGroup1 1 {kv:.10g} {cs:.10g} {amp:.10g} {pixel:.10g} {box} 2", "", "",
              "# version 30001", "", "data_particles", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(parts, 1)]
    return "\n".join(lines) + "\n"


def generate(out: Path, n: int, box: int, base_n: int, chunk: int, snr: float, seed: int) -> dict:
    """Write ``out/particles.mrcs`` (memory-mapped, chunk by chunk) and ``out/particles.star``."""
    import mrcfile
    import numpy as np

    from cryoformer.poses import rot_to_relion_euler
    from cryoformer.simulate import simulate

    out.mkdir(parents=True, exist_ok=True)
    pixel = 4.0 * 32 / box
    t0 = time.perf_counter()
    base = simulate(base_n, box, pixel_size_A=pixel, snr=0.0, seed=seed)  # clean images + poses + CTF
    sigma = float(np.sqrt(base.clean.var() / snr))
    t_sim = time.perf_counter() - t0

    t1 = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    with mrcfile.new_mmap(out / STACK_NAME, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = pixel
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            src = np.arange(s, e) % base_n
            mrc.data[s:e] = base.clean[src] + rng.normal(0.0, sigma, (e - s, box, box)).astype(np.float32)
        mrc.flush()
    t_stack = time.perf_counter() - t1

    t2 = time.perf_counter()
    er, et, ep = rot_to_relion_euler(base.rot)
    c = base.ctf
    num = np.stack([er, et, ep, base.shift_px[:, 0] * pixel, base.shift_px[:, 1] * pixel,
                    c.defocus_u_A, c.defocus_v_A, c.defocus_angle_deg, c.phase_shift_deg, c.bfactor, c.scale],
                   axis=1)
    num_txt = [" ".join(f"{v:.10g}" for v in row) for row in num]  # formatted once per base particle
    conf_txt = [f"{t:.10g}" for t in base.conformation]
    with open(out / STAR_NAME, "w") as fh:
        fh.write(_star_header(pixel, box, float(c.voltage_kv[0]), float(c.cs_mm[0]), float(c.amp_contrast[0])))
        for s in range(0, n, chunk):
            rows = []
            for k in range(s, min(n, s + chunk)):
                b = k % base_n
                rows.append(f"{k + 1:06d}@{STACK_NAME} {num_txt[b]} 1 {k % 2 + 1} {conf_txt[b]}")
            fh.write("\n".join(rows) + "\n")
        fh.write("\n")
    t_star = time.perf_counter() - t2
    return {
        "n_particles": n, "box": box, "pixel_size_A": pixel, "base_particles_simulated": base_n, "snr": snr,
        "noise_sigma": sigma, "chunk": chunk, "simulate_s": t_sim, "write_stack_s": t_stack,
        "write_star_chunked_s": t_star,
        "stack_bytes": (out / STACK_NAME).stat().st_size, "star_bytes": (out / STAR_NAME).stat().st_size,
        "generator_peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
    }


# ---------------------------------------------------------------------------------------------------
# children


def child_writer(out: Path, rows: int, box: int) -> dict:
    """Cost of ``write_simulated_star`` on ``rows`` particles (poses + CTF + one extra column)."""
    import numpy as np

    from cryoformer.data import CTFParams
    from cryoformer.poses import random_rotations
    from cryoformer_ext.formats.star import write_simulated_star

    rng = np.random.default_rng(0)
    rot = random_rotations(rows, rng)
    du = rng.uniform(1e4, 2.5e4, rows)
    ctf = CTFParams.constant(rows, defocus_u_A=du, defocus_v_A=du - 100, defocus_angle_deg=rng.uniform(0, 180, rows))
    before = _mem_gb()
    t0 = time.perf_counter()
    path = write_simulated_star(out / "writer_test.star", rot=rot, shift_px=rng.uniform(-2, 2, (rows, 2)), ctf=ctf,
                                pixel_size_A=8.0, box=box, stack_path=STACK_NAME,
                                extra_columns={"rlnCryoformerTrueConformation": rng.uniform(0, 1, rows)})
    dt = time.perf_counter() - t0
    after = _mem_gb()
    size = path.stat().st_size
    path.unlink()
    return {"rows": rows, "seconds": dt, "rss_before_GB": before["rss_GB"], "peak_rss_GB": after["hwm_GB"],
            "peak_increase_GB": after["hwm_GB"] - before["rss_GB"], "star_bytes": size}


def child_train(out: Path, train_s: float, t_launch: float) -> dict:
    """The ``cryoformer train`` path: read the STAR, run_job(epochs=1), abort after ``train_s`` seconds."""
    t_proc = time.time()
    phases: dict[str, float] = {"python_started": t_proc - t_launch}
    mem: dict[str, dict] = {}
    import torch

    torch.set_num_threads(1)
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job.run import JobAborted, run_job
    from cryoformer_ext.formats.star import read_particles_star

    phases["imports_done"] = time.time() - t_launch
    mem["after_imports"] = _mem_gb()
    star = read_particles_star(out / STAR_NAME, out)
    phases["star_read"] = time.time() - t_launch
    mem["after_star_read"] = _mem_gb()
    star_df_bytes = int(star.particles.memory_usage(deep=True).sum())
    n = len(star.data)
    del star.particles  # not needed for training (the train command keeps it to write particles.star at the end)
    cfg = JobConfig(epochs=1, threads=1)
    first_step: list[float] = []
    steps = [0]
    lines: list[str] = []

    def log(msg: str) -> None:
        now = time.time() - t_launch
        lines.append(f"{now:8.2f}s {msg}")
        if msg.startswith("training "):
            phases["trainer_started"] = now
            mem["trainer_started"] = _mem_gb()
        if msg.startswith("epoch 1/") and " step " in msg and not first_step:
            first_step.append(now)
            mem["after_first_step"] = _mem_gb()

    def should_abort() -> bool:
        steps[0] += 1
        return bool(first_step) and time.time() - t_launch > first_step[0] + train_s

    try:
        run_job(star.data, cfg, out / "job", log=log, should_abort=should_abort)
        aborted = False
    except JobAborted:
        aborted = True
    phases["stopped"] = time.time() - t_launch
    mem["end"] = _mem_gb()
    return {
        "n_particles": n, "phases_s_since_launch": phases,
        "time_to_first_step_s": first_step[0] if first_step else None,
        "steps_done": steps[0] - 1, "aborted_by_bench": aborted, "memory": mem,
        "ru_maxrss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "particles_dataframe_GB": star_df_bytes / 1024 ** 3, "log": lines,
        "torch_threads": torch.get_num_threads(),
    }


def child_breakdown(out: Path) -> dict:
    """Each step of read_particles_star on its own (times and VmHWM after each, one process)."""
    import warnings

    import numpy as np
    import starfile

    from cryoformer_ext.formats import star as star_io

    path, res = out / STAR_NAME, {}

    def step(name: str, fn):
        t0 = time.perf_counter()
        r = fn()
        res[name] = {"s": time.perf_counter() - t0, **_mem_gb()}
        return r

    text = step("read_text", path.read_text)
    step("block_lines_scan", lambda: star_io._block_lines(text))
    del text

    def read():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return starfile.read(path, always_dict=True)
    tables = step("starfile_read", read)
    parts = tables["particles"]
    ctx = star_io._Ctx(path, None)
    step("numeric_columns_x12", lambda: [star_io._numeric(parts, c, ctx, "particles") for c in parts.columns[1:13]])
    paths, idx = step("parse_image_names", lambda: star_io._parse_image_names(parts["rlnImageName"], ctx, out))
    step("MrcStackSource_check", lambda: star_io.MrcStackSource(paths, idx, check=True))
    res["particles_dataframe_GB"] = float(parts.memory_usage(deep=True).sum()) / 1024 ** 3
    del tables, parts, paths, idx
    step("read_particles_star_total", lambda: star_io.read_particles_star(path, out))
    return res


# ---------------------------------------------------------------------------------------------------


def run_child(args: list[str], timeout: float) -> tuple[dict, float]:
    """Run ``python bench_streaming.py --child ...``; returns its JSON and the VmHWM the parent saw (GB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t_launch = time.time()
    proc = subprocess.Popen([sys.executable, __file__, *args, "--t-launch", repr(t_launch)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    hwm = 0
    while proc.poll() is None:
        hwm = max(hwm, _proc_status_kb(proc.pid).get("VmHWM", 0))
        if time.time() - t_launch > timeout:
            proc.kill()
            raise RuntimeError(f"child {args} ran past {timeout} s")
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), hwm / 1024 ** 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--box", type=int, default=16)
    p.add_argument("--base", type=int, default=2000, help="particles simulated for real; the rest repeat them with fresh noise")
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--train-s", type=float, default=30.0, help="seconds of training after the first step")
    p.add_argument("--writer-rows", type=int, default=200_000, help="rows for the write_simulated_star measurement (0: skip)")
    p.add_argument("--breakdown", action="store_true", help="also time each step of read_particles_star")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cryoformer_bench_streaming",
                   help="work folder (default: cryoformer_bench_streaming in the system temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated dataset")
    p.add_argument("--reuse", action="store_true", help="use an existing dataset in --dir")
    p.add_argument("--out-json", type=Path, default=RESULTS / "streaming.json")
    p.add_argument("--child", choices=["train", "writer", "breakdown"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--t-launch", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        t_launch = a.t_launch or time.time()
        if a.child == "train":
            res = child_train(a.dir, a.train_s, t_launch)
        elif a.child == "writer":
            res = child_writer(a.dir, a.writer_rows, a.box)
        else:
            res = child_breakdown(a.dir)
        print(json.dumps(res))
        return

    result: dict = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
                    "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "targets": {"peak_rss_GB": 4.0, "time_to_first_step_s": 60.0}}
    sys.path.insert(0, str(REPO))
    if a.reuse and (a.dir / STAR_NAME).exists():
        result["dataset"] = json.loads((a.dir / "dataset.json").read_text())
    else:
        shutil.rmtree(a.dir, ignore_errors=True)
        result["dataset"] = generate(a.dir, a.n, a.box, a.base, a.chunk, a.snr, seed=0)
        (a.dir / "dataset.json").write_text(json.dumps(result["dataset"]))
    result["dataset"]["dir"] = str(a.dir)
    print(json.dumps(result["dataset"], indent=1), flush=True)
    common = ["--dir", str(a.dir), "--box", str(a.box)]
    try:
        if a.writer_rows:
            w, _ = run_child(["--child", "writer", "--writer-rows", str(a.writer_rows), *common], timeout=600)
            w["extrapolated_to_n_s"] = w["seconds"] * a.n / w["rows"]
            w["extrapolated_to_n_peak_increase_GB"] = w["peak_increase_GB"] * a.n / w["rows"]
            result["write_simulated_star"] = w
            print("write_simulated_star:", json.dumps(w), flush=True)
        shutil.rmtree(a.dir / "job", ignore_errors=True)
        tr, hwm = run_child(["--child", "train", "--train-s", str(a.train_s), *common], timeout=900)
        tr["parent_polled_VmHWM_GB"] = hwm
        tr["peak_rss_GB"] = max(hwm, tr["ru_maxrss_GB"])
        result["train"] = tr
        print("train:", json.dumps({k: v for k, v in tr.items() if k != "log"}, indent=1), flush=True)
        if a.breakdown:
            b, _ = run_child(["--child", "breakdown", *common], timeout=900)
            result["read_particles_star_breakdown"] = b
            print("breakdown:", json.dumps(b, indent=1), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
            result["dataset"]["deleted_after_run"] = True
    tr = result.get("train", {})
    result["verdict"] = {
        "peak_rss_GB": tr.get("peak_rss_GB"), "time_to_first_step_s": tr.get("time_to_first_step_s"),
        "rss_target_met": tr.get("peak_rss_GB") is not None and tr["peak_rss_GB"] < 4.0,
        "start_target_met": tr.get("time_to_first_step_s") is not None and tr["time_to_first_step_s"] < 60.0,
    }
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["verdict"], indent=1))
    print(f"wrote {a.out_json}")


if __name__ == "__main__":
    main()
