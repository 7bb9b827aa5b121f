"""The RELION External-job adapter without RELION: argv handling, exit files, nodes, outputs.

``run_job`` is replaced by a small fake here (the real one is exercised by test_relion_pipeline.py), so
these tests check only what the adapter itself does with what RELION passes and what run_job returns.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoformer_ext.config import JobConfig
from relion_external import cli, nodes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DRGN = DATA / "cryodrgn"
CSPARC = DATA / "cryosparc"

JOB_STAR_31 = """
# version 30001

data_job

_rlnJobType                             99
_rlnJobIsContinue                       0


# version 30001

data_joboptions_values

loop_
_rlnJobOptionVariable #1
_rlnJobOptionValue #2
    fn_exe cryoformer-relion
"""
JOB_STAR_40 = """
# version 30001

data_job

_rlnJobTypeLabel             relion.external
_rlnJobIsContinue                       0
_rlnJobIsTomo                           0
"""
JOB_STAR_50 = JOB_STAR_40.replace("30001", "50001")


def test_parse_argv_like_relion_passes_it():
    argv = ["--o", "External/job003/", "--in_parts", "Import/job001/particles.star", "--note", "has", "spaces",
            "--empty_value_param", "--lr", "-0.001", "--j", "4", "--pipeline_control", "External/job003/"]
    opts, stray = cli.parse_argv(argv)
    assert opts == {"o": "External/job003/", "in_parts": "Import/job001/particles.star", "note": "has spaces",
                    "empty_value_param": None, "lr": "-0.001", "j": "4", "pipeline_control": "External/job003/"}
    assert stray == []


def test_help_prints_label_value_table(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, f in JobConfig.model_fields.items():
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    assert "cryoformer-relion --o External/jobNNN/" in out


@pytest.mark.parametrize("text, version", [(JOB_STAR_31, "3.1"), (JOB_STAR_40, "4.0"), (JOB_STAR_50, "5.0"),
                                           (None, None)])
def test_detect_version(tmp_path, text, version):
    if text is not None:
        (tmp_path / "job.star").write_text(text)
    assert nodes.detect_version(tmp_path) == version


@pytest.mark.parametrize("version, plabel", [("3.1", "ParticlesData.star.relion"), ("4.0", "ParticlesData.star.relion"),
                                             ("5.0", "ParticleGroupMetadata.star.relion")])
def test_output_nodes_file(tmp_path, version, plabel):
    nodes.write_output_nodes(tmp_path, [("External/job003/particles.star", "particles"),
                                        ("External/job003/consensus.mrc", "map")], version)
    df = starfile.read(tmp_path / nodes.OUTPUT_NODES, always_dict=True)["output_nodes"]
    assert df["rlnPipeLineNodeName"].tolist() == ["External/job003/particles.star", "External/job003/consensus.mrc"]
    assert df["rlnPipeLineNodeType"].tolist() == [3, 6]
    assert df["rlnPipeLineNodeTypeLabel"].tolist() == [plabel, "DensityMap.mrc"]


# --------------------------------------------------------------------------------------------------
# whole adapter with a fake run_job


class FakeAborted(Exception):
    pass


def install_fake_job(monkeypatch, *, abort: bool = False, zdim: int = 3, k: int = 2):
    calls = {}

    def run_job(data, config, out_dir, *, log=print, should_abort=lambda: False):
        calls.update(data=data, config=config, out_dir=Path(out_dir), abort_at_start=should_abort())
        log("fake training")
        if abort:
            (Path(out_dir) / nodes.ABORT_NOW).touch()  # what RELION's Abort button does
            if should_abort():
                raise FakeAborted()
            raise AssertionError("should_abort() did not see RELION_JOB_ABORT_NOW")
        n = len(data)
        maps = []
        for kind, name in [("consensus", "consensus.mrc"), ("kmeans", "kmeans/class_001.mrc"),
                           ("kmeans", "kmeans/class_002.mrc"), ("attention", "attention_argmax.mrc")]:
            p = Path(out_dir) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
            maps.append(types.SimpleNamespace(name=name, path=p.resolve(), kind=kind))
        predicted = None
        if config.poses != "given":
            from cryoformer.poses import random_rotations
            predicted = (random_rotations(n, np.random.default_rng(0)), np.arange(2 * n, dtype=float).reshape(n, 2))
        calls["predicted"] = predicted
        return types.SimpleNamespace(latents=np.arange(n * zdim, dtype=np.float32).reshape(n, zdim) / 10,
                                     labels=np.arange(n) % k, maps=maps, map_pixel_size_A=2.0,
                                     predicted_poses=predicted)

    mod = types.ModuleType("cryoformer_ext.job.run")
    mod.run_job = run_job
    mod.JobAborted = FakeAborted
    monkeypatch.setitem(sys.modules, "cryoformer_ext.job.run", mod)
    return calls


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION project dir (cwd) with relion31.star/.mrcs under Import/ and empiar_10076_7 under Raw/."""
    (tmp_path / "Import").mkdir()
    shutil.copy(DRGN / "relion31.star", tmp_path / "Import" / "particles.star")
    shutil.copy(DRGN / "relion31.mrcs", tmp_path / "relion31.mrcs")  # image names are relative to the project
    (tmp_path / "Raw").mkdir()
    text = (CSPARC / "empiar_10076_7.star").read_text().replace("@empiar_10076_7.mrc", "@Raw/empiar_10076_7.mrc")
    (tmp_path / "Raw" / "noangles.star").write_text(text)
    shutil.copy(CSPARC / "empiar_10076_7.mrc", tmp_path / "Raw" / "empiar_10076_7.mrc")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def exit_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("RELION_JOB_"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_success_writes_particles_nodes_and_exit(project, monkeypatch, capsys):
    calls = install_fake_job(monkeypatch)
    out = project / "External" / "job003"
    out.mkdir(parents=True)
    (out / "job.star").write_text(JOB_STAR_31)
    (out / nodes.EXIT_FAILURE).touch()  # stale, from an earlier run
    rc = cli.main(["--o", "External/job003/", "--in_parts", "Import/particles.star", "--epochs", "3",
                   "--zdim", "3", "--typo_param", "1", "--j", "2", "--pipeline_control", "External/job003/"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert exit_files(out) == [nodes.EXIT_SUCCESS]
    assert calls["abort_at_start"] is False
    cfg = calls["config"]
    assert (cfg.epochs, cfg.zdim, cfg.threads, cfg.poses) == (3, 3, 2, "given")
    assert calls["data"].has_poses and len(calls["data"]) == 5
    assert "WARNING: ignoring unknown option --typo_param" in cap.out
    parts = starfile.read(out / "particles.star", always_dict=True)
    orig = starfile.read(DRGN / "relion31.star", always_dict=True)
    assert set(orig["particles"].columns) < set(parts["particles"].columns)
    assert parts["particles"]["rlnClassNumber"].tolist() == [1, 2, 1, 2, 1]
    np.testing.assert_allclose(parts["particles"]["rlnCryoformerZ3"], np.arange(5) * 0.3 + 0.2, rtol=1e-6)
    nd = starfile.read(out / nodes.OUTPUT_NODES, always_dict=True)["output_nodes"]
    assert nd["rlnPipeLineNodeName"].tolist() == [
        "External/job003/particles.star", "External/job003/consensus.mrc",
        "External/job003/kmeans/class_001.mrc", "External/job003/kmeans/class_002.mrc"]
    assert nd["rlnPipeLineNodeType"].tolist() == [3, 6, 6, 6]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_angles_means_predict(project, monkeypatch):
    calls = install_fake_job(monkeypatch)
    assert cli.main(["--o", "External/job004/", "--in_parts", "Raw/noangles.star", "--j", "1"]) == 0
    assert calls["config"].poses == "predict" and not calls["data"].has_poses
    assert calls["data"].images.read(np.array([6])).shape == (1, 320, 320)
    # the predicted poses go into particles.star (RELION 3.0 input: origins in pixels)
    from scipy.spatial.transform import Rotation
    df = starfile.read(project / "External" / "job004" / "particles.star", always_dict=True)
    (parts,) = df.values()
    ang = parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    mats = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(mats, calls["predicted"][0], atol=1e-6)
    np.testing.assert_allclose(parts[["rlnOriginX", "rlnOriginY"]].to_numpy(), calls["predicted"][1], atol=1e-8)
    # asking for given poses without angles is a clear failure
    capsys_out = project / "External" / "job005"
    rc = cli.main(["--o", "External/job005/", "--in_parts", "Raw/noangles.star", "--poses", "given"])
    assert rc == 1 and exit_files(capsys_out) == [nodes.EXIT_FAILURE]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_missing_stack_fails_cleanly(project, monkeypatch, capsys):
    calls = install_fake_job(monkeypatch)
    (project / "relion31.mrcs").unlink()
    out = project / "External" / "job006"
    out.mkdir(parents=True)
    (out / nodes.EXIT_SUCCESS).touch()  # stale
    rc = cli.main(["--o", "External/job006/", "--in_parts", "Import/particles.star", "--j", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and not calls
    assert exit_files(out) == [nodes.EXIT_FAILURE]
    assert "Import/particles.star" in err and "relion31.mrcs" in err and "does not exist" in err
    assert "Traceback" not in err  # an expected error is one clear line, not a stack trace
    assert not (out / "particles.star").exists() and not (out / nodes.OUTPUT_NODES).exists()


def test_bad_parameter_value_fails(project, monkeypatch, capsys):
    install_fake_job(monkeypatch)
    rc = cli.main(["--o", "External/job007/", "--in_parts", "Import/particles.star", "--epochs", "many"])
    err = capsys.readouterr().err
    assert rc == 1 and exit_files(project / "External" / "job007") == [nodes.EXIT_FAILURE]
    assert "epochs" in err and "many" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_abort_request_is_polled(project, monkeypatch):
    install_fake_job(monkeypatch, abort=True)
    out = project / "External" / "job008"
    out.mkdir(parents=True)
    rc = cli.main(["--o", "External/job008/", "--in_parts", "Import/particles.star"])
    assert rc == 3
    assert exit_files(out) == [nodes.ABORT_NOW, nodes.EXIT_ABORTED] or exit_files(out) == [nodes.EXIT_ABORTED]
    assert not (out / "particles.star").exists()


def test_missing_output_dir_argument(capsys):
    assert cli.main(["--in_parts", "x.star"]) == 2
    assert "--o" in capsys.readouterr().err


def test_sigterm_ends_as_aborted(project):
    """scancel / a queue time limit sends SIGTERM: the job must still write an exit file."""
    import signal
    import subprocess
    import time

    repo = Path(__file__).resolve().parents[1]
    script = project / "run_fake.py"
    script.write_text(
        "import sys, time, types\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "def run_job(data, config, out_dir, *, log=print, should_abort=lambda: False):\n"
        "    log('fake training')\n"
        "    for _ in range(600):\n"
        "        time.sleep(0.05)\n"
        "    raise AssertionError('not terminated')\n"
        "m = types.ModuleType('cryoformer_ext.job.run'); m.run_job = run_job; m.JobAborted = RuntimeError\n"
        "sys.modules['cryoformer_ext.job.run'] = m\n"
        "from relion_external.cli import main\n"
        "sys.exit(main())\n")
    out = project / "External" / "job009"
    out.mkdir(parents=True)
    with open(out / "run.out", "w") as fo, open(out / "run.err", "w") as fe:
        proc = subprocess.Popen([sys.executable, str(script), "--o", "External/job009/", "--in_parts",
                                 "Import/particles.star"], cwd=project, stdout=fo, stderr=fe)
        try:
            t0 = time.time()
            while "fake training" not in (out / "run.out").read_text():
                assert time.time() - t0 < 60 and proc.poll() is None, (out / "run.err").read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert exit_files(out) == [nodes.EXIT_ABORTED]
    assert "terminated by a signal" in (out / "run.err").read_text()
