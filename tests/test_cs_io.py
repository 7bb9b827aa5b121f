"""cryoSPARC .cs <-> engine data (cryoformer_ext.formats.cs), checked on real cryoSPARC files.

Oracles are independent of this code: cryoDRGN's expected parser outputs for the same file
(``pose.cs.pkl``, ``ctf2.pkl``), the RELION STAR of the same seven particles read by the RELION path,
and the raw MRC stack.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml
from cryosparc.dataset import Dataset

from cryoformer.poses import random_rotations, rotation_angle_deg
from cryoformer_ext.formats import cs as cs_io
from cryoformer_ext.formats.cs import CsInputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CS = DATA / "cryosparc"
DRGN = DATA / "cryodrgn"
P12 = CS / "cryosparc_P12_J24_001_particles.cs"
J2 = CS / "cryosparc_J2_particles_exported.cs"
EMPIAR_CS = CS / "empiar_10076_7.cs"
EMPIAR_STAR = CS / "empiar_10076_7.star"
EMPIAR_MRC = CS / "empiar_10076_7.mrc"


def sparse_stacks(dset: Dataset, root: Path) -> None:
    """Create every stack ``dset`` refers to as a sparse MRC file (right shape, no data written)."""
    paths = np.array([cs_io.strip_export_prefix(p)[0] for p in dset["blob/path"]], dtype=object)
    box = int(np.asarray(dset["blob/shape"])[0][0])
    for rel in np.unique(paths):
        n = int(np.asarray(dset["blob/idx"])[paths == rel].max()) + 1
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new_mmap(f, shape=(n, box, box), mrc_mode=2, overwrite=True):
            pass


@pytest.fixture(scope="module")
def p12(tmp_path_factory):
    root = tmp_path_factory.mktemp("P12")
    dset = cs_io.load_cs(P12)
    sparse_stacks(dset, root)
    return dset, root, cs_io.particles_from_dataset(dset, root, source="P12")


# ---- poses, shifts, CTF: the real 2019-particle refinement output against cryoDRGN's expected output ----

def test_p12_poses_equal_cryodrgn_pose_pkl(p12):
    dset, _, parts = p12
    with open(DRGN / "pose.cs.pkl", "rb") as fh:
        rot_ref, trans_ref = pickle.load(fh)
    data = parts.data
    assert data.rot.shape == (2019, 3, 3)
    np.testing.assert_allclose(data.rot, rot_ref, atol=1e-6, rtol=0)  # float32 rounding only
    np.testing.assert_allclose(trans_ref * 180, data.shift_px, atol=1e-4, rtol=0)
    # same shifts, same sign as the file (both pixel sizes are 2.95 here)
    np.testing.assert_allclose(data.shift_px, dset["alignments3D/shift"], atol=1e-6)


def test_p12_ctf_equals_cryodrgn_ctf_pkl(p12):
    _, _, parts = p12
    with open(DRGN / "ctf2.pkl", "rb") as fh:
        ref = pickle.load(fh)  # D, Apix, df1, df2, angle deg, kV, Cs, Q0, phase deg
    d, c = parts.data, parts.data.ctf
    ours = np.stack([np.full(len(c), d.box), np.full(len(c), d.pixel_size_A), c.defocus_u_A, c.defocus_v_A,
                     c.defocus_angle_deg, c.voltage_kv, c.cs_mm, c.amp_contrast, c.phase_shift_deg], axis=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)
    # fields the P12 file does not have take RELION's defaults
    assert np.all(c.bfactor == 0) and np.all(c.scale == 1)


def test_p12_meta_and_stacks(p12):
    dset, root, parts = p12
    assert len(parts.stack_files) == 50 and all(root in p.parents for p in parts.stack_files)
    assert parts.data.box == 180 and parts.data.pixel_size_A == pytest.approx(2.95)
    np.testing.assert_array_equal(parts.data.meta["uid"], dset["uid"])
    assert parts.dataset is dset
    assert parts.warnings == []


def test_shift_uses_alignment_pixel_size():
    """alignments3D/shift is in pixels at alignments3D/psize_A: 2x coarser alignment -> 2x the blob pixels."""
    d = cs_io.load_cs(P12).take(np.arange(5))
    d["alignments3D/psize_A"][:] = 5.9  # blob/psize_A stays 2.95
    rot, shift_px = cs_io.poses_from_dataset(d, 2.95)
    np.testing.assert_allclose(shift_px, 2.0 * np.asarray(d["alignments3D/shift"]), rtol=1e-6)


def test_pose_fields_round_trip():
    rng = np.random.default_rng(0)
    rot = random_rotations(200, rng)
    shift = rng.normal(scale=5, size=(200, 2))
    f = cs_io.poses_to_fields(rot, shift, blob_psize_A=1.0, align_psize_A=2.0)
    d = Dataset.allocate(200, [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                               ("alignments3D/psize_A", "<f4")])
    for k, v in f.items():
        d[k][:] = v
    rot2, shift2 = cs_io.poses_from_dataset(d, 1.0)
    assert rotation_angle_deg(rot, rot2).max() < 1e-3
    np.testing.assert_allclose(shift2, shift, atol=1e-5)
    np.testing.assert_allclose(f["alignments3D/shift"], shift / 2.0, atol=1e-5)


# ---- images: blob/idx is 0-based; .cs and RELION STAR paths agree on the same 7 particles -----------------

def test_empiar_images_are_the_stack_in_blob_idx_order():
    d = cs_io.load_cs(EMPIAR_CS)
    parts = cs_io.particles_from_dataset(d, CS)
    with mrcfile.open(EMPIAR_MRC, permissive=True) as m:
        raw = np.asarray(m.data, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(d["blob/idx"]), np.arange(7))
    np.testing.assert_array_equal(parts.data.images.read(np.arange(7)), raw)
    np.testing.assert_array_equal(parts.data.images.read(np.array([6, 0, 3])), raw[[6, 0, 3]])
    assert parts.data.rot is None and parts.data.shift_px is None  # an import: no poses
    assert np.all(parts.data.meta["blob_sign"] == -1)  # recorded, not applied


def test_empiar_cs_and_star_paths_agree():
    from cryoformer_ext.formats.star import read_particles_star

    cs_data = cs_io.particles_from_dataset(cs_io.load_cs(EMPIAR_CS), CS).data
    star_data = read_particles_star(EMPIAR_STAR, root=CS).data
    idx = np.arange(7)
    np.testing.assert_array_equal(cs_data.images.read(idx), star_data.images.read(idx))
    assert cs_data.box == star_data.box == 320
    assert cs_data.pixel_size_A == pytest.approx(star_data.pixel_size_A, rel=1e-5)
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm", "amp_contrast",
                 "phase_shift_deg", "bfactor", "scale"):
        np.testing.assert_allclose(getattr(cs_data.ctf, name), getattr(star_data.ctf, name), rtol=1e-5, atol=1e-3,
                                   err_msg=name)


# ---- exported results: '>' paths, alignments2D only ------------------------------------------------------

def test_exported_paths_strip_gt_and_resolve(tmp_path):
    d = cs_io.load_cs(J2)
    assert all(str(p).startswith(">") for p in d["blob/path"])
    sparse_stacks(d, tmp_path / "project")
    parts = cs_io.particles_from_dataset(d, tmp_path / "project")
    assert all(p.is_relative_to(tmp_path / "project" / "J1" / "imported") for p in parts.stack_files)
    assert parts.data.rot is None  # alignments2D is not a 3D pose
    assert parts.data.box == 300
    # a '>' path missing in the project directory is found beside the .cs it came from (an export folder)
    sparse_stacks(d, tmp_path / "export")
    parts2 = cs_io.particles_from_dataset(d, tmp_path / "nowhere", export_dir=tmp_path / "export")
    assert all(p.is_relative_to(tmp_path / "export") for p in parts2.stack_files)


def test_resolve_blob_path_rules(tmp_path):
    assert cs_io.resolve_blob_path("J3/a.mrc", "/p") == Path("/p/J3/a.mrc")
    assert cs_io.resolve_blob_path(">J3/a.mrc", "/p") == Path("/p/J3/a.mrc")
    assert cs_io.resolve_blob_path(">>x.mrc", "/p") == Path("/p/>x.mrc")  # only one '>' is stripped
    assert cs_io.strip_export_prefix(b">a.mrcs") == ("a.mrcs", True)


# ---- errors: specific messages ------------------------------------------------------------------------------

def test_missing_stack_file(tmp_path):
    shutil.copy(EMPIAR_CS, tmp_path / "p.cs")
    with pytest.raises(CsInputError, match=r"particle stack file not found: .*empiar_10076_7\.mrc.*blob/path "
                                           r"'empiar_10076_7\.mrc'.*project directory"):
        cs_io.particles_from_dataset(cs_io.load_cs(tmp_path / "p.cs"), tmp_path, source="p.cs")


def test_missing_cs_file(tmp_path):
    with pytest.raises(CsInputError, match="particle .cs file not found"):
        cs_io.load_cs(tmp_path / "nope.cs")


def test_no_ctf_fields():
    d = cs_io.load_cs(EMPIAR_CS)
    d.drop_fields([f for f in d.fields() if f.startswith("ctf/")])
    with pytest.raises(CsInputError, match=r"no CTF parameters \(missing ctf/df1_A"):
        cs_io.particles_from_dataset(d, CS)


def test_mixed_box_sizes():
    d = cs_io.load_cs(P12)
    d["blob/shape"][:7] = [200, 200]
    with pytest.raises(CsInputError, match=r"mixed box sizes: 180 px \(2012 particles\), 200 px \(7 particles\)"):
        cs_io.particles_from_dataset(d, CS)


def test_blob_shape_disagrees_with_stack():
    d = cs_io.load_cs(EMPIAR_CS)
    d["blob/shape"][:] = [256, 256]
    with pytest.raises(CsInputError, match="blob/shape says 256 px but the stack files hold 320 px"):
        cs_io.particles_from_dataset(d, CS)


def test_index_out_of_range():
    d = cs_io.load_cs(EMPIAR_CS)
    d["blob/idx"][3] = 7
    with pytest.raises(CsInputError, match=r"image 8 \(1-based\) but the stack holds 7"):
        cs_io.particles_from_dataset(d, CS)


def test_empty_and_not_particles():
    with pytest.raises(CsInputError, match="no rows"):
        cs_io.particles_from_dataset(cs_io.load_cs(P12).take(np.arange(0)), CS)
    with pytest.raises(CsInputError, match="not a particle image dataset"):  # real schema, no blob slot
        cs_io.particles_from_dataset(cs_io.load_cs(CS / "4k_dataset.cs"), CS)
    v = cs_io.volume_dataset("x.mrc", (4, 4, 4), 1.0)
    with pytest.raises(CsInputError, match="not a particle image dataset"):
        cs_io.particles_from_dataset(v, CS)


def test_mixed_pixel_sizes():
    d = cs_io.load_cs(EMPIAR_CS)
    d["blob/psize_A"][0] = 2.0
    with pytest.raises(CsInputError, match=r"different pixel sizes"):
        cs_io.particles_from_dataset(d, CS)


def test_unmodelled_ctf_terms_warn():
    d = cs_io.load_cs(EMPIAR_CS)
    assert cs_io.unmodelled_ctf_terms(d) == []
    d["ctf/tilt_A"][0] = [0.5, 0.0]
    parts = cs_io.particles_from_dataset(d, CS)
    assert any("ctf/tilt_A" in w for w in parts.warnings)


# ---- writing --------------------------------------------------------------------------------------------------

def test_add_components_keeps_every_input_field(tmp_path):
    d = cs_io.load_cs(P12)
    z = np.random.default_rng(1).normal(size=(len(d), 3)).astype(np.float32)
    out = cs_io.add_components(d, z)
    path = cs_io.save_dataset(tmp_path / "out.cs", out)
    back = Dataset.load(path)
    for f in d.fields():
        np.testing.assert_array_equal(back[f], d[f], err_msg=f)
    for k in range(3):
        np.testing.assert_array_equal(back[f"components_mode_{k}/component"], k)
        np.testing.assert_array_equal(back[f"components_mode_{k}/value"], z[:, k])
    assert len(d.fields()) == 34 and len(back.fields()) == 34 + 6  # input untouched, 2 fields per dimension


def test_fill_components_follows_given_dtypes():
    d = Dataset.allocate(4, [("components_mode_0/component", "<u2"), ("components_mode_0/value", "<f8")])
    cs_io.fill_components(d, np.array([[0.5], [1.5], [-2.0], [3.25]]))
    assert d["components_mode_0/value"].dtype == np.float64 and d["components_mode_0/component"].dtype == np.uint16
    np.testing.assert_array_equal(d["components_mode_0/value"], [0.5, 1.5, -2.0, 3.25])
    with pytest.raises(ValueError, match="no field components_mode_1/component"):
        cs_io.fill_components(d, np.zeros((4, 2)))


def test_volume_dataset_and_group(tmp_path):
    v = cs_io.volume_dataset(">maps/consensus.mrc", (64, 64, 64), 2.5)
    cs_path, csg_path = cs_io.write_group(tmp_path, "vol", v, group_name="volume_consensus", group_type="volume",
                                          title="consensus")
    back = Dataset.load(cs_path)
    assert back["map/path"][0] == ">maps/consensus.mrc"
    np.testing.assert_array_equal(back["map/shape"][0], [64, 64, 64])
    assert back["map/psize_A"][0] == pytest.approx(2.5)
    doc = yaml.safe_load(csg_path.read_text())
    assert doc["group"] == {"description": "", "name": "volume_consensus", "title": "consensus", "type": "volume"}
    assert doc["results"] == {"map": {"metafile": ">vol.cs", "num_items": 1, "type": "volume.blob"}}


def test_slot_helpers():
    assert cs_io.component_slots(2) == [{"name": "components_mode_0", "dtype": "components"},
                                        {"name": "components_mode_1", "dtype": "components"}]
    assert cs_io.slot_dtype("components_mode_7") == "components"
    assert cs_io.slot_dtype("alignments3D") == "alignments3D"
    assert cs_io.output_name("pc1_01") == "volume_pc1_01"
    assert cs_io.output_name("a b-c") == "volume_a_b_c"
    assert cs_io.dataset_slots(cs_io.load_cs(P12)) == ["blob", "ctf", "alignments3D"]
