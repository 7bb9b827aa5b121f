"""docs/analysis.md's worked example, command by command.

The ```bash block after the ``worked-example`` marker is parsed out of the document and every line is
run as written (``cryoformer`` through ``cryoformer_ext.commands.main``, the console script's entry point, in
this process; RELION programs from PATH),
except two size options that would not fit the test budget: ``--n 1000`` becomes ``--n 200`` and
``--epochs 6`` becomes ``--epochs 1``. Then the files each step promises are checked. So the document
cannot drift from what the commands accept and write.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from chimerax_cxc import check_script
import cryoformer_ext.commands as cli

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "analysis.md"
SMALLER = {"--n 1000": "--n 200", "--epochs 6": "--epochs 1"}

pytestmark = [pytest.mark.relion,
              pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION 3.1 programs not on PATH")]


def example_commands() -> list[str]:
    text = DOC.read_text()
    m = re.search(r"<!-- worked-example.*?-->\s*```bash\n(.*?)```", text, flags=re.S)
    assert m, "docs/analysis.md: no worked-example block"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_example_block_is_what_the_test_expects():
    cmds = example_commands()
    assert [c.split()[0] for c in cmds] == ["cryoformer", "cd", "cryoformer", "cryoformer", "cryoformer",
                                           "cryoformer", "relion_reconstruct", "relion_reconstruct"]
    for key in SMALLER:
        assert sum(key in c for c in cmds) == 1, key


def test_worked_example_runs_as_documented(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in example_commands():
        for old, new in SMALLER.items():
            cmd = cmd.replace(old, new)
        argv = shlex.split(cmd)
        if argv[0] == "cd":
            monkeypatch.chdir(argv[1])
        elif argv[0] == "cryoformer":  # the console script is cryoformer_ext.commands:main; in-process saves imports
            assert cli.main(argv[1:]) == 0, cmd
        else:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    run1 = tmp_path / "project" / "run1"
    assert (run1 / "analysis" / "plots" / "pca_scatter.png").stat().st_size > 1000
    for script in ("kmeans.cxc", "pc1_series.cxc", "consensus_flexibility.cxc"):
        check_script(run1 / "analysis" / "chimerax" / script)
    allp = starfile.read(run1 / "particles.star", always_dict=True)["particles"]
    a = starfile.read(run1 / "state_a" / "particles.star", always_dict=True)["particles"]
    b = starfile.read(run1 / "state_b" / "particles.star", always_dict=True)["particles"]
    assert set(a["rlnClassNumber"]) <= {1, 2} and not set(b["rlnClassNumber"]) & {1, 2}
    assert sorted(a["rlnImageName"].tolist() + b["rlnImageName"].tolist()) == sorted(allp["rlnImageName"])
    assert len(sorted((run1 / "c1_to_c4").glob("path_*.mrc"))) == 6
    assert check_script(run1 / "c1_to_c4" / "series.cxc").models[1].series
    for state in ("state_a", "state_b"):
        with mrcfile.open(run1 / state / "reconstruct.mrc") as m:
            assert m.data.shape == (16, 16, 16) and float(m.voxel_size.x) == pytest.approx(8.0)
            assert np.isfinite(m.data).all() and m.data.std() > 0
