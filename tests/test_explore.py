"""``cryoformer eval`` / ``select``, the ChimeraX scripts and z.pkl on one tiny trained job.

The job is trained once per module through the ``cryoformer train`` command (so ``particles.star`` with
``rlnClassNumber`` is the one a user gets) on the simulated hinge: 200 particles, box 16, 1 epoch of a
small model. The checks do not depend on how well so short a run separates conformations: maps are
compared with ``Reconstruction.volumes`` of the saved model, subsets with the job's own ``particles.star``
and ``latents.npy``, RELION's ``relion_star_handler`` / ``relion_pipeliner`` read what we write, and every
``.cxc`` goes through the ChimeraX command checker in ``tests/chimerax_cxc.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import yaml
from cryosparc.dataset import Dataset

from chimerax_cxc import CxcError, check_script
from cryoformer.infer import Reconstruction
from cryoformer.simulate import simulate
import cryoformer_ext.commands as cli
from cryoformer_ext.formats.simulation import write_simulated

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--zdim", "4", "--train_box", "16", "--tokens", "8", "--channels", "16",
        "--enc_layers", "2", "--enc_dim", "32", "--kmeans", "4", "--pcs", "2", "--pc_steps", "3",
        "--batch_size", "16", "--seed", "0"]
N = 200


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("explore_project")
    sim = simulate(N, 16, pixel_size_A=8.0, snr=2.0, states="continuous", seed=3)
    write_simulated(sim, proj)
    rc = cli.main(["train", "--particles", str(proj / "particles.star"), "--project-dir", str(proj),
                   "--out", str(proj / "run1"), *TINY])
    assert rc == 0
    return proj / "run1"


def cf(*args: str) -> int:
    return cli.main([str(a) for a in args])


def assert_same_rows(got, ref, rows=None) -> None:
    """Same columns in the same order and the same values (numbers to 1e-9 relative: the writer prints
    10 significant digits, so 300.000000 may come back as the integer 300)."""
    ref = ref if rows is None else ref[rows]
    assert list(got.columns) == list(ref.columns) and len(got) == len(ref)
    for col in ref.columns:
        a, b = got[col].to_numpy(), ref[col].to_numpy()
        if b.dtype.kind in "fiu":
            assert np.allclose(a.astype(float), b.astype(float), rtol=1e-9, atol=0), col
        else:
            assert a.tolist() == b.tolist(), col


def read_map(path: Path) -> tuple[np.ndarray, float]:
    with mrcfile.open(path) as m:
        return m.data.copy(), float(m.voxel_size.x)


@pytest.fixture(scope="module")
def rec(job) -> Reconstruction:
    return Reconstruction.load(job / "checkpoints")


# ------------------------------------------------------------------------------------------------ eval


def test_eval_maps_equal_reconstruction_volumes(job, rec, tmp_path):
    lat = np.load(job / "latents.npy")
    assert cf("eval", job, "--particles", "0,17,99", "--out", tmp_path / "p") == 0
    for i in (0, 17, 99):
        vol, apix = read_map(tmp_path / "p" / f"particle_{i:06d}.mrc")
        assert np.allclose(vol, rec.volumes(lat[i:i + 1], 16)[0], atol=1e-6)
        assert apix == pytest.approx(rec.voxel_size_A(16), rel=1e-6)
    z = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.savetxt(tmp_path / "z.txt", z)
    assert cf("eval", job, "--z", tmp_path / "z.txt", "--box", "20", "--out", tmp_path / "z") == 0
    want = rec.volumes(z, 20)
    for k in range(3):
        vol, apix = read_map(tmp_path / "z" / f"z_{k + 1:02d}.mrc")
        assert vol.shape == (20, 20, 20) and np.allclose(vol, want[k], atol=1e-5)
        assert apix == pytest.approx(8.0 * 16 / 20, rel=1e-6)  # training pixel size x train box / map box


def test_eval_classes_reproduce_the_analysis_kmeans_maps(job, tmp_path):
    assert cf("eval", job, "--classes", "1,4", "--out", tmp_path) == 0
    for c in (1, 4):
        ours, _ = read_map(tmp_path / f"class_{c:03d}.mrc")
        theirs, _ = read_map(job / "analysis" / "kmeans" / f"class_{c:03d}.mrc")
        assert np.allclose(ours, theirs, atol=1e-6)


def test_traverse_between_extreme_classes_passes_only_through_particles(job, rec, tmp_path):
    lat = np.load(job / "latents.npy")
    centers = json.loads((job / "analysis" / "summary.json").read_text())["kmeans"]["center_particles"]
    out = tmp_path / "trav"
    assert cf("eval", job, "--traverse", "c1", "c4", "--max-neighbors", "20", "--avg-neighbors", "15",
              "--steps", "5", "--out", out) == 0
    record = json.loads((out / "maps.json").read_text())
    path = record["graph_path"]["particles"]  # the whole path; --steps 5 decoded 5 of its particles
    assert path[0] == centers[0] and path[-1] == centers[3] and len(path) >= 3
    hops = np.linalg.norm(np.diff(lat[path], axis=0), axis=1)
    assert hops.max() < record["graph_path"]["max_edge"]  # short steps from particle to particle
    picked = [m["particle"] for m in record["maps"]]
    assert len(picked) == min(5, len(path)) and picked[0] == path[0] and picked[-1] == path[-1]
    assert set(picked) <= set(path) and picked == sorted(picked, key=path.index)
    assert np.loadtxt(out / "path_particles.txt", dtype=int).tolist() == picked
    for m in record["maps"]:  # each latent is exactly a particle's latent, and its map that latent's map
        z = np.asarray(m["latent"], dtype=np.float32)
        assert np.min(np.abs(lat - z).max(axis=1)) == 0.0
        assert np.array_equal(z, lat[m["particle"]])
        vol, _ = read_map(out / m["file"])
        assert np.allclose(vol, rec.volumes(z[None], 16)[0], atol=1e-6)


def test_straight_path_interpolates_between_the_class_latents(job, tmp_path):
    lat = np.load(job / "latents.npy")
    centers = json.loads((job / "analysis" / "summary.json").read_text())["kmeans"]["center_particles"]
    assert cf("eval", job, "--path", "c1", "p7", "--steps", "5", "--out", tmp_path) == 0
    zs = np.array([m["latent"] for m in json.loads((tmp_path / "maps.json").read_text())["maps"]])
    t = np.linspace(0, 1, 5)[:, None]
    assert np.allclose(zs, (1 - t) * lat[centers[0]] + t * lat[7], atol=1e-6)
    assert sorted(p.name for p in tmp_path.glob("path_*.mrc")) == [f"path_{i:02d}.mrc" for i in range(1, 6)]


@pytest.mark.parametrize("args, message", [
    (["--classes", "9"], "class 9 does not exist"),
    (["--particles", f"{N}"], f"particle {N} is out of range"),
    (["--path", "c1", "x2"], "end point 'x2'"),
    (["--path", "c1", "c2", "--steps", "1"], "need at least 2"),
])
def test_eval_errors_name_the_problem(job, tmp_path, capsys, args, message):
    assert cf("eval", job, *args, "--out", tmp_path) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- select


def test_select_classes_keeps_every_column_and_the_optics_table(job, tmp_path):
    src = starfile.read(job / "particles.star", always_dict=True)
    parts = src["particles"]
    assert cf("select", job, "--classes", "2,3", "--out", tmp_path / "a") == 0
    assert cf("select", job, "--classes", "2-3", "--invert", "--out", tmp_path / "b") == 0
    a = starfile.read(tmp_path / "a" / "particles.star", always_dict=True)
    b = starfile.read(tmp_path / "b" / "particles.star", always_dict=True)
    keep = parts["rlnClassNumber"].isin([2, 3]).to_numpy()  # the classes the job wrote at training time
    for got, rows in ((a, keep), (b, ~keep)):
        assert list(got) == ["optics", "particles"]
        assert_same_rows(got["optics"], src["optics"])
        assert_same_rows(got["particles"], parts, rows)
    idx = np.loadtxt(tmp_path / "a" / "indices.txt", dtype=int)
    assert idx.tolist() == np.flatnonzero(keep).tolist()
    with open(tmp_path / "a" / "indices.pkl", "rb") as fh:
        assert pickle.load(fh).tolist() == idx.tolist()


def test_select_by_pc_range_and_by_polygon(job, tmp_path):
    pcs = np.load(job / "analysis" / "pca_coords.npy")
    lo, hi = np.quantile(pcs[:, 0], [0.2, 0.6])
    assert cf("select", job, "--pc", "1", "--range", f"{lo:.6f}", f"{hi:.6f}", "--out", tmp_path / "r") == 0
    got = np.loadtxt(tmp_path / "r" / "indices.txt", dtype=int)
    assert got.tolist() == np.flatnonzero((pcs[:, 0] >= float(f"{lo:.6f}")) & (pcs[:, 0] <= float(f"{hi:.6f}"))).tolist()
    x0, x1 = np.quantile(pcs[:, 0], [0.1, 0.7])
    y0, y1 = np.quantile(pcs[:, 1], [0.3, 0.9])
    (tmp_path / "box.txt").write_text(f"# PC1 PC2\n{x0} {y0}\n{x1} {y0}\n{x1} {y1}\n{x0} {y1}\n")
    assert cf("select", job, "--polygon", tmp_path / "box.txt", "--out", tmp_path / "p") == 0
    inside = (pcs[:, 0] > x0) & (pcs[:, 0] < x1) & (pcs[:, 1] > y0) & (pcs[:, 1] < y1)
    assert np.loadtxt(tmp_path / "p" / "indices.txt", dtype=int).tolist() == np.flatnonzero(inside).tolist()


def _cs_copy(job: Path, path: Path) -> Dataset:
    """The job's particles as a cryoSPARC dataset (same order; blob/idx = STAR image number - 1)."""
    star = starfile.read(job / "particles.star", always_dict=True)["particles"]
    n = len(star)
    d = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                             ("blob/psize_A", "<f4"), ("ctf/df1_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                             ("alignments3D/split", "<u4")])
    d["blob/path"] = ["particles.mrcs"] * n
    d["blob/idx"] = [int(s.split("@")[0]) - 1 for s in star["rlnImageName"]]
    d["blob/shape"] = [[16, 16]] * n
    d["blob/psize_A"] = 8.0
    d["ctf/df1_A"] = star["rlnDefocusU"].to_numpy()
    d["alignments3D/pose"] = np.random.default_rng(0).normal(size=(n, 3))
    d["alignments3D/split"] = np.arange(n) % 2
    d.save(path)
    return Dataset.load(path)


def test_select_writes_the_same_particles_as_star_and_cs(job, tmp_path):
    src = _cs_copy(job, tmp_path / "copy.cs")
    assert cf("select", job, "--classes", "1,4", "--input", job / "particles.star", "--input", tmp_path / "copy.cs",
              "--out", tmp_path / "out") == 0
    idx = np.loadtxt(tmp_path / "out" / "indices.txt", dtype=int)
    sub = Dataset.load(tmp_path / "out" / "particles.cs")
    star = starfile.read(tmp_path / "out" / "particles.star", always_dict=True)["particles"]
    assert sub.fields() == src.fields() and len(sub) == len(star) == len(idx)
    for f in src.fields():
        assert sub[f].dtype == src[f].dtype
        assert np.array_equal(sub[f], src[f][idx]), f
    assert (sub["blob/idx"] + 1).tolist() == [int(s.split("@")[0]) for s in star["rlnImageName"]]
    assert np.allclose(sub["ctf/df1_A"], star["rlnDefocusU"], rtol=1e-6)
    csg = yaml.safe_load((tmp_path / "out" / "particles.csg").read_text())
    assert csg["group"]["type"] == "particle"
    assert {s: r["num_items"] for s, r in csg["results"].items()} == {"blob": len(idx), "ctf": len(idx),
                                                                    "alignments3D": len(idx)}
    assert all(r["metafile"] == ">particles.cs" for r in csg["results"].values())


def _stand_in_job(job: Path) -> Path:
    """A finished job's files that select reads (latents, k-means labels, class centres) for 7 particles."""
    (job / "analysis").mkdir(parents=True)
    np.save(job / "latents.npy", np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32))
    (job / "analysis" / "kmeans_labels.txt").write_text("# labels\n0\n1\n1\n0\n1\n0\n1\n")
    (job / "analysis" / "summary.json").write_text(json.dumps({"kmeans": {"center_particles": [0, 1]}}))
    return job


def test_real_star_and_cs_pair_give_the_same_particles(shared_data, tmp_path):
    """EMPIAR-10076 particles as RELION STAR and cryoSPARC .cs (cryoDRGN's test files): one selection, the
    same images in both outputs, every column/field kept (a stand-in job: latents and k-means labels only)."""
    d = shared_data / "cryodrgn"
    job = _stand_in_job(tmp_path / "job")
    assert cf("select", job, "--classes", "2", "--input", d / "empiar_10076_7.star", "--input",
              d / "empiar_10076_7.cs", "--out", tmp_path / "out") == 0
    star_in = starfile.read(d / "empiar_10076_7.star")
    star = starfile.read(tmp_path / "out" / "particles.star")
    cs_in, cs = Dataset.load(d / "empiar_10076_7.cs"), Dataset.load(tmp_path / "out" / "particles.cs")
    rows = [1, 2, 4, 6]
    assert len(star) == len(cs) == 4
    assert_same_rows(star, star_in.reset_index(drop=True), np.isin(np.arange(7), rows))
    assert cs.fields() == cs_in.fields() and cs["uid"].tolist() == cs_in["uid"][rows].tolist()
    assert [int(s.split("@")[0]) for s in star["rlnImageName"]] == (cs["blob/idx"] + 1).tolist()
    assert np.allclose(star["rlnDefocusU"], cs["ctf/df1_A"], rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--classes", "1", "--range", "0", "1"], "--range needs --pc"),
    (["--pc", "1"], "--pc needs --range"),
    (["--pc", "7", "--range", "0", "1"], "principal component 7 does not exist"),
    (["--classes", "5"], "class 5 does not exist"),
    (["--pc", "1", "--range", "1e9", "2e9"], "contains no particles"),
])
def test_select_errors_name_the_problem(job, tmp_path, capsys, args, message):
    assert cf("select", job, *args, "--out", tmp_path) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "particles.star").exists()


def test_select_refuses_a_particle_file_of_another_size(job, shared_data, tmp_path, capsys):
    assert cf("select", job, "--classes", "1", "--input", job / "particles.star", "--input",
              shared_data / "cryodrgn" / "empiar_10076_7.cs", "--out", tmp_path) == 2
    assert "has 7 particles but the job has 200 latents" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, not even the STAR subset that was fine


def test_select_never_overwrites_its_input(job, tmp_path, capsys):
    before = (job / "particles.star").read_text()
    assert cf("select", job, "--classes", "1", "--out", job) == 2
    assert "would overwrite its own input" in capsys.readouterr().err
    assert (job / "particles.star").read_text() == before


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_star_handler") is None, reason="RELION 3.1 programs not on PATH")
def test_relion_star_handler_reads_the_subset(job, tmp_path):
    assert cf("select", job, "--classes", "1,2", "--out", tmp_path) == 0
    ours = starfile.read(tmp_path / "particles.star", always_dict=True)
    n2 = int((ours["particles"]["rlnClassNumber"] == 2).sum())
    res = subprocess.run(["relion_star_handler", "--i", "particles.star", "--o", "class2.star", "--select",
                          "rlnClassNumber", "--minval", "2", "--maxval", "2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    back = starfile.read(tmp_path / "class2.star", always_dict=True)
    assert len(back["particles"]) == n2 > 0
    assert back["optics"]["rlnImagePixelSize"].tolist() == ours["optics"]["rlnImagePixelSize"].tolist()
    assert {"rlnCryoformerZ1", "rlnCryoformerZ4"} <= set(back["particles"].columns)  # kept by RELION


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_pipeliner") is None, reason="RELION 3.1 programs not on PATH")
def test_external_job_select_classes_makes_a_particles_node(job, tmp_path):
    proj = job.parent  # the RELION project folder: image names are relative to it
    (proj / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n")
    exe = proj / "bin" / "cryoformer-relion"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                   "from relion_external.cli import main\nsys.exit(main())\n")
    exe.chmod(0o755)
    opts = f"fn_exe == {exe};in_part == run1/particles.star;param1_label == select_classes;param1_value == 2,3"
    for cmd in (["relion_pipeliner", "--addJob", "External", "--addJobOptions", opts],
                ["timeout", "100", "relion_pipeliner", "--RunJobs", "External/job001/", "--schedule", "sel",
                 "--sec_wait_after", "1"]):
        res = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    jdir = proj / "External" / "job001"
    assert (jdir / "RELION_JOB_EXIT_SUCCESS").exists(), (jdir / "run.out").read_text()
    pipe = starfile.read(proj / "default_pipeline.star", always_dict=True)
    nodes = dict(zip(pipe["pipeline_nodes"]["rlnPipeLineNodeName"], pipe["pipeline_nodes"]["rlnPipeLineNodeType"]))
    assert nodes["External/job001/particles.star"] == 3  # a particles node for the next job
    assert cf("select", job, "--classes", "2,3", "--out", tmp_path) == 0
    assert (jdir / "particles.star").read_text() == (tmp_path / "particles.star").read_text()


# ------------------------------------------------------------------------------------ ChimeraX, z.pkl


def test_every_analysis_and_eval_script_passes_the_chimerax_checker(job, tmp_path):
    scripts = sorted((job / "analysis" / "chimerax").glob("*.cxc"))
    assert [p.name for p in scripts] == ["consensus_flexibility.cxc", "kmeans.cxc", "pc1_series.cxc",
                                         "pc2_series.cxc"]
    checked = {p.name: check_script(p) for p in scripts}
    assert len(checked["kmeans.cxc"].models) == 4 and "tile" in checked["kmeans.cxc"].commands
    series = checked["pc1_series.cxc"].models[1]
    assert series.series and [f.name for f in series.files] == ["pc1_01.mrc", "pc1_02.mrc", "pc1_03.mrc"]
    flex = checked["consensus_flexibility.cxc"]
    assert [f.name for m in flex.models.values() for f in m.files] == ["consensus.mrc", "flexibility.mrc"]
    # the documented threshold rule: 0.3 x the map maximum; one level per series, from its smallest maximum
    cons, _ = read_map(job / "analysis" / "consensus.mrc")
    assert flex.levels[1] == pytest.approx(0.3 * cons.max(), rel=1e-4)
    smallest = min(read_map(f)[0].max() for f in series.files)
    assert checked["pc1_series.cxc"].levels[1] == pytest.approx(0.3 * smallest, rel=1e-4)
    assert cf("eval", job, "--path", "c1", "c4", "--steps", "4", "--out", tmp_path / "e") == 0
    ev = check_script(tmp_path / "e" / "series.cxc")
    assert ev.models[1].series and len(ev.models[1].files) == 4


@pytest.mark.parametrize("edit, message", [
    (("style surface level", "style surface levle"), "unknown or unsupported keyword 'levle'"),
    (("volume #2 hide", "volume #2 hide hide"), "given twice"),
    (("../consensus.mrc", "../nothere.mrc"), "does not exist"),
    (("palette blue-white-red", "palette hot"), "not a ChimeraX built-in palette"),
    (("color sample #1 map #2", "color sample #1 map #3"), "model #3 is not open"),
    (("volume #1 style surface level ", "volume #1 style surface level 1e6 level "), "outside the value range"),
])
def test_the_checker_rejects_broken_scripts(job, tmp_path, edit, message):
    text = (job / "analysis" / "chimerax" / "consensus_flexibility.cxc").read_text()
    assert edit[0] in text
    bad = tmp_path / "chimerax" / "bad.cxc"
    bad.parent.mkdir()
    for f in ("consensus.mrc", "flexibility.mrc"):
        shutil.copy(job / "analysis" / f, tmp_path / f)
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(CxcError, match=message):
        check_script(bad)


def test_vseries_play_needs_a_series(job, tmp_path):
    text = (job / "analysis" / "chimerax" / "pc1_series.cxc").read_text().replace(" vseries true", "")
    bad = job / "analysis" / "chimerax" / "_bad_series.cxc"
    bad.write_text(text)
    try:
        with pytest.raises(CxcError, match="is not a volume series"):
            check_script(bad)
    finally:
        bad.unlink()


def test_z_pkl_holds_the_job_latents(job):
    with open(job / "analysis" / "z.pkl", "rb") as fh:
        z = pickle.load(fh)
    assert z.dtype == np.float32 and np.array_equal(z, np.load(job / "latents.npy"))


@pytest.mark.skipif(not Path(os.environ.get("CRYOSPARC_TOOLS4_PYTHON", "/nonexistent")).exists(),
                    reason="set CRYOSPARC_TOOLS4_PYTHON to a python with cryosparc-tools 4.x to check v4 reading")
def test_cs_subset_reads_in_cryosparc_tools_4(job, tmp_path):
    """The .cs we write, read by the cryosparc-tools a CryoSPARC v4.x site has (docs/cryosparc.md)."""
    src = _cs_copy(job, tmp_path / "copy.cs")
    assert cf("select", job, "--classes", "2", "--input", tmp_path / "copy.cs", "--out", tmp_path / "o") == 0
    idx = np.loadtxt(tmp_path / "o" / "indices.txt", dtype=int)
    code = ("import sys, numpy as np, cryosparc; from cryosparc.dataset import Dataset\n"
            "a, b = Dataset.load(sys.argv[1]), Dataset.load(sys.argv[2])\n"
            "idx = np.loadtxt(sys.argv[3], dtype=int)\n"
            "assert cryosparc.__version__.startswith('4.'), cryosparc.__version__\n"
            "assert a.fields() == b.fields() and all(np.array_equal(b[f], a[f][idx]) for f in a.fields())\n"
            "print('ok', cryosparc.__version__, len(b))\n")
    res = subprocess.run([os.environ["CRYOSPARC_TOOLS4_PYTHON"], "-c", code, str(tmp_path / "copy.cs"),
                          str(tmp_path / "o" / "particles.cs"), str(tmp_path / "o" / "indices.txt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok 4."), res.stdout + res.stderr
    assert len(idx) == len(Dataset.load(tmp_path / "o" / "particles.cs")) and len(src) == N


def test_homogeneous_analysis_writes_a_consensus_script(tmp_path):
    from test_analysis import FakeGenerator

    from cryoformer_ext.analysis.analyze import analyze

    analyze(None, FakeGenerator(zdim=0), tmp_path, log=lambda m: None)
    assert [p.name for p in (tmp_path / "chimerax").glob("*.cxc")] == ["consensus.cxc"]
    script = check_script(tmp_path / "chimerax" / "consensus.cxc")
    assert len(script.models) == 1 and script.levels[1] > 0
    assert not (tmp_path / "z.pkl").exists()


@pytest.mark.parametrize("star, value, message", [
    ("empiar_10076_7.star", "1", "has no rlnClassNumber column"),
    ("relion31.star", "99", "no particle has rlnClassNumber 99"),
    ("relion31.star", "one", "parameter select_classes"),
])
def test_select_classes_external_job_fails_cleanly(shared_data, tmp_path, capsys, star, value, message):
    from relion_external.cli import main

    out = tmp_path / "External" / "job002"
    rc = main(["--o", f"{out}/", "--in_parts", str(shared_data / "cryodrgn" / star), "--select_classes", value,
               "--j", "1"])
    assert rc == 1 and (out / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (out / "particles.star").exists() and not (out / "RELION_OUTPUT_NODES.star").exists()
    assert message in capsys.readouterr().err


def test_select_classes_external_job_keeps_every_column_of_a_real_relion_file(shared_data, tmp_path, monkeypatch):
    """A real RELION 3.1 file with rlnClassNumber (cryoDRGN's test data): the class subset, every column."""
    from relion_external.cli import main

    monkeypatch.chdir(tmp_path)
    src = shared_data / "cryodrgn" / "relion31.star"
    assert main(["--o", "External/job003/", "--in_parts", str(src), "--select_classes", "1", "--select_invert",
                 "no", "--epochs", "3", "--j", "1"]) == 0
    got = starfile.read(tmp_path / "External/job003/particles.star", always_dict=True)
    ref = starfile.read(src, always_dict=True)
    keep = (ref["particles"]["rlnClassNumber"] == 1).to_numpy()
    assert_same_rows(got["optics"], ref["optics"])
    assert_same_rows(got["particles"], ref["particles"], keep)
    nodes = (tmp_path / "External/job003/RELION_OUTPUT_NODES.star").read_text()
    assert "External/job003/particles.star 3 ParticlesData.star.relion" in nodes


def test_select_on_a_cryosparc_offline_folder_writes_cs(shared_data, tmp_path):
    """The offline mode's layout: <out>/cryoformer/ (engine folder) + <out>/cryoformer_particles.cs."""
    out = tmp_path / "offline"
    _stand_in_job(out / "cryoformer")
    shutil.copy(shared_data / "cryodrgn" / "empiar_10076_7.cs", out / "cryoformer_particles.cs")
    assert cf("select", out, "--classes", "1", "--out", tmp_path / "sub") == 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["indices.pkl", "indices.txt", "particles.cs",
                                                                  "particles.csg", "selection.json"]
    got = Dataset.load(tmp_path / "sub" / "particles.cs")
    assert got["uid"].tolist() == Dataset.load(out / "cryoformer_particles.cs")["uid"][[0, 3, 5]].tolist()
