"""RELION particle STAR reading/writing against real files and independent references.

Independent oracles: cryoDRGN's own parser outputs (``pose.star.pkl``, ``ctf1.pkl``), SciPy's Euler
convention (``Rotation.from_euler('ZYZ', ...).as_matrix().T`` = RELION's matrix, verified numerically
against relion_project), the raw MRC stacks read with mrcfile, and literal values copied from the
STAR files' text.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryoformer.data import CTFParams
from cryoformer.poses import random_rotations
from cryoformer_ext.formats.star import (StarFileError, add_result_columns, read_particles_star,
                                    write_particles_star, write_simulated_star)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DRGN = DATA / "cryodrgn"
CSPARC = DATA / "cryosparc"

pytestmark = pytest.mark.skipif(not DRGN.is_dir(), reason="shared test data not available")


def relion_matrix(rot, tilt, psi):
    return Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], -1), degrees=True).as_matrix().transpose(0, 2, 1)


# --------------------------------------------------------------------------------------------------
# RELION 3.0 file vs cryoDRGN's parse_pose_star / parse_ctf_star outputs


def test_relion30_poses_match_cryodrgn():
    ps = read_particles_star(DRGN / "FinalRefinement-OriginalParticles-PfCRT.star", root=DRGN, check_images=False)
    rot_ref, trans_ref = pickle.load(open(DRGN / "pose.star.pkl", "rb"))
    assert ps.record.relion_format == "3.0" and ps.record.version is None
    np.testing.assert_allclose(ps.data.rot, rot_ref, atol=1e-6)
    np.testing.assert_allclose(ps.data.shift_px, trans_ref * 300, atol=1e-5)  # cryoDRGN trans = shift_px / D


def test_relion30_ctf_matches_cryodrgn():
    ps = read_particles_star(DRGN / "FinalRefinement-OriginalParticles-PfCRT.star", root=DRGN, check_images=False)
    ref = pickle.load(open(DRGN / "ctf1.pkl", "rb")).astype(np.float64)  # D, Apix, dfU, dfV, dfAng, kV, Cs, Q0, phase
    c = ps.data.ctf
    assert ps.record.pixel_size_A == pytest.approx(ref[0, 1], rel=1e-6)  # 1e4 * 1.035 / 10000
    np.testing.assert_allclose(c.defocus_u_A, ref[:, 2], rtol=1e-6)
    np.testing.assert_allclose(c.defocus_v_A, ref[:, 3], rtol=1e-6)
    np.testing.assert_allclose(c.defocus_angle_deg, ref[:, 4], rtol=1e-6)
    np.testing.assert_allclose(c.voltage_kv, ref[:, 5], rtol=1e-6)
    np.testing.assert_allclose(c.cs_mm, ref[:, 6], rtol=1e-6)
    np.testing.assert_allclose(c.phase_shift_deg, ref[:, 8], atol=1e-6)
    # the file has no rlnAmplitudeContrast; ctf1.pkl was made with cryoDRGN's override -w 0.1, whereas RELION's
    # CTF::readValue default is 0 (that is what RELION itself would use)
    assert np.all(c.amp_contrast == 0.0)
    assert np.all(c.bfactor == 0.0) and np.all(c.scale == 1.0)


def test_missing_stack_is_named():
    with pytest.raises(StarFileError) as exc:
        read_particles_star(DRGN / "FinalRefinement-OriginalParticles-PfCRT.star", root=DRGN, check_images=True)
    msg = str(exc.value)
    assert "FinalRefinement-OriginalParticles-PfCRT.star" in msg
    assert "Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs" in msg
    assert "particle 1 (line 28)" in msg  # first data row of the file is line 28


# --------------------------------------------------------------------------------------------------
# RELION 3.1 (two blocks, both orders)


@pytest.mark.parametrize("name", ["relion31.star", "relion31.v2.star"])
def test_relion31_metadata(name):
    ps = read_particles_star(DRGN / name, root=DRGN, check_images=False)
    r = ps.record
    assert (r.relion_format, r.version, r.n_particles, r.box) == ("3.1", 30001, 5, 256)
    assert r.pixel_size_A == pytest.approx(2.806)
    # literal values of particle 1 (rows of the file)
    rot = relion_matrix(np.array([-102.30296]), np.array([82.318041]), np.array([124.706463]))[0]
    np.testing.assert_allclose(ps.data.rot[0], rot, atol=1e-6)
    np.testing.assert_allclose(ps.data.shift_px[0], [0.019324 / 2.806, -0.64686 / 2.806], rtol=1e-5)
    np.testing.assert_allclose(ps.data.shift_px[3], [-0.00755 / 2.806, -0.33640 / 2.806], rtol=1e-5)
    c = ps.data.ctf
    assert (c.defocus_u_A[0], c.defocus_v_A[0], c.defocus_angle_deg[0]) == (13108.082418, 12845.582418, -160.39)
    # from the optics group
    assert np.all(c.voltage_kv == 300) and np.all(c.cs_mm == 0.01) and np.all(c.amp_contrast == 0.1)


def test_relion31_block_order_does_not_matter():
    a = read_particles_star(DRGN / "relion31.star", root=DRGN, check_images=False).data
    b = read_particles_star(DRGN / "relion31.v2.star", root=DRGN, check_images=False).data
    np.testing.assert_array_equal(a.rot, b.rot)
    np.testing.assert_array_equal(a.shift_px, b.shift_px)
    np.testing.assert_array_equal(a.ctf.take(np.arange(5)), b.ctf.take(np.arange(5)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # relion31.mrcs has a non-standard MRC header
def test_relion31_images_are_one_based():
    ps = read_particles_star(DRGN / "relion31.star", root=DRGN, check_images=True)
    with mrcfile.open(DRGN / "relion31.mrcs", permissive=True) as m:
        stack = np.asarray(m.data)
    imgs = ps.data.images.read(np.array([4, 0, 2]))  # "000005@", "000001@", "000003@"
    np.testing.assert_array_equal(imgs, stack[[4, 0, 2]])


# --------------------------------------------------------------------------------------------------
# RELION 5


def test_relion5_metadata_and_images():
    ps = read_particles_star(DRGN / "relion5.star", root=DRGN / "toy_datadir", check_images=False)
    r = ps.record
    assert (r.version, r.n_particles, r.box, r.pixel_size_A) == (50001, 17, 448, 0.89)
    assert any("beam tilt" in w for w in r.warnings)
    c = ps.data.ctf
    assert np.all(c.voltage_kv == 100) and np.all(c.cs_mm == 1.6) and np.all(c.amp_contrast == 0.1)
    # particle 2: psi -161.73962, rot 115.116882, tilt 125.238004, origin (1.259694, 2.626956) Å
    np.testing.assert_allclose(ps.data.rot[1], relion_matrix(np.array([115.116882]), np.array([125.238004]),
                                                             np.array([-161.73962]))[0], atol=1e-6)
    np.testing.assert_allclose(ps.data.shift_px[1], [1.259694 / 0.89, 2.626956 / 0.89], rtol=1e-6)
    # image names "2@toy_images_b.mrcs", "1@toy_images_a.mrcs" (row 12), resolved against the given root
    with mrcfile.open(DRGN / "toy_datadir" / "toy_images_b.mrcs", permissive=True) as m:
        b = np.asarray(m.data)
    with mrcfile.open(DRGN / "toy_datadir" / "toy_images_a.mrcs", permissive=True) as m:
        a = np.asarray(m.data)
    got = ps.data.images.read(np.array([1, 11]))
    np.testing.assert_array_equal(got[0], b[1])
    np.testing.assert_array_equal(got[1], a[0])


def test_relion5_box_mismatch_with_stack_is_an_error():
    # the toy stacks hold 30x30 images while data_optics says rlnImageSize 448
    with pytest.raises(StarFileError, match=r"relion5\.star: rlnImageSize is 448 .* 30x30"):
        read_particles_star(DRGN / "relion5.star", root=DRGN / "toy_datadir", check_images=True)


# --------------------------------------------------------------------------------------------------
# several optics groups


def _subset_star(tmp_path: Path, groups: set[int]) -> Path:
    """Copy of relion31.6opticsgroups.star keeping only particles of ``groups`` (plain text filter)."""
    src = (DRGN / "relion31.6opticsgroups.star").read_text().splitlines()
    out, in_particles = [], False
    for line in src:
        if line.startswith("data_particles"):
            in_particles = True
        f = line.split()
        if in_particles and len(f) == 23 and int(f[10]) not in groups:
            continue
        out.append(line)
    p = tmp_path / "subset.star"
    p.write_text("\n".join(out) + "\n")
    return p


def test_six_optics_groups_with_different_pixel_sizes_error():
    with pytest.raises(StarFileError) as exc:
        read_particles_star(DRGN / "relion31.6opticsgroups.star", check_images=False)
    msg = str(exc.value)
    assert "relion31.6opticsgroups.star" in msg and "pixel size" in msg
    assert "1.25 Å in groups 1 (opticsGroup5, 48 particles), 3 (opticsGroup2, 5 particles), 4 (opticsGroup1" in msg
    assert "1.24 Å in groups 2 (opticsGroup3, 29 particles), 5 (opticsGroup4, 26 particles)" in msg


def test_consistent_optics_subset_loads(tmp_path):
    ps = read_particles_star(_subset_star(tmp_path, {1, 3, 4, 6}), check_images=False)
    assert ps.record.n_particles == 48 + 5 + 7 + 24
    assert (ps.record.pixel_size_A, ps.record.box) == (1.25, 196)
    assert [g.number for g in ps.record.optics_groups] == [1, 3, 4, 6]
    grp = ps.data.meta["optics_group"]
    # Cs falls back to each particle's own optics group: group 4 has 2.6 mm, the others 2.7 mm
    np.testing.assert_array_equal(ps.data.ctf.cs_mm, np.where(grp == 4, 2.6, 2.7))
    assert np.all(ps.data.ctf.voltage_kv == 200)
    # particle 1 of the file: group 6, origin (13.284554, -3.21701) Å at 1.25 Å/px
    np.testing.assert_allclose(ps.data.shift_px[0], [13.284554 / 1.25, -3.21701 / 1.25], rtol=1e-6)
    ps2 = read_particles_star(_subset_star(tmp_path, {2, 5}), check_images=False)
    assert ps2.record.pixel_size_A == 1.24 and ps2.record.n_particles == 55


def test_optics_group_missing_is_named(tmp_path):
    text = (DRGN / "relion31.star").read_text().replace("000003@relion31.mrcs            1",
                                                        "000003@relion31.mrcs            7")
    p = tmp_path / "bad.star"
    p.write_text(text)
    with pytest.raises(StarFileError, match=r"bad\.star: particle 3 \(line 52\): rlnOpticsGroup 7 is not defined"):
        read_particles_star(p, root=DRGN)


# --------------------------------------------------------------------------------------------------
# real images: EMPIAR-10076, RELION 3.0 format


def test_empiar_10076_images_load_and_match_stack(tmp_path):
    ps = read_particles_star(CSPARC / "empiar_10076_7.star", root=CSPARC, check_images=True)
    with mrcfile.open(CSPARC / "empiar_10076_7.mrc", permissive=True) as m:
        stack = np.asarray(m.data)
    assert stack.shape == (7, 320, 320) and ps.record.box == 320 and len(ps.data) == 7
    np.testing.assert_array_equal(ps.data.images.read(np.arange(7)), stack)
    assert ps.record.pixel_size_A == pytest.approx(5 * 1e4 / 38168)
    assert ps.data.rot is None and ps.data.shift_px is None
    c = ps.data.ctf
    assert c.defocus_u_A[2] == 15150.7 and c.defocus_v_A[2] == 14766.0 and c.defocus_angle_deg[2] == 5.28
    assert np.all(c.amp_contrast == 0.07) and np.all(c.voltage_kv == 300) and np.all(c.cs_mm == 2.7)
    # relative image paths are resolved against the project directory, not the STAR file's folder
    shutil.copy(CSPARC / "empiar_10076_7.star", tmp_path / "p.star")
    with pytest.raises(StarFileError, match="empiar_10076_7.mrc"):
        read_particles_star(tmp_path / "p.star", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# errors name file, particle, line, column


def _edit(tmp_path: Path, old: str, new: str, src: str = "relion31.star") -> Path:
    text = (DRGN / src).read_text()
    assert old in text
    p = tmp_path / "edited.star"
    p.write_text(text.replace(old, new, 1))
    return p


def test_unparsable_image_name(tmp_path):
    p = _edit(tmp_path, "000002@relion31.mrcs", "two@relion31.mrcs")
    with pytest.raises(StarFileError, match=r"edited\.star: particle 2 \(line 51\): rlnImageName 'two@relion31"):
        read_particles_star(p, root=DRGN, check_images=False)
    p = _edit(tmp_path, "000004@relion31.mrcs", "relion31.mrcs")
    with pytest.raises(StarFileError, match=r"particle 4 \(line 53\).*NNNNNN@stack"):
        read_particles_star(p, root=DRGN, check_images=False)


def test_non_numeric_value_names_column(tmp_path):
    p = _edit(tmp_path, "12730.825404", "abc")
    with pytest.raises(StarFileError, match=r"particle 3 \(line 52\): column rlnDefocusU .* 'abc'"):
        read_particles_star(p, root=DRGN, check_images=False)


def test_missing_columns(tmp_path):
    p = _edit(tmp_path, "_rlnImageName #22", "_rlnImageNameX #22")
    with pytest.raises(StarFileError, match="no rlnImageName column"):
        read_particles_star(p, root=DRGN, check_images=False)
    p = _edit(tmp_path, "_rlnAngleTilt #14", "_rlnSomethingElse #14")
    with pytest.raises(StarFileError, match="rlnAngleRot, rlnAnglePsi but not rlnAngleTilt"):
        read_particles_star(p, root=DRGN, check_images=False)
    p = _edit(tmp_path, "_rlnImagePixelSize #6", "_rlnPixelSizeX #6")
    with pytest.raises(StarFileError, match="data_optics has no rlnImagePixelSize"):
        read_particles_star(p, root=DRGN, check_images=False)
    with pytest.raises(StarFileError, match="STAR file not found"):
        read_particles_star(tmp_path / "nope.star")


def test_ctf_defaults_when_columns_absent(tmp_path):
    df = starfile.read(DRGN / "relion31.star", always_dict=True)
    parts = df["particles"].drop(columns=["rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor",
                                          "rlnPhaseShift"])
    optics = df["optics"].drop(columns=["rlnAmplitudeContrast"])
    p = tmp_path / "min.star"
    starfile.write({"optics": optics, "particles": parts}, p)
    c = read_particles_star(p, root=DRGN, check_images=False).data.ctf
    np.testing.assert_array_equal(c.defocus_v_A, c.defocus_u_A)
    assert np.all(c.defocus_angle_deg == 0) and np.all(c.bfactor == 0) and np.all(c.scale == 1)
    assert np.all(c.phase_shift_deg == 0) and np.all(c.amp_contrast == 0)


# --------------------------------------------------------------------------------------------------
# writing


def test_write_back_keeps_every_column_and_adds_results(tmp_path):
    ps = read_particles_star(DRGN / "relion31.star", root=DRGN, check_images=False)
    z = np.arange(10, dtype=np.float32).reshape(5, 2) / 7
    out = ps.write(tmp_path / "out.star", latents=z, labels=np.array([0, 1, 0, 2, 1]))
    text = out.read_text()
    assert text.count("# version 30001") == 2
    orig = starfile.read(DRGN / "relion31.star", always_dict=True)
    new = starfile.read(out, always_dict=True)
    pd.testing.assert_frame_equal(new["optics"], orig["optics"], check_dtype=False)
    cols = list(orig["particles"].columns)
    assert list(new["particles"].columns) == cols + ["rlnCryoformerZ1", "rlnCryoformerZ2"]
    expect = orig["particles"].copy()
    expect["rlnClassNumber"] = [1, 2, 1, 3, 2]
    pd.testing.assert_frame_equal(new["particles"][cols], expect, check_dtype=False, rtol=1e-9)
    np.testing.assert_allclose(new["particles"][["rlnCryoformerZ1", "rlnCryoformerZ2"]].to_numpy(), z, rtol=1e-7)


def test_write_back_keeps_input_format(tmp_path):
    ps = read_particles_star(DRGN / "FinalRefinement-OriginalParticles-PfCRT.star", check_images=False)
    text = ps.write(tmp_path / "o30.star", latents=np.ones((5, 1))).read_text()
    assert "# version" not in text and "data_images" in text and "data_optics" not in text
    assert "_rlnOriginX #" in text
    back = read_particles_star(tmp_path / "o30.star", root=DRGN, check_images=False)
    np.testing.assert_allclose(back.data.rot, ps.data.rot, atol=1e-7)
    ps5 = read_particles_star(DRGN / "relion5.star", check_images=False)
    text5 = ps5.write(tmp_path / "o5.star").read_text()
    assert text5.count("# version 50001") == 2 and "30001" not in text5
    # optics columns with list values survive verbatim
    assert "[0.0680480107376,0.0982451014894,-1.79877045848,0,0,-1.36333410593]" in text5


def test_rerun_replaces_old_latent_columns():
    df = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnCryoformerZ1": [1.0, 2.0],
                       "rlnCryoformerZ2": [1.0, 2.0], "rlnCryoformerZ3": [1.0, 2.0]})
    out = add_result_columns(df, latents=np.zeros((2, 2)), labels=np.array([1, 0]))
    assert list(out.columns) == ["rlnImageName", "rlnCryoformerZ1", "rlnCryoformerZ2", "rlnClassNumber"]
    assert out["rlnClassNumber"].tolist() == [2, 1]


def test_failed_write_leaves_old_file(tmp_path):
    target = tmp_path / "p.star"
    target.write_text("old")
    bad = pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnDefocusU": [np.nan]})
    with pytest.raises(ValueError, match="rlnDefocusU"):
        write_particles_star(target, None, bad, version=None)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.star"]


def test_simulated_star_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 9
    rot = random_rotations(n, rng)
    shift = rng.normal(0, 2, (n, 2))
    ctf = CTFParams.constant(n, defocus_u_A=rng.uniform(8000, 20000, n), defocus_v_A=rng.uniform(8000, 20000, n),
                             defocus_angle_deg=rng.uniform(-90, 90, n), voltage_kv=300, cs_mm=2.7,
                             amp_contrast=0.07, bfactor=10.0)
    truez = rng.normal(size=(n, 2))
    p = write_simulated_star(tmp_path / "sim.star", rot=rot, shift_px=shift, ctf=ctf, pixel_size_A=2.5, box=32,
                             stack_path="Simulated/particles.mrcs", extra_columns={"rlnCryoformerTrueZ": truez})
    raw = starfile.read(p, always_dict=True)
    parts = raw["particles"]
    assert parts["rlnImageName"].iloc[3] == "000004@Simulated/particles.mrcs"
    # the Euler angles written mean the same rotation under SciPy's (independent) RELION convention
    m = relion_matrix(parts["rlnAngleRot"].to_numpy(), parts["rlnAngleTilt"].to_numpy(),
                      parts["rlnAnglePsi"].to_numpy())
    np.testing.assert_allclose(m, rot, atol=1e-7)
    np.testing.assert_allclose(parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), shift * 2.5, rtol=1e-8)
    np.testing.assert_allclose(parts[["rlnCryoformerTrueZ1", "rlnCryoformerTrueZ2"]].to_numpy(), truez, rtol=1e-8)
    assert raw["optics"]["rlnImagePixelSize"].iloc[0] == 2.5 and raw["optics"]["rlnImageSize"].iloc[0] == 32
    assert parts["rlnRandomSubset"].tolist() == [1, 2] * 4 + [1]
    back = read_particles_star(p, root=tmp_path, check_images=False)
    np.testing.assert_allclose(back.data.ctf.take(np.arange(n)), ctf.take(np.arange(n)), rtol=1e-6)
    assert np.all(back.data.ctf.amp_contrast == 0.07)


def test_premultiplied_particles_are_refused(tmp_path):
    p = _edit(tmp_path, "            2            0     0.043489", "            2            1     0.043489",
              src="relion5.star")
    with pytest.raises(StarFileError, match=r"edited\.star: optics group\(s\) 1 have rlnCtfDataAreCtfPremultiplied"):
        read_particles_star(p, check_images=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_image_number_beyond_stack(tmp_path):
    p = _edit(tmp_path, "000005@relion31.mrcs", "000006@relion31.mrcs")
    with pytest.raises(StarFileError, match=r"edited\.star: .*relion31\.mrcs: particle refers to image 6 \(1-based\) "
                                            r"but the stack holds 5"):
        read_particles_star(p, root=DRGN, check_images=True)
