"""``bench/gpu_check.py --cpu-dry-run``: the GPU check starts and reaches its end (issue 12).

The dry run executes every check of the GPU script on the CPU at a tiny size (two gloo ranks stand in
for two GPUs, CPU bf16 autocast for a bf16 GPU), so a GPU session is not spent on a script that fails
at its first line. On the CPU the kill-and-continue check must be exact: the arithmetic repeats.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = {"hashgrid", "train", "kill_and_continue", "precision", "ddp", "host_syncs", "throughput"}


def test_gpu_check_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["environment"]["dry_run"] and set(r["checks"]) == CHECKS
    assert not any("skipped" in c for c in r["checks"].values())
    kc = r["checks"]["kill_and_continue"]
    assert kc["checkpoint_epoch_after_kill"] == 1 and kc["resumed_log"]
    assert kc["loss_history_max_rel_diff"] == 0.0 and kc["max_abs_param_diff"] == 0.0
    assert r["checks"]["ddp"]["backend"] == "gloo" and "2 ranks" in r["checks"]["ddp"]["log"][0]
    assert "bf16 autocast" in r["checks"]["train"]["log"][0]
    assert [row["box"] for row in r["checks"]["throughput"]["rows"]] == [16, 24]
