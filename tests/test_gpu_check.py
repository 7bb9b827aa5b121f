"""``bench/gpu_check.py --cpu-dry-run``: the GPU check starts and reaches its end.

The dry run executes every check of the GPU script on the CPU at a tiny size (two gloo ranks stand in
for two GPUs, CPU bf16 autocast for a bf16 GPU), so time on a GPU machine is not spent on a script that fails
at its first line. On the CPU the kill-and-continue check must be exact: the arithmetic repeats.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = {"hashgrid", "train", "kill_and_continue", "precision", "ddp", "host_syncs", "throughput"}
sys.path.insert(0, str(REPO / "bench"))


def test_gpu_check_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["environment"]["dry_run"] and set(r["checks"]) == CHECKS
    assert r["summary"] == {"ok": 7, "skipped": 0, "failed": 0}
    assert "7 ok, 0 skipped, 0 failed" in proc.stdout
    kc = r["checks"]["kill_and_continue"]
    assert kc["checkpoint_epoch_after_kill"] == 1 and kc["resumed_log"]
    assert kc["loss_history_max_rel_diff"] == 0.0 and kc["max_abs_param_diff"] == 0.0
    assert r["checks"]["ddp"]["backend"] == "gloo" and "2 ranks" in r["checks"]["ddp"]["log"][0]
    tr = r["checks"]["train"]
    assert "bf16 autocast" in tr["log"][0] and "hash grid torch (fp32)" in tr["log"][0]
    # 32 images in steps of 8, the grid estimated after 8: the first step at half the box is not compared
    assert (tr["steps_at_half_box"], tr["steps_at_full_box"]) == (1, 7)
    assert [row["box"] for row in r["checks"]["throughput"]["rows"]] == [16, 24]
    assert all(row["sphere_fraction_rendered"].endswith("%") for row in r["checks"]["throughput"]["rows"])
    # 100 images in steps of 2, estimates after 36 and 72 images (the gap doubles from the warm-up)
    assert r["checks"]["host_syncs"]["occupancy_estimated_at_steps"] == [17, 35]


def test_skipped_and_timed_out_checks_are_reported_apart(capsys):
    import gpu_check

    results = {"checks": {}}
    end = time.perf_counter() + 60
    gpu_check._run_check("ddp", lambda: {"ok": None, "skipped": "1 GPU visible"}, results, 10, end)
    gpu_check._run_check("train", lambda: time.sleep(30) or {"ok": True}, results, 1.5, end)
    gpu_check._run_check("precision", lambda: {"ok": True}, results, 10, end)
    gpu_check._run_check("throughput", lambda: {"ok": True}, results, 10, time.perf_counter() + 0.5)
    status = {k: v["status"] for k, v in results["checks"].items()}
    assert status == {"ddp": "skipped", "train": "failed", "precision": "ok", "throughput": "failed"}
    assert results["checks"]["train"]["error"].startswith("out of time") and results["checks"]["train"]["seconds"] < 5
    assert "budget was spent" in results["checks"]["throughput"]["error"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["ddp", "skipped"] and printed[1].split()[:2] == ["train", "failed"]


def test_job_model_settings_import_without_the_writers():
    """The benchmarks and the GPU check build the job's own model on a machine that may have only torch,
    numpy and pydantic: ``cryoformer_ext.job.configs`` must import with mrcfile, matplotlib, starfile and
    cryosparc-tools absent (each blocked in a fresh interpreter), and build the job's model there."""
    code = (
        "import sys\n"
        "for m in ('mrcfile', 'matplotlib', 'starfile', 'cryosparc', 'umap', 'sklearn'):\n"
        "    sys.modules[m] = None\n"
        "from cryoformer.data import ArraySource, ParticleData\n"
        "from cryoformer.simulate import simulate\n"
        "from cryoformer_ext.config import JobConfig\n"
        "from cryoformer_ext.job.configs import model_config_for\n"
        "sim = simulate(4, 32, pixel_size_A=4.0, seed=0)\n"
        "data = ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)\n"
        "print(model_config_for(data, JobConfig(train_box=24), 1.7).box)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "24"
