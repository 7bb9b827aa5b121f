"""The External-job protocol against RELION 4.0's and 5.0's own code (built next to the test fixtures).

``pipehN`` schedules and runs our job through that version's real pipeliner (``addScheduledJob`` +
``runScheduledJobs``: it builds the command line, writes ``job.star``, deletes the exit files and the
abort request, launches the program, waits for an exit file and records the status and our output nodes
in ``default_pipeline.star``); ``jobhN`` prints the command line that version builds; ``harnessN`` reads
our STAR files with that version's ``MetaDataTable``. RELION's code is the judge of every check here.
Each version gets its own copy of a tiny simulated project (box 16, 32 particles, 1 epoch, small model).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoformer.simulate import simulate
from cryoformer_ext.formats.simulation import write_simulated
from relion_external import cli, nodes
from test_relion_pipeline import _unlock, _wait_for, relion_exe, sh

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO.parent / "shared" / "tools" / "relion-protocol"
pytestmark = pytest.mark.skipif(not all((TOOLS / f"{t}{v}").exists() for t in ("pipeh", "jobh", "harness")
                                        for v in (4, 5)),
                                reason=f"RELION 4.0/5.0 protocol tools not found in {TOOLS} (see its README)")

N, BOX = 32, 16
PARAMS = {"epochs": "1", "zdim": "3", "tokens": "8", "channels": "16", "enc_layers": "2", "enc_dim": "32",
          "kmeans": "2", "pcs": "1", "pc_steps": "2", "batch_size": "16"}
TIMEOUT = 400  # seconds for one pipeliner run (a few on an idle machine; CI machines are shared)
PARTICLES_LABEL = {4: "ParticlesData.star.relion", 5: "ParticleGroupMetadata.star.relion"}
STAR_VERSION = {4: 30001, 5: 50001}
QUEUE = """#!/bin/sh
# stands in for a queue: the job waits until the user presses Abort, then the program starts
echo "waiting in the queue"
i=0
while [ ! -e "$2RELION_JOB_ABORT_NOW" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
exec {exe} "$@"
"""

# The External job's program, holding the first step of epoch 2 (of a run that started at epoch 1) until
# the Abort button's file exists: the abort then always arrives during training, at a defined step, however
# fast the machine runs the tiny job; a Continue (which resumes after epoch 1) is not held.
HELD = """#!{python}
import functools, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import cryoformer_ext.job.run as job
from relion_external import nodes
from relion_external.cli import main
out = Path(sys.argv[sys.argv.index("--o") + 1])
seen = set()
def hold(epoch, step):
    seen.add(epoch)
    if (epoch, step) == (1, 0) and 0 in seen:
        t0 = time.monotonic()
        while not (out / nodes.ABORT_NOW).exists() and time.monotonic() - t0 < {timeout}:
            time.sleep(0.05)
job.train = functools.partial(job.train, step_hook=hold)
sys.exit(main())
"""


@dataclass
class Project:
    version: int
    path: Path

    def tool(self, name: str) -> str:
        return str(TOOLS / f"{name}{self.version}")

    def add(self, in_part: str, params: dict[str, str], *, other_args: str = "", exe: str = "cryoformer-relion") -> str:
        opts = [f"fn_exe == {self.path / 'bin' / exe}", f"in_part == {in_part}", "nr_threads == 2"]
        for i, (k, v) in enumerate(params.items(), start=1):
            opts += [f"param{i}_label == {k}", f"param{i}_value == {v}"]
        if other_args:
            opts.append(f"other_args == {other_args}")
        _unlock(self.path)
        out = sh([self.tool("pipeh"), "add", ";".join(opts)], self.path).stdout
        return re.search(r"scheduled (External/job\d+/)", out).group(1)

    def run_cmd(self, job: str) -> list[str]:
        _unlock(self.path)
        return ["timeout", str(TIMEOUT), self.tool("pipeh"), "run", job]

    def run(self, job: str) -> None:
        sh(self.run_cmd(job), self.path, timeout=TIMEOUT + 10)

    def start(self, job: str) -> subprocess.Popen:
        return subprocess.Popen(self.run_cmd(job), cwd=self.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pipeline(self) -> dict:
        return starfile.read(self.path / "default_pipeline.star", always_dict=True)

    def status(self, job: str) -> str:
        procs = self.pipeline()["pipeline_processes"]
        return str(procs.loc[procs["rlnPipeLineProcessName"] == job, "rlnPipeLineProcessStatusLabel"].iloc[0])

    def log(self, job: str, name: str = "run.out") -> str:
        p = self.path / job / name
        return p.read_text() if p.exists() else ""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("relion45")
    write_simulated(simulate(N, BOX, pixel_size_A=4.0, snr=2.0, seed=2), d / "Sim", image_prefix="Sim",
                    n_truth_maps=1)
    return d


@pytest.fixture(scope="module", params=[4, 5], ids=["relion4", "relion5"])
def project(request, dataset, tmp_path_factory) -> Project:
    v = request.param
    d = tmp_path_factory.mktemp(f"project{v}")
    shutil.copytree(dataset / "Sim", d / "Sim")
    star = d / "Sim" / "particles.star"
    star.write_text(star.read_text().replace("# version 30001", f"# version {STAR_VERSION[v]}"))
    queued = d / "bin" / "queued"
    queued.write_text(QUEUE.format(exe=relion_exe(d / "bin")))
    queued.chmod(0o755)
    held = d / "bin" / "held"
    held.write_text(HELD.format(python=sys.executable, repo=str(REPO), timeout=TIMEOUT))
    held.chmod(0o755)
    (d / "default_pipeline.star").write_text(
        f"\n# version {STAR_VERSION[v]}\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n")
    return Project(v, d)


@pytest.fixture(scope="module")
def succeeded(project) -> str:
    """One job run to the end, with 'extra --kmeans 3' as the Running tab's additional arguments."""
    params = {k: v for k, v in PARAMS.items() if k != "kmeans"}
    job = project.add("Sim/particles.star", params, other_args="extra --kmeans 3")
    project.run(job)
    return job


# --------------------------------------------------------------------------------------------------


def test_success_registers_our_nodes(project, succeeded):
    job = succeeded
    assert project.status(job) == "Succeeded", project.log(job, "run.err")
    pnodes = project.pipeline()["pipeline_nodes"]
    ours = dict(zip(pnodes["rlnPipeLineNodeName"], pnodes["rlnPipeLineNodeTypeLabel"]))
    ours = {k: v for k, v in ours.items() if k.startswith(job)}
    assert ours.pop(f"{job}particles.star") == PARTICLES_LABEL[project.version]
    # the soft solvent mask comes back as the mask node (RELION 4/5 label Mask3D.mrc); the occupancy grid is no node
    assert ours[f"{job}analysis/solvent_mask.mrc"] == "Mask3D.mrc"
    assert f"{job}analysis/occupancy_mask.mrc" not in ours
    assert set(ours.values()) == {"DensityMap.mrc", "Mask3D.mrc"} and sum("kmeans" in n for n in ours) == 3
    assert any(n.endswith("consensus.mrc") for n in ours) and all((project.path / n).is_file() for n in ours)
    # and RELION's reader of RELION_OUTPUT_NODES.star sees the same
    read = project.tool("harness")
    out = sh([read, f"{job}{nodes.OUTPUT_NODES}", "output_nodes"], project.path).stdout
    listed = dict(re.findall(r"node name=(\S+) label=(\S+)", out))
    assert listed == {**ours, f"{job}particles.star": PARTICLES_LABEL[project.version]}
    assert sorted(p.name for p in (project.path / job).glob("RELION_JOB_*")) == [nodes.EXIT_SUCCESS]


def test_additional_arguments(project, succeeded):
    job = succeeded
    note = (project.path / job / "note.txt").read_text()
    assert "--epochs 1" in note and "--j 2 extra --kmeans 3" in note  # where RELION puts them
    assert "WARNING: ignoring stray arguments extra" in project.log(job)
    assert '"threads": 2' in (project.path / job / "job_config.json").read_text()


def test_particles_star_through_metadatatable(project, succeeded, tmp_path):
    job = succeeded
    ours = starfile.read(project.path / job / "particles.star", always_dict=True)["particles"]
    back = tmp_path / "back.star"
    out = sh([project.tool("harness"), f"{job}particles.star", "particles", str(back)], project.path).stdout
    assert f"version={STAR_VERSION[project.version]} objects={N} " in out, out
    assert f"row0 image={ours['rlnImageName'].iloc[0]} hasClass=1 class={ours['rlnClassNumber'].iloc[0]}" in out
    rt = starfile.read(back, always_dict=True)["particles"]
    inp = starfile.read(project.path / "Sim" / "particles.star", always_dict=True)["particles"]
    assert rt["rlnImageName"].tolist() == inp["rlnImageName"].tolist()  # every particle, in order
    latent = [f"rlnCryoformerZ{i}" for i in (1, 2, 3)]
    np.testing.assert_allclose(rt[latent].to_numpy(), ours[latent].to_numpy(), rtol=1e-5)
    assert rt["rlnClassNumber"].tolist() == ours["rlnClassNumber"].tolist()
    assert set(rt["rlnClassNumber"]) == {1, 2, 3}


def test_missing_stack_fails(project):
    broken = project.path / "Broken" / "particles.star"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text((project.path / "Sim" / "particles.star").read_text().replace("@Sim/", "@Gone/"))
    job = project.add("Broken/particles.star", PARAMS)
    project.run(job)
    assert project.status(job) == "Failed"
    err = project.log(job, "run.err")
    assert "Broken/particles.star" in err and "Gone/particles.mrcs" in err and "does not exist" in err
    assert "Traceback" not in err
    jd = project.path / job
    assert sorted(p.name for p in jd.glob("RELION_JOB_*")) == [nodes.EXIT_FAILURE]
    assert not (jd / "particles.star").exists() and not (jd / nodes.OUTPUT_NODES).exists()


def test_abort_during_training_then_continue(project):
    """Abort pressed once epoch 1 is done: the program holds epoch 2 until it sees the request (bin/held), so
    training stops in epoch 2 and Continue resumes after epoch 1."""
    job = project.add("Sim/particles.star", {**PARAMS, "epochs": "3", "batch_size": "8", "pcs": "0"}, exe="held")
    jd = project.path / job
    proc = project.start(job)
    try:
        _wait_for(lambda: "epoch 1 done" in project.log(job), TIMEOUT, "the first epoch", proc)
        (jd / nodes.ABORT_NOW).touch()  # the GUI's Abort button
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert project.status(job) == "Aborted", project.log(job, "run.err")
    assert (jd / nodes.EXIT_ABORTED).exists() and not (jd / "particles.star").exists()
    first = len(project.log(job))
    assert "epoch 2 done" not in project.log(job)  # stopped during epoch 2: within a step of the request

    project.run(job)  # Continue: RELION removes the abort request and runs the same command again
    assert project.status(job) == "Succeeded", project.log(job, "run.err")
    second = project.log(job)[first:]
    m = re.search(r"resumed from \S+ after epoch (\d)/3", second)
    assert m and int(m.group(1)) == 1, second
    assert all(int(e) > int(m.group(1)) for e in re.findall(r"\bepoch (\d) done", second)), second
    pnodes = project.pipeline()["pipeline_nodes"]
    assert f"{job}particles.star" in set(pnodes["rlnPipeLineNodeName"])


def test_abort_before_the_program_starts(project):
    """Abort pressed while the job waits (in a queue): RELION had already deleted any older request."""
    job = project.add("Sim/particles.star", PARAMS, exe="queued")
    jd = project.path / job
    proc = project.start(job)
    try:
        _wait_for(lambda: "waiting in the queue" in project.log(job), TIMEOUT, "the job to be queued", proc)
        (jd / nodes.ABORT_NOW).touch()
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert project.status(job) == "Aborted", project.log(job, "run.err")
    assert "Abort was pressed before the job started" in project.log(job)
    assert not (jd / "checkpoints").exists()


@pytest.mark.parametrize("version", [4, 5])
def test_command_line_as_relion_builds_it(tmp_path, version):
    """jobhN: the argv RELION gives the program, parsed by ours; and its job.star tells the version."""
    opts = ("fn_exe == cryoformer-relion;in_part == Extract/job002/particles.star;param1_label == zdim;"
            "param1_value == 4;param2_label == gpus;param2_value == 0, 1;param3_label == amp;param3_value == ;"
            "nr_threads == 6;other_args == extra --seed 3")
    out = sh([str(TOOLS / f"jobh{version}"), opts, "7"], tmp_path).stdout
    command = re.search(r"COMMAND\[(.*)\]", out).group(1)
    parsed, stray = cli.parse_argv(command.split()[1:])  # /bin/sh splits the unquoted command on blanks
    assert parsed == {"o": "External/job007/", "in_parts": "Extract/job002/particles.star", "zdim": "4",
                      "gpus": "0, 1", "amp": None, "j": "6", "seed": "3"}
    assert stray == ["extra"]
    assert nodes.detect_version(tmp_path / "External" / "job007") == f"{version}.0"
