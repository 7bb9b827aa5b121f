"""End to end with real RELION 3.1 programs: simulate, run the External job headless, check with RELION.

The project is built once per module: a small map with sharp features, a STAR file of random poses and
CTFs written by ``write_simulated_star``, and particles made from them by ``relion_project --ctf
--add_noise``. The External job is added with ``relion_pipeliner --addJob External`` and run with
``relion_pipeliner --RunJobs`` exactly as the GUI would (RELION builds the command line). RELION's own
programs are the judges: ``default_pipeline.star`` for job status and node types, ``relion_star_handler``
for the extra columns, ``relion_reconstruct --ctf`` + ``relion_image_handler --fsc`` for images/poses/CTF
surviving our particles.star, ``relion_image_handler --stats`` for the map pixel size.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryoformer.data import CTFParams
from cryoformer.poses import random_rotations

pytestmark = [pytest.mark.relion,
              pytest.mark.skipif(shutil.which("relion_pipeliner") is None, reason="RELION 3.1 programs not on PATH")]

REPO = Path(__file__).resolve().parents[1]
BOX, APIX, N_PART = 32, 3.0, 200
TRAIN_BOX = 16
TINY = {"epochs": "1", "train_box": str(TRAIN_BOX), "tokens": "8", "channels": "16", "enc_layers": "2",
        "enc_dim": "32", "kmeans": "2", "pcs": "1", "pc_steps": "3", "batch_size": "32"}


def sh(args: list[str] | str, cwd: Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=isinstance(args, str))
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


def make_map() -> np.ndarray:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
    vol = np.zeros((BOX, BOX, BOX), np.float32)
    for _ in range(10):  # sharp-ish blobs: signal out to ~2 px resolution
        c, s, a = rng.uniform(-7, 7, 3), rng.uniform(1.0, 1.5), rng.uniform(0.5, 1.0)
        vol += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from cryoformer_ext.formats.star import write_simulated_star

    d = tmp_path_factory.mktemp("project")
    with mrcfile.new(d / "map.mrc") as m:
        m.set_data(make_map())
        m.voxel_size = APIX
    rng = np.random.default_rng(1)
    du = rng.uniform(10000, 25000, N_PART)
    ctf = CTFParams.constant(N_PART, defocus_u_A=du, defocus_v_A=du - rng.uniform(0, 1000, N_PART),
                             defocus_angle_deg=rng.uniform(0, 180, N_PART), voltage_kv=300, cs_mm=2.7,
                             amp_contrast=0.1)
    write_simulated_star(d / "input.star", rot=random_rotations(N_PART, rng), shift_px=rng.normal(0, 1, (N_PART, 2)),
                         ctf=ctf, pixel_size_A=APIX, box=BOX, stack_path="Simulated/particles.mrcs")
    (d / "Simulated").mkdir()
    sh(["relion_project", "--i", "map.mrc", "--ang", "input.star", "--ctf", "--add_noise", "--white_noise", "0.05",
        "--o", "Simulated/particles"], d)
    assert (d / "Simulated" / "particles.mrcs").exists()
    (d / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n")
    relion_exe(d / "bin")
    return d


def relion_exe(folder: Path) -> Path:
    """``folder/cryoformer-relion``: the External job's executable, running this checkout's code."""
    exe = folder / "cryoformer-relion"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                   "from relion_external.cli import main\nsys.exit(main())\n")
    exe.chmod(0o755)
    return exe


def pipeline(project: Path) -> dict:
    return starfile.read(project / "default_pipeline.star", always_dict=True)


def job_status(project: Path, job: str) -> int:
    procs = pipeline(project)["pipeline_processes"]
    row = procs[procs["rlnPipeLineProcessName"] == job]
    assert len(row) == 1, procs
    return int(row["rlnPipeLineProcessStatus"].iloc[0])


def add_external_job(project: Path, in_part: str, params: dict[str, str], threads: int = 2) -> str:
    counter = int(pipeline(project)["pipeline_general"]["rlnPipeLineJobCounter"])
    opts = [f"fn_exe == {project / 'bin' / 'cryoformer-relion'}", f"in_part == {in_part}", f"nr_threads == {threads}"]
    for i, (k, v) in enumerate(params.items(), start=1):
        opts += [f"param{i}_label == {k}", f"param{i}_value == {v}"]
    _unlock(project)
    sh(["relion_pipeliner", "--addJob", "External", "--addJobOptions", ";".join(opts)], project)
    job = f"External/job{counter:03d}/"
    assert job_status(project, job) == 1  # scheduled
    return job


def _unlock(project: Path) -> None:
    # a killed pipeliner can leave its lock behind (then the next call waits 2 minutes and fails)
    shutil.rmtree(project / ".relion_lock", ignore_errors=True)


def run_jobs_cmd(job: str, schedule: str) -> list[str]:
    return ["timeout", "170", "relion_pipeliner", "--RunJobs", job, "--schedule", schedule, "--sec_wait_after", "1"]


def run_job(project: Path, job: str, schedule: str) -> None:
    _unlock(project)
    sh(run_jobs_cmd(job, schedule), project, timeout=180)


def fsc_curve(project: Path, a: str, b: str) -> np.ndarray:
    out = sh(["relion_image_handler", "--i", a, "--fsc", b, "--angpix", str(APIX)], project).stdout
    rows = [ln.split() for ln in out.splitlines()]
    rows = [r for r in rows if len(r) == 4 and re.fullmatch(r"\d+", r[0])]
    return np.array([[float(v) for v in r] for r in rows])  # index, 1/Å, Å, FSC


def min_fsc_to(curve: np.ndarray, finest_px: float) -> float:
    """Smallest FSC over all shells at resolutions of ``finest_px`` pixels or coarser."""
    sel = curve[:, 2] >= finest_px * APIX - 1e-6
    return float(curve[sel, 3].min())


def reconstruct(project: Path, star: str, out: str) -> None:
    sh(["relion_reconstruct", "--i", star, "--o", out, "--ctf"], project, timeout=120)


# --------------------------------------------------------------------------------------------------


def test_star_handler_keeps_our_columns(project, tmp_path):
    """RELION reads rlnClassNumber as we write it and keeps rlnCryoformerZ* through its tools."""
    from cryoformer_ext.formats.star import read_particles_star

    ps = read_particles_star(project / "Simulated" / "particles.star", root=project)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(N_PART, 3)).astype(np.float32)
    labels = rng.integers(0, 3, N_PART)
    ours = tmp_path / "ours.star"
    ps.write(ours, latents=z, labels=labels)
    rt = tmp_path / "rt.star"
    res = sh(["relion_star_handler", "--i", str(ours), "--o", str(rt), "--select", "rlnClassNumber",
              "--minval", "2", "--maxval", "2"], project)
    assert "maintain" in res.stdout + res.stderr  # RELION's "will ignore (but maintain)" for unknown labels
    back = starfile.read(rt, always_dict=True)
    sel = labels == 1  # rlnClassNumber 2 is 0-based class 1
    assert len(back["particles"]) == sel.sum()
    np.testing.assert_allclose(back["particles"][["rlnCryoformerZ1", "rlnCryoformerZ2", "rlnCryoformerZ3"]].to_numpy(),
                               z[sel], rtol=1e-6, atol=1e-7)
    orig = starfile.read(project / "Simulated" / "particles.star", always_dict=True)["particles"]
    assert back["particles"]["rlnImageName"].tolist() == orig["rlnImageName"][sel].tolist()
    # a column removed by RELION does not take the unknown ones with it
    rt2 = tmp_path / "rt2.star"
    sh(["relion_star_handler", "--i", str(ours), "--o", str(rt2), "--remove_column", "rlnRandomSubset"], project)
    cols = starfile.read(rt2, always_dict=True)["particles"].columns
    assert "rlnRandomSubset" not in cols and {"rlnCryoformerZ1", "rlnCryoformerZ3", "rlnClassNumber"} <= set(cols)


def test_external_job_end_to_end(project):
    job = add_external_job(project, "Simulated/particles.star", TINY)
    t0 = time.time()
    run_job(project, job, "e2e")
    elapsed = time.time() - t0
    jd = project / job
    assert (jd / "RELION_JOB_EXIT_SUCCESS").exists(), (jd / "run.err").read_text()
    assert job_status(project, job) == 2, (jd / "run.err").read_text()  # finished
    note = (jd / "note.txt").read_text()
    assert f"--in_parts Simulated/particles.star" in note and "--epochs 1" in note and "--j 2" in note
    # our output nodes, with RELION 3.1 types, are in the project pipeline
    pnodes = pipeline(project)["pipeline_nodes"]
    ours = pnodes[pnodes["rlnPipeLineNodeName"].str.startswith(job)]
    types = dict(zip(ours["rlnPipeLineNodeName"], ours["rlnPipeLineNodeType"].astype(int)))
    assert types[f"{job}particles.star"] == 3
    maps = [n for n, t in types.items() if t == 6]
    assert any("consensus" in n for n in maps) and sum("kmeans" in n for n in maps) == 2
    assert all((project / n).exists() for n in types)
    assert (project / ".Nodes" / "3" / job / "particles.star").exists()

    # RELION reconstructs the true map from our particles.star: images, poses and CTF survived
    reconstruct(project, f"{job}particles.star", "rec_ours.mrc")
    fsc = fsc_curve(project, "rec_ours.mrc", "map.mrc")
    assert min_fsc_to(fsc, 3.0) >= 0.5, fsc
    # negative control: the same check fails when the in-plane angles are scrambled
    df = starfile.read(project / job / "particles.star", always_dict=True)
    df["particles"]["rlnAnglePsi"] = np.random.default_rng(0).permutation(df["particles"]["rlnAnglePsi"].to_numpy())
    starfile.write(df, project / "scrambled.star")
    reconstruct(project, "scrambled.star", "rec_scrambled.mrc")
    assert min_fsc_to(fsc_curve(project, "rec_scrambled.mrc", "map.mrc"), 3.0) < 0.5

    # latent + class columns: RELION reads them (selection by class works and keeps the latents)
    zdim = len([c for c in df["particles"].columns if c.startswith("rlnCryoformerZ")])
    assert zdim == 8
    sh(["relion_star_handler", "--i", f"{job}particles.star", "--o", "class1.star", "--select", "rlnClassNumber",
        "--minval", "1", "--maxval", "1"], project)
    c1 = starfile.read(project / "class1.star", always_dict=True)["particles"]
    full = starfile.read(project / job / "particles.star", always_dict=True)["particles"]
    want = full[full["rlnClassNumber"] == 1]
    assert 0 < len(c1) < N_PART and len(c1) == len(want)
    np.testing.assert_allclose(c1["rlnCryoformerZ8"].to_numpy(), want["rlnCryoformerZ8"].to_numpy(), rtol=1e-7)

    # the consensus map is at the particles' box and pixel size (the default map_box), as RELION reads it
    cons = next(n for n in maps if "consensus" in n)
    stats = sh(["relion_image_handler", "--i", cons, "--stats"], project).stdout
    angpix = float(re.search(r"angpix\s*=\s*([0-9.eE+-]+)", stats).group(1))
    assert angpix == pytest.approx(APIX, rel=1e-4)
    assert f"= {BOX} x {BOX} x {BOX} x 1" in stats
    print(f"end-to-end External job: {elapsed:.1f} s")


def test_missing_stack_fails(project):
    text = (project / "Simulated" / "particles.star").read_text().replace("@Simulated/particles.mrcs",
                                                                         "@Gone/particles.mrcs")
    (project / "Broken").mkdir(exist_ok=True)
    (project / "Broken" / "particles.star").write_text(text)
    job = add_external_job(project, "Broken/particles.star", TINY)
    run_job(project, job, "fail")
    jd = project / job
    assert job_status(project, job) == 3  # failed
    err = (jd / "run.err").read_text()
    assert "Broken/particles.star" in err and "Gone/particles.mrcs" in err and "does not exist" in err
    assert not (jd / "particles.star").exists() and not (jd / "RELION_OUTPUT_NODES.star").exists()
    assert sorted(p.name for p in jd.glob("RELION_JOB_*")) == ["RELION_JOB_EXIT_FAILURE"]


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        if proc is not None and proc.poll() is not None and not cond():
            raise AssertionError(f"pipeliner ended (rc {proc.returncode}) before {what}")
        time.sleep(0.3)


def test_abort_then_continue_resumes(project):
    # 64 particles: short epochs, so the first checkpoint comes quickly
    lines, kept = [], 0
    for line in (project / "Simulated" / "particles.star").read_text().splitlines():
        if "@Simulated/particles.mrcs" in line:
            kept += 1
            if kept > 64:
                continue
        lines.append(line)
    (project / "Small").mkdir(exist_ok=True)
    (project / "Small" / "particles.star").write_text("\n".join(lines) + "\n")
    params = dict(TINY, epochs="200", batch_size="16")
    job = add_external_job(project, "Small/particles.star", params)
    jd = project / job
    ckpt_dir = jd / "checkpoints"

    def start(schedule: str) -> subprocess.Popen:
        _unlock(project)
        return subprocess.Popen(run_jobs_cmd(job, schedule), cwd=project, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def epochs_logged() -> int:
        text = (jd / "run.out").read_text() if (jd / "run.out").exists() else ""
        return len(re.findall(r"epoch \d+ done", text))

    proc = start("abort1")
    try:
        # abort once at least one epoch checkpoint exists
        _wait_for(lambda: epochs_logged() >= 1 and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()), 120,
                  "the first checkpoint", proc)
        (jd / "RELION_JOB_ABORT_NOW").touch()
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert job_status(project, job) == 4, (jd / "run.err").read_text()  # aborted
    assert (jd / "RELION_JOB_EXIT_ABORTED").exists()
    done_before = epochs_logged()
    assert done_before >= 1
    first_log_len = len((jd / "run.out").read_text())

    # Continue: RELION runs the same command with the same --o; training resumes from the checkpoint
    proc = start("abort2")
    try:
        _wait_for(lambda: "resumed from" in (jd / "run.out").read_text()[first_log_len:], 60, "the resume message",
                  proc)
        (jd / "RELION_JOB_ABORT_NOW").touch()
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    second = (jd / "run.out").read_text()[first_log_len:]
    m = re.search(r"resumed from \S+ after epoch (\d+)/200", second)
    assert m and int(m.group(1)) >= 1, second
    k = int(m.group(1))
    # it did not start over: every epoch it worked on after resuming comes after the checkpoint's epoch
    later = [int(x) for x in re.findall(r"\bepoch (\d+)(?:/200 step| done)", second)]
    assert all(e > k for e in later), second
    assert job_status(project, job) == 4
