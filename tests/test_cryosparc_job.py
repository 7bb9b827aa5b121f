"""The cryoSPARC adapter: offline outputs (round-trip through cryosparc-tools) and the live call sequence.

Live-mode tests follow cryosparc-tools' own test pattern: ``APIClient.__call__`` is patched (no
``/openapi.json`` fetch) and the API namespaces are class-level ``MagicMock``s returning real pydantic
models. They prove WHAT we send (specs, slots, passthrough, order, failure messages) -- not that a
cryoSPARC server accepts it; ``test_live_server`` (marker ``cryosparc_live``) does that when a server
and credentials are configured.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import yaml
from cryosparc.api import APIClient
from cryosparc.dataset import Dataset
from cryosparc.models.job import Job
from cryosparc.models.job_spec import InputSlot, InputSpec, JobSpec, OutputSlot, OutputSpec
from cryosparc.models.project import Project
from cryosparc.models.user import User
from cryosparc.tools import CryoSPARC

from cryoformer_ext.formats import cs as cs_io
from cryoformer_ext.config import JobConfig
from cryoformer_ext.formats.atomic import write_mrc
from cryosparc_job import cli
from cryosparc_job.common import parse_engine_args, planned_volumes
from cryosparc_job.live import LiveError, LiveSettings, run_live
from cryosparc_job.offline import run_offline

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CS = DATA / "cryosparc"
EMPIAR_CS = CS / "empiar_10076_7.cs"
EMPIAR_MRC = CS / "empiar_10076_7.mrc"
P12 = CS / "cryosparc_P12_J24_001_particles.cs"

TINY = dict(epochs=1, train_box=16, tokens=8, channels=16, enc_layers=2, enc_dim=32, kmeans=2, pcs=1, pc_steps=3)

# a 1x1 PNG
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
                    "00010005fe02fea70000000049454e44ae426082")


# ---- a JobResult-shaped fake engine ---------------------------------------------------------------------

class FakeEngine:
    """Records its call and writes maps the way the analysis names them (contract of run_job)."""

    def __init__(self, *, extra_kmeans: int = 0, flexibility: bool = True, fail: Exception | None = None):
        self.calls: list[dict] = []
        self.extra_kmeans = extra_kmeans
        self.flexibility = flexibility
        self.fail = fail

    def __call__(self, data, config, out_dir, *, log=print, should_abort=lambda: False):
        from cryoformer_ext.analysis.analyze import MapRecord

        self.calls.append(dict(data=data, config=config, out_dir=Path(out_dir), abort=should_abort()))
        log("epoch 1/1 step 1/2 loss 0.5")
        log("epoch 1/1 step 2/2 loss 0.4")
        log("epoch 1 done: mean loss 0.45")
        if self.fail is not None:
            raise self.fail
        out = Path(out_dir)
        n = len(data)
        rng = np.random.default_rng(0)
        latents = rng.normal(size=(n, config.zdim)).astype(np.float32)
        names = [("consensus", "consensus.mrc", "consensus", None, None)]
        for c in range(config.kmeans + self.extra_kmeans):
            names.append((f"class_{c + 1:03d}", f"kmeans/class_{c + 1:03d}.mrc", "kmeans", c, None))
        for p in range(1, config.pcs + 1):
            for i in range(config.pc_steps):
                names.append((f"pc{p}_{i + 1:02d}", f"pc{p}/pc{p}_{i + 1:02d}.mrc", "pc", i, p))
        if self.flexibility:
            names.append(("flexibility", "flexibility.mrc", "flexibility", None, None))
        names.append(("attention_argmax", "attention_argmax.mrc", "attention", None, None))
        maps = []
        for name, rel, kind, index, pc in names:
            path = write_mrc(out / rel, rng.normal(size=(8, 8, 8)).astype(np.float32), 3.5)
            maps.append(MapRecord(name=name, path=path.resolve(), kind=kind, index=index, pc=pc))
        (out / "plots").mkdir(parents=True, exist_ok=True)
        (out / "plots" / "pca_scatter.png").write_bytes(PNG)
        return SimpleNamespace(latents=latents, labels=np.zeros(n, np.int64), maps=maps, map_pixel_size_A=3.5,
                               latents_file=None, summary_file=None, plots=[out / "plots" / "pca_scatter.png"])


def project_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A project folder holding the empiar stack (blob/path 'empiar_10076_7.mrc') and its .cs."""
    proj = tmp_path / "P12"
    proj.mkdir()
    shutil.copy(EMPIAR_MRC, proj / EMPIAR_MRC.name)
    cs_file = tmp_path / "J24_particles.cs"
    shutil.copy(EMPIAR_CS, cs_file)
    return proj, cs_file


# ---- offline ----------------------------------------------------------------------------------------------

def check_offline_outputs(out: Path, proj: Path, inp: Dataset, zdim: int) -> list[dict]:
    part_cs = Dataset.load(out / "cryoformer_particles.cs")
    assert len(part_cs) == len(inp)
    np.testing.assert_array_equal(part_cs["uid"], inp["uid"])
    for f in inp.fields():  # every input field intact
        np.testing.assert_array_equal(part_cs[f], inp[f], err_msg=f)
    for k in range(zdim):
        np.testing.assert_array_equal(part_cs[f"components_mode_{k}/component"], k)
        assert np.isfinite(part_cs[f"components_mode_{k}/value"]).all()
    assert not any(f.startswith("components_mode_") and int(f.split("_")[2].split("/")[0]) >= zdim
                   for f in part_cs.fields())
    for p in part_cs["blob/path"]:  # blob/path still resolves against the project directory
        assert cs_io.resolve_blob_path(p, proj).is_file()

    docs = []
    for csg in sorted(out.glob("*.csg")):
        doc = yaml.safe_load(csg.read_text())
        assert isinstance(doc["created"], datetime.datetime)
        assert doc["group"]["type"] in ("particle", "volume", "mask")
        for slot, r in doc["results"].items():
            assert r["metafile"].startswith(">")
            meta = csg.parent / r["metafile"][1:]
            assert meta.is_file(), meta
            d = Dataset.load(meta)
            assert r["num_items"] == len(d)
            assert any(f.startswith(slot + "/") for f in d.fields())
            assert r["type"] == doc["group"]["type"] + "." + cs_io.slot_dtype(slot)
            if doc["group"]["type"] == "volume":
                mpath = str(d["map/path"][0])
                assert mpath.startswith(">") and (csg.parent / mpath[1:]).is_file()
                assert d["map/psize_A"][0] > 0 and len(d["map/shape"][0]) == 3
        docs.append(doc)
    part_doc = next(d for d in docs if d["group"]["type"] == "particle")
    assert set(part_doc["results"]) == set(cs_io.dataset_slots(inp)) | {f"components_mode_{k}" for k in range(zdim)}
    return docs


def test_offline_outputs_with_fake_engine(tmp_path):
    proj, cs_file = project_copy(tmp_path)
    engine = FakeEngine()
    out = tmp_path / "out"
    res = run_offline(cs_file, proj, out, JobConfig(zdim=2, **TINY), engine=engine, log=lambda m: None)
    call = engine.calls[0]
    assert call["config"].poses == "predict"  # no alignments3D -> orientation encoder
    assert call["data"].rot is None and call["data"].box == 320 and len(call["data"]) == 7
    assert call["out_dir"] == out / "cryoformer"
    docs = check_offline_outputs(out, proj, Dataset.load(cs_file), zdim=2)
    vol_names = sorted(d["group"]["name"] for d in docs if d["group"]["type"] == "volume")
    assert vol_names == sorted(["volume_consensus", "volume_class_001", "volume_class_002", "volume_pc1_01",
                                "volume_pc1_02", "volume_pc1_03", "volume_flexibility"])  # attention: not published
    assert len(res.volumes) == 7 and res.particles_csg == out / "cryoformer_particles.csg"
    # a rerun with fewer maps leaves no stale result groups behind
    run_offline(cs_file, proj, out, JobConfig(zdim=2, **{**TINY, "pc_steps": 2}), engine=FakeEngine(),
                log=lambda m: None)
    assert not (out / "cryoformer_volume_pc1_03.csg").exists() and not (out / "cryoformer_volume_pc1_03.cs").exists()
    assert (out / "cryoformer_volume_pc1_02.csg").exists()


def test_offline_uses_poses_of_a_refinement(tmp_path):
    """A refinement .cs keeps poses='given' and hands the converted poses to the engine."""
    d = cs_io.load_cs(P12).take(np.arange(7))
    d["blob/path"][:] = EMPIAR_MRC.name
    d["blob/idx"][:] = np.arange(7)
    d["blob/shape"][:] = [320, 320]
    proj, _ = project_copy(tmp_path)
    d.save(tmp_path / "ref.cs")
    engine = FakeEngine()
    run_offline(tmp_path / "ref.cs", proj, tmp_path / "out", JobConfig(zdim=1, **TINY), engine=engine,
                log=lambda m: None)
    call = engine.calls[0]
    assert call["config"].poses == "given"
    np.testing.assert_allclose(call["data"].shift_px, d["alignments3D/shift"], atol=1e-6)
    check_offline_outputs(tmp_path / "out", proj, d, zdim=1)


@pytest.mark.parametrize("case", ["missing_stack", "no_ctf", "mixed_box"])
def test_offline_cli_errors(tmp_path, capsys, case, monkeypatch):
    proj, cs_file = project_copy(tmp_path)
    d = Dataset.load(cs_file)
    if case == "missing_stack":
        (proj / EMPIAR_MRC.name).unlink()
        expect = "particle stack file not found"
    elif case == "no_ctf":
        d.drop_fields([f for f in d.fields() if f.startswith("ctf/")])
        expect = "no CTF parameters"
    else:
        d["blob/shape"][0] = [256, 256]
        expect = r"mixed box sizes: 256 px \(1 particles\), 320 px \(6 particles\)"
    d.save(cs_file)
    called = []
    monkeypatch.setattr("cryosparc_job.offline.default_engine", lambda: lambda *a, **k: called.append(1))
    rc = cli.main(["--offline", "--particles-cs", str(cs_file), "--project-dir", str(proj),
                   "--out", str(tmp_path / "out"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and not called
    assert err.startswith("cryoformer-cryosparc: error: ")
    assert re.search(expect, err), err


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--offline", "--particles-cs", "x.cs"])
    assert e.value.code == 2 and "--offline needs --project-dir, --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--project", "P1", "--workspace", "W1", "--particles", "J2.particles", "--epochz", "3"])
    assert "unknown parameter 'epochz'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--project", "P1"])
    assert "live mode needs --workspace, --particles" in capsys.readouterr().err
    assert cli.main(["--help-params"]) == 0 and "--zdim" in capsys.readouterr().out


def test_parse_engine_args():
    assert parse_engine_args(["--epochs", "5", "--amp=no", "--gpus", "0,1", "--seed", "-3"]) == \
        {"epochs": "5", "amp": "no", "gpus": "0,1", "seed": "-3"}
    assert parse_engine_args(["--amp", "--zdim", "2"]) == {"amp": None, "zdim": "2"}
    with pytest.raises(ValueError):
        parse_engine_args(["stray"])


def test_planned_volumes_match_analysis_names():
    names = [p.name for p in planned_volumes(JobConfig(zdim=2, kmeans=3, pcs=2, pc_steps=10), 100)]
    assert names[:4] == ["consensus", "class_001", "class_002", "class_003"]
    assert "pc2_10" in names and names[-1] == "flexibility" and len(names) == 1 + 3 + 20 + 1
    assert [p.name for p in planned_volumes(JobConfig(zdim=0), 100)] == ["consensus"]
    assert len([p for p in planned_volumes(JobConfig(zdim=1, pcs=2, pc_steps=3), 100) if "pc" in p.name]) == 3


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "cryoformer_ext" / "job" / "run.py").exists(),
                    reason="cryoformer_ext/job/run.py (run_job) not written yet")
def test_offline_end_to_end_real_engine(tmp_path):
    """The real engine on the 7 real EMPIAR-10076 images (no poses -> orientation encoder), tiny model."""
    proj, cs_file = project_copy(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["--offline", "--particles-cs", str(cs_file), "--project-dir", str(proj), "--out", str(out),
                   "--zdim", "2", "--threads", "2"] + [a for k, v in TINY.items() for a in (f"--{k}", str(v))])
    assert rc == 0
    docs = check_offline_outputs(out, proj, Dataset.load(cs_file), zdim=2)
    assert any(d["group"]["name"] == "volume_consensus" for d in docs)


# ---- live (mocked API, the way cryosparc-tools tests itself) ------------------------------------------------

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def job_model(uid: str, *, outputs: dict | None = None, status: str = "building") -> Job:
    return Job.model_validate(dict(
        uid=uid, project_uid="P12", uid_num=int(uid[1:]), project_uid_num=12, status_num=0, build_errors=[],
        job_dir=uid, job_dir_size_last_updated=NOW, status=status,
        spec=dict(type="snowflake" if uid == "J42" else "homo_refine_new", ui_tile_width=1, ui_tile_height=1,
                  resource_spec={}, outputs=outputs or {})))


@pytest.fixture
def api(monkeypatch):
    """cryosparc-tools' upstream pattern: no OpenAPI fetch, class-level MagicMock namespaces."""
    monkeypatch.setattr(APIClient, "__call__", lambda self, auth=None: {})
    for ns in ("users", "config", "projects", "workspaces", "jobs", "assets"):
        monkeypatch.setattr(APIClient, ns, mock.MagicMock(), raising=False)
    APIClient.users.me.return_value = User(name="Test", first_name="Test", last_name="User")
    APIClient.config.get_version.return_value = "develop"
    return APIClient


@pytest.fixture
def live(api, tmp_path):
    proj, _ = project_copy(tmp_path)
    (proj / "J42").mkdir()  # the job folder, reachable here (shared file system)
    source = job_model("J24", outputs={"particles": {"type": "particle", "title": "Particles"}})
    new = job_model("J42")
    models = {"J24": source, "J42": new}
    api.projects.find_one.return_value = Project(uid="P12", project_dir=str(proj), owner_user_id="u", title="P",
                                                 size_last_updated=NOW, uid_num=12)
    api.projects.get_directory.return_value = str(proj)
    api.jobs.create.return_value = new
    api.jobs.find_one.side_effect = lambda puid, juid: models[juid]
    for fn in ("add_external_input", "add_external_output", "connect", "mark_running", "mark_completed",
               "mark_failed", "save_output"):
        getattr(api.jobs, fn).return_value = new
    inp = Dataset.load(EMPIAR_CS)
    api.jobs.load_input.return_value = inp
    zfields = {"particles": [f for k in range(2) for f in ((f"components_mode_{k}/component", "u4"),
                                                            (f"components_mode_{k}/value", "f8"))]}

    def output_fields(puid, juid, name, dtype_params={}):
        return zfields.get(name, [("map/path", "O"), ("map/shape", "3u4"), ("map/psize_A", "f4")])

    api.jobs.get_output_fields.side_effect = output_fields
    cs = CryoSPARC("https://cryosparc.example.com", email="test@example.com", password="password",
                   host=None, base_port=None)
    settings = LiveSettings(project="P12", workspace="W1", particles="J24.particles", abort_poll_s=0.0)
    return SimpleNamespace(api=api, cs=cs, proj=proj, inp=inp, settings=settings)


def calls(m, name):
    return [c for c in m.mock_calls if c[0] == name]


def test_live_call_sequence(live):
    api, engine = live.api, FakeEngine()
    cfg = JobConfig(zdim=2, **TINY)
    uid = run_live(live.settings, cfg, cs=live.cs, engine=engine, log=lambda m: None)
    assert uid == "J42"

    api.jobs.create.assert_called_once_with("P12", "W1", type="snowflake", title="cryoFormer",
                                            description=live.settings.description)
    api.jobs.add_external_input.assert_called_once_with("P12", "J42", "particles", InputSpec(
        type="particle", title="Particles", description="", count_min=1, count_max="inf",
        slots=[InputSlot(name="blob", dtype="blob", required=True), InputSlot(name="ctf", dtype="ctf", required=True),
               InputSlot(name="alignments3D", dtype="alignments3D", required=False)]))
    api.jobs.connect.assert_called_once_with("P12", "J42", "particles", source_job_uid="J24",
                                             source_output_name="particles")

    outs = {c.args[2]: c.args[3] for c in api.jobs.add_external_output.call_args_list}
    assert outs["particles"] == OutputSpec(
        type="particle", title="Particles with cryoFormer latent coordinates", passthrough="particles",
        slots=[OutputSlot(name="components_mode_0", dtype="components"),
               OutputSlot(name="components_mode_1", dtype="components")])
    vols = {k: v for k, v in outs.items() if k != "particles"}
    assert sorted(vols) == sorted(["volume_consensus", "volume_class_001", "volume_class_002", "volume_pc1_01",
                                   "volume_pc1_02", "volume_pc1_03", "volume_flexibility"])
    for spec in vols.values():
        assert spec.type == "volume" and spec.passthrough is None
        assert spec.slots == [OutputSlot(name="map", dtype="blob")]

    # order: every output declared before mark_running; saves between mark_running and mark_completed
    seq = [c[0] for c in api.jobs.mock_calls]
    i_run, i_done = seq.index("mark_running"), seq.index("mark_completed")
    assert max(i for i, n in enumerate(seq) if n == "add_external_output") < i_run
    assert all(i_run < i < i_done for i, n in enumerate(seq) if n == "save_output")
    api.jobs.mark_running.assert_called_once_with("P12", "J42", status="running")
    api.jobs.mark_completed.assert_called_once_with("P12", "J42")
    api.jobs.mark_failed.assert_not_called()

    saves = {c.args[2]: c for c in api.jobs.save_output.call_args_list}
    p = saves["particles"].args[3]
    assert saves["particles"].kwargs == {"version": 0}
    np.testing.assert_array_equal(p["uid"], live.inp["uid"])
    assert p["components_mode_1/value"].dtype == np.float64  # dtype came from the server, not hard-coded
    np.testing.assert_array_equal(p["components_mode_0/component"], 0)
    data_seen = engine.calls[0]["data"]
    assert engine.calls[0]["config"].poses == "predict" and data_seen.rot is None
    assert engine.calls[0]["out_dir"] == live.proj / "J42" / "cryoformer"
    assert not any(f.startswith(("blob/", "ctf/")) for f in p.fields())  # passthrough slots are not re-sent
    for name in vols:
        v = saves[name].args[3]
        rel = v["map/path"][0]
        assert rel.startswith("J42/cryoformer/") and (live.proj / rel).is_file()
        np.testing.assert_array_equal(v["map/shape"][0], [8, 8, 8])
        assert v["map/psize_A"][0] == pytest.approx(3.5)

    # progress: the two "step i/n" lines share one event (second one updates it); plots become image events
    texts = [c.args[2] for c in api.jobs.add_event_log.call_args_list]
    assert "epoch 1/1 step 1/2 loss 0.5" in texts and "epoch 1/1 step 2/2 loss 0.4" not in texts
    assert "epoch 1 done: mean loss 0.45" in texts
    assert any(c.args[3] == "epoch 1/1 step 2/2 loss 0.4" for c in api.jobs.update_event_log.call_args_list)
    assert api.assets.upload.called
    assert api.jobs.add_image_log.call_args.kwargs["text"] == "pca scatter"


def test_live_extra_and_missing_maps(live):
    """A map not planned is added while running (unconfirmed on a server); a planned one not made is reported."""
    api = live.api
    run_live(live.settings, JobConfig(zdim=2, **TINY), cs=live.cs, engine=FakeEngine(extra_kmeans=1, flexibility=False),
             log=lambda m: None)
    seq = [(c[0], c.args[2] if c[0] in ("add_external_output", "save_output") else None) for c in api.jobs.mock_calls]
    i_run = seq.index(("mark_running", None))
    assert seq.index(("add_external_output", "volume_class_003")) > i_run
    assert ("save_output", "volume_class_003") in seq and ("save_output", "volume_flexibility") not in seq
    warnings = [c.args[2] for c in api.jobs.add_event_log.call_args_list if c.kwargs.get("type") == "warning"]
    assert any("volume_flexibility" in w for w in warnings)
    api.jobs.mark_completed.assert_called_once()


def test_live_uploads_when_job_folder_is_not_local(live, tmp_path):
    shutil.rmtree(live.proj / "J42")
    live.settings.work_dir = tmp_path / "local_work"
    run_live(live.settings, JobConfig(zdim=2, **TINY), cs=live.cs, engine=FakeEngine(), log=lambda m: None)
    uploads = [c.kwargs["path"] for c in live.api.projects.upload_file.call_args_list]
    assert "J42/cryoformer/consensus.mrc" in uploads and len(uploads) == 7
    saves = {c.args[2]: c.args[3] for c in live.api.jobs.save_output.call_args_list}
    assert saves["volume_consensus"]["map/path"][0] == "J42/cryoformer/consensus.mrc"
    live.api.jobs.mark_completed.assert_called_once()


@pytest.mark.parametrize("case", ["missing_stack", "no_ctf", "mixed_box", "engine_error"])
def test_live_failures_mark_job_failed(live, case):
    api = live.api
    engine = FakeEngine()
    if case == "missing_stack":
        (live.proj / EMPIAR_MRC.name).unlink()
        expect = "particle stack file not found"
    elif case == "no_ctf":
        live.inp.drop_fields([f for f in live.inp.fields() if f.startswith("ctf/")])
        expect = "no CTF parameters (missing ctf/df1_A"
    elif case == "mixed_box":
        live.inp["blob/shape"][0] = [256, 256]
        expect = "mixed box sizes: 256 px (1 particles), 320 px (6 particles)"
    else:
        engine = FakeEngine(fail=RuntimeError("boom"))
        expect = "RuntimeError: boom"
    with pytest.raises(LiveError, match="boom" if case == "engine_error" else None) as e:
        run_live(live.settings, JobConfig(zdim=2, **TINY), cs=live.cs, engine=engine, log=lambda m: None)
    assert expect in str(e.value)
    api.jobs.mark_failed.assert_called_once()
    assert api.jobs.mark_failed.call_args.args == ("P12", "J42")
    assert expect in api.jobs.mark_failed.call_args.kwargs["error"]
    api.jobs.mark_completed.assert_not_called()
    api.jobs.save_output.assert_not_called()
    if case != "engine_error":  # input problems are found before any output is declared or training starts
        api.jobs.add_external_output.assert_not_called()
        assert not engine.calls


def test_live_abort_from_ui(live):
    """A job killed/marked in the UI turns should_abort() true (status polled through jobs.find_one)."""
    killed = job_model("J42", status="killed")
    seen = []

    def engine(data, config, out_dir, *, log=print, should_abort=lambda: False):
        live.api.jobs.find_one.side_effect = lambda puid, juid: killed
        seen.append(should_abort())
        raise type("JobAborted", (Exception,), {})("stopped after epoch 1")

    with pytest.raises(LiveError, match="aborted: stopped after epoch 1"):
        run_live(live.settings, JobConfig(zdim=2, **TINY), cs=live.cs, engine=engine, log=lambda m: None)
    assert seen == [True]
    assert live.api.jobs.mark_failed.call_args.kwargs["error"] == "aborted: stopped after epoch 1"


def test_live_bad_source_spec():
    with pytest.raises(LiveError, match="expected <job>.<output>"):
        run_live(LiveSettings(project="P1", workspace="W1", particles="particles"), JobConfig(), cs=object())


def test_connect_reads_environment_at_call_time(api, monkeypatch):
    from cryosparc_job.live import connect

    for k in ("CRYOSPARC_BASE_URL", "CRYOSPARC_MASTER_HOSTNAME", "CRYOSPARC_BASE_PORT", "CRYOSPARC_EMAIL",
              "CRYOSPARC_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(LiveError, match="no cryoSPARC address"):
        connect()
    monkeypatch.setenv("CRYOSPARC_BASE_URL", "http://cs.example.org:39000")
    monkeypatch.setenv("CRYOSPARC_MASTER_HOSTNAME", "ignored-when-url-given")
    monkeypatch.setenv("CRYOSPARC_EMAIL", "a@b.c")
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "pw")
    cs = connect()
    assert cs.base_url == "http://cs.example.org:39000"


# ---- a real server (skipped unless configured) --------------------------------------------------------------

LIVE_ENV = ("CRYOSPARC_BASE_URL", "CRYOSPARC_TEST_PROJECT", "CRYOSPARC_TEST_WORKSPACE", "CRYOSPARC_TEST_PARTICLES")


@pytest.mark.cryosparc_live
@pytest.mark.skipif(not all(os.environ.get(k) for k in LIVE_ENV)
                    or not (os.environ.get("CRYOSPARC_PASSWORD") or os.environ.get("CRYOSPARC_EMAIL")),
                    reason="needs a cryoSPARC server: " + ", ".join(LIVE_ENV) + " and credentials")
def test_live_server(tmp_path):
    """Settles what the mocks cannot: map slot dtype 'blob', components field dtypes, outputs accepted.

    CRYOSPARC_TEST_PARTICLES = a small particle output, e.g. J5.particles; CRYOSPARC_TEST_PROJECT_DIR
    optionally gives the project directory as this machine sees it.
    """
    from cryosparc_job.live import connect

    settings = LiveSettings(project=os.environ["CRYOSPARC_TEST_PROJECT"],
                            workspace=os.environ["CRYOSPARC_TEST_WORKSPACE"],
                            particles=os.environ["CRYOSPARC_TEST_PARTICLES"], title="cryoFormer test",
                            project_dir=Path(os.environ["CRYOSPARC_TEST_PROJECT_DIR"])
                            if os.environ.get("CRYOSPARC_TEST_PROJECT_DIR") else None,
                            work_dir=tmp_path / "work")
    cs = connect()
    uid = run_live(settings, JobConfig(zdim=2, **TINY), cs=cs)
    job = cs.find_job(settings.project, uid)
    assert job.status == "completed"
    parts = job.load_output("particles")
    assert "components_mode_1/value" in parts.fields()
    vol = job.load_output("volume_consensus")
    assert str(vol["map/path"][0]).endswith(".mrc")
