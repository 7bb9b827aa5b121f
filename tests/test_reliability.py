"""Every failure ends with a clear message and the right exit status.

Each test is named for the failure it covers. Real jobs run on a tiny simulated dataset (box 16, 32 particles,
1 epoch, small model); the RELION adapter's own behaviour is checked with the fake ``run_job`` of
test_relion_cli.py. Disk full is a real (small) tmpfs where this machine lets the test mount one, and an
injected ``OSError(ENOSPC)`` everywhere else.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from cryosparc.dataset import Dataset

from cryoformer.simulate import simulate
from cryoformer.train import CHECKPOINT_NAME, CheckpointWriteError, train
import cryoformer_ext.commands as main_cli
from cryoformer_ext.formats import cs as cs_io
from cryoformer_ext.config import NO_CTF_LOG, JobConfig, JobConfigError
from cryoformer_ext.job.run import JobAborted, run_job
from cryoformer_ext.formats.atomic import atomic_write_text, save_npy, write_mrc
from cryoformer_ext.formats.simulation import write_simulated
from cryoformer_ext.formats.star import StarFileError, read_particles_star
from cryosparc_job import cli as cs_cli
from cryosparc_job.offline import run_offline
from relion_external import cli, nodes
from test_cryosparc_job import EMPIAR_CS, EMPIAR_MRC, FakeEngine, project_copy
from test_relion_cli import exit_files, install_fake_job, project  # noqa: F401 - project is a fixture
from test_train_resume import _cfgs, _data

REPO = Path(__file__).resolve().parents[1]
TINY = {"epochs": "1", "tokens": "8", "channels": "16", "enc_layers": "2", "enc_dim": "32", "kmeans": "2",
        "pcs": "1", "pc_steps": "2", "batch_size": "16"}


def argv(params: dict[str, str]) -> list[str]:
    return [x for k, v in params.items() for x in (f"--{k}", v)]


def sim_project(root: Path, n: int = 32, box: int = 16, *, with_ctf: bool = True, poses: bool = True) -> str:
    """A RELION-style project in ``root``: Sim/particles.star + Sim/particles.mrcs (names relative to root)."""
    sim = simulate(n, box, pixel_size_A=4.0, snr=2.0, seed=1, with_ctf=with_ctf)
    write_simulated(sim, root / "Sim", image_prefix="Sim", n_truth_maps=1)
    drop = ([] if with_ctf else ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
                                 "rlnCtfScalefactor", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"])
    drop += [] if poses else ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    if drop:
        star = starfile.read(root / "Sim" / "particles.star", always_dict=True)
        star = {k: v.drop(columns=[c for c in drop if c in v.columns]) for k, v in star.items()}
        starfile.write(star, root / "Sim" / "particles.star", overwrite=True)
    return "Sim/particles.star"


@pytest.fixture
def sim(tmp_path, monkeypatch) -> Path:
    sim_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def relion_subprocess(args: list[str], cwd: Path, stdout, stderr, timeout: float = 240) -> int:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from relion_external.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, stdout=stdout, stderr=stderr,
                          timeout=timeout).returncode


@pytest.fixture
def tmpfs(tmp_path):
    """A 3 MiB tmpfs (a disk that fills up), or a skip where mounting is not allowed."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); the injected-ENOSPC tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---- disk full ----------------------------------------------------------------------------------------


def test_checkpoint_on_full_disk_injected(tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk_save(obj, f, *a, **k):
        fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        fh.write(b"\0" * 4096)  # part of it got written, then the disk was full
        fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk_save)
    mcfg, tcfg = _cfgs()
    with pytest.raises(CheckpointWriteError) as e:
        train(_data(), mcfg, tcfg.model_copy(update={"epochs": 1}), tmp_path, log=lambda m: None)
    assert "no space left on device" in str(e.value) and str(tmp_path / CHECKPOINT_NAME) in str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no .last.pt.tmp left behind
    monkeypatch.setattr(torch, "save", real_save)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_checkpoint_on_full_tmpfs(tmpfs):
    (tmpfs / "filler").write_bytes(b"\0" * (_free_bytes(tmpfs) - 64 * 1024))  # 64 KiB left
    free = _free_bytes(tmpfs)
    mcfg, tcfg = _cfgs()
    with pytest.raises(CheckpointWriteError, match=f"cannot write the checkpoint {tmpfs / CHECKPOINT_NAME}: no space "
                                                   "left on device"):
        train(_data(), mcfg, tcfg.model_copy(update={"epochs": 1}), tmpfs, log=lambda m: None)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"] and _free_bytes(tmpfs) == free  # tmp removed


def test_relion_job_on_full_disk_writes_failure(tmpfs):
    """run.out/run.err inside --o on a disk too small for the checkpoint: the failure still gets an exit file."""
    part = sim_project(tmpfs)
    out = tmpfs / "External" / "job001"
    out.mkdir(parents=True)
    (tmpfs / "filler").write_bytes(b"\0" * (_free_bytes(tmpfs) - 256 * 1024))  # room for logs, not a checkpoint
    with open(out / "run.out", "w") as fo, open(out / "run.err", "w") as fe:
        rc = relion_subprocess(["--o", "External/job001/", "--in_parts", part, *argv(TINY), "--j", "1"], tmpfs, fo, fe)
    err = (out / "run.err").read_text()
    assert rc == 1 and exit_files(out) == [nodes.EXIT_FAILURE], err
    assert "no space left on device" in err and "External/job001/checkpoints/last.pt" in err, err
    assert "Traceback" not in err
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_exit_file_even_when_the_log_cannot_be_written(project):
    """stdout/stderr on a full disk (/dev/full): RELION must still get its exit file."""
    (project / "relion31.mrcs").unlink()  # the job fails: missing stack
    with open("/dev/full", "w") as full:
        rc = relion_subprocess(["--o", "External/job002/", "--in_parts", "Import/particles.star"], project, full, full)
    assert rc != 0 and exit_files(project / "External" / "job002") == [nodes.EXIT_FAILURE]


# ---- abort -----------------------------------------------------------------------------------------------


def test_abort_during_the_analysis(sim):
    logs: list[str] = []
    cfg = JobConfig.from_strings({**TINY, "zdim": "2"})
    with pytest.raises(JobAborted, match="during the analysis"):
        run_job(read_particles_star("Sim/particles.star").data, cfg, sim / "job", log=logs.append,
                should_abort=lambda: any(m.startswith("analysis:") for m in logs))
    assert (sim / "job" / "checkpoints" / CHECKPOINT_NAME).exists()
    assert not (sim / "job" / "analysis" / "summary.json").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_abort_pressed_before_the_start_is_honoured(project, monkeypatch, capsys):
    calls = install_fake_job(monkeypatch)
    out = project / "External" / "job003"
    out.mkdir(parents=True)
    (out / nodes.ABORT_NOW).touch()  # pressed while the job waited in a queue (RELION deleted any older one)
    rc = cli.main(["--o", "External/job003/", "--in_parts", "Import/particles.star", "--j", "1"])
    assert rc == 3 and not calls
    assert exit_files(out) == [nodes.ABORT_NOW, nodes.EXIT_ABORTED]  # the request is never deleted
    assert "Abort was pressed before the job started" in capsys.readouterr().out


# ---- additional arguments -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_additional_arguments_after_j(project, monkeypatch, capsys):
    opts, stray = cli.parse_argv(["--o", "External/job004/", "--j", "4", "extra", "--zdim", "2"])
    assert opts == {"o": "External/job004/", "j": "4", "zdim": "2"} and stray == ["extra"]
    calls = install_fake_job(monkeypatch, zdim=2)
    rc = cli.main(["--o", "External/job004/", "--in_parts", "Import/particles.star", "--j", "4", "extra",
                   "--zdim", "2"])
    assert rc == 0 and calls["config"].threads == 4 and calls["config"].zdim == 2
    assert "WARNING: ignoring stray arguments extra" in capsys.readouterr().out


# ---- node names under a symlinked folder ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_node_names_with_external_on_a_scratch_disk(project, monkeypatch, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("scratch")
    (scratch / "External").mkdir()
    (project / "External").symlink_to(scratch / "External")
    install_fake_job(monkeypatch)  # its maps come back as resolved absolute paths
    assert cli.main(["--o", "External/job005/", "--in_parts", "Import/particles.star"]) == 0
    names = starfile.read(project / "External" / "job005" / nodes.OUTPUT_NODES)["rlnPipeLineNodeName"].tolist()
    assert names == ["External/job005/particles.star", "External/job005/consensus.mrc",
                     "External/job005/kmeans/class_001.mrc", "External/job005/kmeans/class_002.mrc"]


# ---- RELION 5 tomography particles -------------------------------------------------------------------------

OPTICS = """
# version 50001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnImagePixelSize #5
_rlnImageSize #6
_rlnImageDimensionality #7
1 optics1 300 2.7 2.0 64 {dim}
"""
PARTICLES = """
# version 50001

data_particles

loop_
_rlnOpticsGroup #1
_rlnDefocusU #2
_rlnImageName #3
{extra_labels}1 15000 {image} {extra_values}
"""
GENERAL = "\n# version 50001\n\ndata_general\n\n_rlnTomoSubTomosAre2DStacks                       1\n\n"


@pytest.mark.parametrize("text, marker", [
    (GENERAL + OPTICS.format(dim=2) + PARTICLES.format(
        extra_labels="", image="Extract/job010/Subtomograms/TS_01/1_stack2d.mrcs", extra_values=""),
     "data_general has rlnTomoSubTomosAre2DStacks"),
    (OPTICS.format(dim=2) + PARTICLES.format(extra_labels="_rlnTomoName #4\n_rlnTomoParticleName #5\n",
                                             image="1@a.mrcs", extra_values="TS_01 TS_01/1"),
     "rlnTomoName in data_particles"),
    (OPTICS.format(dim=3) + PARTICLES.format(extra_labels="", image="Extract/job010/Subtomograms/TS_01/1_data.mrc",
                                             extra_values=""),
     "rlnImageDimensionality 3 in data_optics"),
])
def test_tomography_particles_get_one_clear_message(tmp_path, text, marker):
    (tmp_path / "particles.star").write_text(text)
    with pytest.raises(StarFileError) as e:
        read_particles_star(tmp_path / "particles.star", root=tmp_path)
    assert str(e.value) == (f"{tmp_path / 'particles.star'}: RELION tomography particles ({marker}) are not "
                            "supported: cryoFormer reconstructs single-particle images (2D stacks named "
                            "NNNNNN@stack.mrcs)")


# ---- Continue refuses a changed model --------------------------------------------------------------------

MODEL_TINY = {**TINY, "zdim": "2", "train_box": "16", "epochs": "1", "pcs": "0", "kmeans": "1"}


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("continue")
    sim_project(root, n=24, box=20)
    star = read_particles_star(root / "Sim" / "particles.star", root=root)
    run_job(star.data, JobConfig.from_strings(MODEL_TINY), root / "job", log=lambda m: None)
    return root, root / "job"


@pytest.mark.parametrize("param, value, old", [
    ("zdim", "3", "2"), ("tokens", "4", "8"), ("channels", "8", "16"), ("attention", "literal", "point"),
    ("enc_layers", "3", "2"), ("enc_dim", "16", "32"), ("hash_scale", "1.5", "None"), ("poses", "refine", "given"),
    ("train_box", "20", "16"),
])
def test_continue_refuses_a_changed_model(trained_job, tmp_path, param, value, old):
    root, job = trained_job
    work = tmp_path / "job"
    shutil.copytree(job, work)
    before = (work / "job_config.json").read_text()
    star = read_particles_star(root / "Sim" / "particles.star", root=root)
    with pytest.raises(JobConfigError) as e:
        run_job(star.data, JobConfig.from_strings({**MODEL_TINY, param: value}), work, log=lambda m: None)
    msg = str(e.value)
    assert f"{param} = {old} in the checkpoint, {value} now" in msg, msg
    assert "Continue cannot change the model" in msg and "start a new job" in msg and str(work / "checkpoints") in msg
    assert (work / "job_config.json").read_text() == before  # the refused settings were not recorded


def test_continue_names_the_occupancy_cells(trained_job, tmp_path):
    """A job trained with 4 Å cells (the default) continued with the 4-pixel grid (0) is refused with both
    grids' sizes in cells (what the checkpoint holds) under the parameter's name, which is in Å."""
    from cryoformer_ext.job.configs import model_config_for

    root, job = trained_job
    work = tmp_path / "job"
    shutil.copytree(job, work)
    star = read_particles_star(root / "Sim" / "particles.star", root=root)
    coarser = JobConfig.from_strings({**MODEL_TINY, "occupancy_cell_A": "0"})
    old = model_config_for(star.data, JobConfig.from_strings(MODEL_TINY), 1.0).occupancy_cells
    new = model_config_for(star.data, coarser, 1.0).occupancy_cells
    assert old != new
    with pytest.raises(JobConfigError) as e:
        run_job(star.data, coarser, work, log=lambda m: None)
    assert f"occupancy_cell_A: the occupancy grid has {old} cells per axis in the checkpoint, {new} now" in str(e.value)


def test_continue_accepts_other_parameters(trained_job, tmp_path):
    root, job = trained_job
    shutil.copytree(job, tmp_path / "job")
    logs: list[str] = []
    star = read_particles_star(root / "Sim" / "particles.star", root=root)
    res = run_job(star.data, JobConfig.from_strings({**MODEL_TINY, "epochs": "2", "lr": "0.001", "kmeans": "2"}),
                  tmp_path / "job", log=logs.append)
    assert any("resumed from" in m and "after epoch 1/2" in m for m in logs) and res.latents.shape == (24, 2)


# ---- messages instead of tracebacks ---------------------------------------------------------------------


def test_cli_names_the_particle_with_a_nan_image(sim, capsys):
    with mrcfile.open(sim / "Sim" / "particles.mrcs", mode="r+") as m:
        m.data[2, 5, 5] = np.nan
    line = next(i for i, t in enumerate((sim / "Sim" / "particles.star").read_text().splitlines(), 1)
                if t.startswith("000003@"))
    rc = main_cli.main(["train", "--particles", "Sim/particles.star", "--out", "out", *argv(TINY)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (f"Sim/particles.star: particle 3 (line {line}): image 3 of {sim / 'Sim' / 'particles.mrcs'} holds NaN "
            "or infinite pixel values") in err, err


def test_cli_unwritable_output_folder_is_a_permission_message(sim, monkeypatch, capsys):
    real_mkdir = Path.mkdir
    blocked = sim / "locked"

    def mkdir(self, *a, **k):  # what a folder without write permission does (the tests run as root)
        if self == blocked or blocked in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc = main_cli.main(["train", "--particles", "Sim/particles.star", "--out", str(blocked / "out"), *argv(TINY)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"cryoformer train: error: permission denied ({blocked / 'out'})"), err


def test_cli_ctrl_c_exits_130_with_a_message(sim, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cryoformer_ext.job.run.run_job", interrupted)
    rc = main_cli.main(["train", "--particles", "Sim/particles.star", "--out", "out"])
    assert rc == 130 and "interrupted" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("error, expect", [
    (FloatingPointError("loss became nan at epoch 1 step 3"),
     "training diverged: loss became nan at epoch 1 step 3. Lower the learning rate"),
    (PermissionError(errno.EACCES, "Permission denied", "External/job006/x.mrc"), "permission denied (External/job006/x.mrc)"),
    (OSError(errno.ENOSPC, "No space left on device", "External/job006/x.mrc"), "no space left on device while writing External/job006/x.mrc"),
])
def test_relion_mode_failures_are_messages(project, monkeypatch, capsys, error, expect):
    mod = type(sys)("cryoformer_ext.job.run")

    def run_job(*a, **k):
        raise error

    mod.run_job, mod.JobAborted = run_job, RuntimeError
    monkeypatch.setitem(sys.modules, "cryoformer_ext.job.run", mod)
    rc = cli.main(["--o", "External/job006/", "--in_parts", "Import/particles.star"])
    err = capsys.readouterr().err
    assert rc == 1 and exit_files(project / "External" / "job006") == [nodes.EXIT_FAILURE]
    assert err.startswith(expect) and "Traceback" not in err, err


def test_relion_mode_corrupt_checkpoint_is_a_message(sim, capsys):
    ck = sim / "External" / "job007" / "checkpoints" / CHECKPOINT_NAME
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"not a checkpoint")
    rc = cli.main(["--o", "External/job007/", "--in_parts", "Sim/particles.star", *argv(TINY)])
    err = capsys.readouterr().err
    assert rc == 1 and exit_files(ck.parent.parent) == [nodes.EXIT_FAILURE]
    assert err.startswith(f"External/job007/checkpoints/{CHECKPOINT_NAME}: cannot read the checkpoint") and \
        "delete it to train from the start" in err and "Traceback" not in err, err


def test_cs_nan_defocus_is_named_when_read(tmp_path):
    proj, cs_file = project_copy(tmp_path)
    d = Dataset.load(cs_file)
    d["ctf/df1_A"][3] = np.nan
    with pytest.raises(cs_io.CsInputError, match=rf"particle 3 \(uid {int(d['uid'][3])}\): ctf/df1_A is nan, "
                                                 "not a finite number"):
        cs_io.particles_from_dataset(d, proj, source="J24_particles.cs")


# ---- file modes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_get_the_umask_mode(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        files = [atomic_write_text(tmp_path / "particles.star", "x"), save_npy(tmp_path / "z.npy", np.zeros(2)),
                 write_mrc(tmp_path / "map.mrc", np.zeros((4, 4, 4)), 1.0),
                 write_mrc(tmp_path / "stack.mrcs", np.zeros((2, 4, 4)), 1.0),
                 nodes.write_output_nodes(tmp_path, [("External/job001/map.mrc", "map")], "5.0")]
    finally:
        os.umask(old)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}


# ---- one behaviour in every entry point ------------------------------------------------------------------


def test_no_ctf_is_refused_the_same_way_everywhere(tmp_path, monkeypatch, capsys):
    part = sim_project(tmp_path, with_ctf=False)
    monkeypatch.chdir(tmp_path)
    hint = "set the job parameter ctf = no"
    assert main_cli.main(["train", "--particles", part, "--out", "out"]) == 2
    assert "no CTF parameters (no rlnDefocusU column)" in capsys.readouterr().err
    assert cli.main(["--o", "External/job008/", "--in_parts", part]) == 1
    assert hint in capsys.readouterr().err and exit_files(tmp_path / "External" / "job008") == [nodes.EXIT_FAILURE]
    proj, cs_file = project_copy(tmp_path)
    d = Dataset.load(cs_file)
    d.drop_fields([f for f in d.fields() if f.startswith("ctf/")])
    d.save(cs_file)
    assert cs_cli.main(["--offline", "--particles-cs", str(cs_file), "--project-dir", str(proj), "--out",
                        str(tmp_path / "cs_out")]) == 1
    assert hint in capsys.readouterr().err
    # with ctf = no the cryoSPARC path trains CTF-free as well
    engine = FakeEngine()
    run_offline(cs_file, proj, tmp_path / "cs_out", JobConfig(zdim=1, ctf=False, kmeans=1, pcs=0), engine=engine,
                log=lambda m: None)
    assert engine.calls[0]["data"].ctf is None
    with pytest.raises(JobConfigError, match="no CTF parameters"):  # the job layer refuses too (API callers)
        run_job(read_particles_star(part, require_ctf=False).data, JobConfig(), tmp_path / "job")


def test_cli_ctf_no_and_predicted_poses(tmp_path, monkeypatch, capsys):
    """CTF-free, pose-free particles through `cryoformer train`: the warning, and the predicted poses written."""
    part = sim_project(tmp_path, with_ctf=False, poses=False)
    monkeypatch.chdir(tmp_path)
    assert main_cli.main(["train", "--particles", part, "--out", "out", "--ctf", "no", *argv(TINY)]) == 0
    assert NO_CTF_LOG in capsys.readouterr().out
    parts = starfile.read(tmp_path / "out" / "particles.star", always_dict=True)["particles"]
    pred = np.load(tmp_path / "out" / "predicted_poses.npz")
    from cryoformer.poses import relion_euler_to_rot
    rot = relion_euler_to_rot(*(parts[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    np.testing.assert_allclose(rot, pred["rot"], atol=1e-4)  # near identity: Euler angles are ill-conditioned
    np.testing.assert_allclose(parts["rlnOriginXAngst"].to_numpy(), pred["shift_px"][:, 0] * 4.0, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_failed_continue_leaves_no_earlier_results(project, monkeypatch):
    install_fake_job(monkeypatch)
    out = project / "External" / "job009"
    assert cli.main(["--o", "External/job009/", "--in_parts", "Import/particles.star"]) == 0
    assert (out / "particles.star").exists() and (out / nodes.OUTPUT_NODES).exists()
    assert cli.main(["--o", "External/job009/", "--in_parts", "Import/particles.star", "--epochs", "many"]) == 1
    assert exit_files(out) == [nodes.EXIT_FAILURE]
    assert not (out / "particles.star").exists() and not (out / nodes.OUTPUT_NODES).exists()


# ---- cryoSPARC offline: stacks of exported particles ----------------------------------------------------


@pytest.mark.parametrize("stack_in", ["project", "export"])
def test_offline_cryosparc_output_points_at_the_stacks(tmp_path, stack_in):
    """Exported ('>') blob paths are relative to the input .cs's folder; the output must still find the stacks."""
    proj = tmp_path / "P12"
    export = tmp_path / "export"
    rel = Path("J1") / "imported" / EMPIAR_MRC.name
    where = proj if stack_in == "project" else export
    (where / rel).parent.mkdir(parents=True)
    (proj).mkdir(exist_ok=True)
    shutil.copy(EMPIAR_MRC, where / rel)
    d = Dataset.load(EMPIAR_CS)
    d["blob/path"][:] = ">" + rel.as_posix()
    export.mkdir(exist_ok=True)
    d.save(export / "J1_particles_exported.cs")
    out = tmp_path / "out"
    run_offline(export / "J1_particles_exported.cs", proj, out, JobConfig(zdim=1, kmeans=1, pcs=0),
                engine=FakeEngine(), log=lambda m: None)
    written = Dataset.load(out / "cryoformer_particles.cs")
    for p in set(written["blob/path"]):
        p = p.decode() if isinstance(p, bytes) else str(p)
        # '>' = relative to the .csg's folder (out), otherwise to the project directory
        target = out / p[1:] if p.startswith(">") else proj / p
        assert target.is_file(), p
        with mrcfile.open(target) as a, mrcfile.open(EMPIAR_MRC) as b:
            np.testing.assert_array_equal(a.data, b.data)
    assert str(written["blob/path"][0]).startswith(">") == (stack_in == "export")
