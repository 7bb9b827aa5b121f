"""The benchmark suite's generators: is each dataset's ground truth what its images and its description say?

References are independent of the generators: the project's original hinge (``true_volume``,
``analytic_projection``), trilinear projection of the true maps (``project_volume``), RELION's
``relion_project``, closed-form Gaussian masses, and a DCD writer written here from the format.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.suite.atomic import atomic_volume, kabsch, read_dcd, read_psf_atoms
from bench.suite.kinds import ALL_BLOB_KINDS, ASSEMBLY, CONTINUOUS, HINGE, TWO_MOTIONS, SIGMA_FRAC
from cryoformer.simulate import (analytic_projection, blob_model, blob_projection, blob_volume,
                                 random_acquisition, true_volume)

BOX = 32


def _gauss_mass(amp: float, box: int) -> float:
    sigma = max(SIGMA_FRAC * box, 1.0)
    return amp * (2 * math.pi * sigma * sigma) ** 1.5


def test_general_blob_renderer_reproduces_the_project_hinge():
    rot = random_acquisition(3, np.random.default_rng(0)).rot
    for t in (0.0, 0.4, 1.0):
        cen, amp, sig = blob_model(t, BOX)
        assert np.allclose(blob_volume(cen, amp, sig, BOX), true_volume(t, BOX), atol=1e-5)
        for r in rot:
            assert np.allclose(blob_projection(cen, amp, sig, r, BOX), analytic_projection(t, r, BOX), atol=1e-4)


def _near_moving_blobs(kind, box: int, radius_sigmas: float = 3.5) -> np.ndarray:
    """Voxels within a few widths of where any moving blob is, in any state."""
    from cryoformer.lattice import centered_coords

    c = centered_coords(box).numpy()
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1)
    near = np.zeros((box,) * 3, bool)
    r = radius_sigmas * max(SIGMA_FRAC * box, 1.0)
    for s in kind.state_coords():
        cen, _ = kind.blobs(s)
        for p in cen[kind.moving_blobs()] * box:
            near |= ((pts - p) ** 2).sum(-1) <= r * r
    return near


@pytest.mark.parametrize("letter", ["a", "b", "c", "d", "h", "i", "j"])
def test_states_differ_only_where_the_generator_says_something_moves(letter):
    kind = ALL_BLOB_KINDS[letter]
    vols = np.stack([kind.volume(s, BOX) for s in kind.state_coords()])
    spread = vols.std(0)
    near = _near_moving_blobs(kind, BOX)
    assert spread[~near].max() < 0.01 * spread.max()          # the body is the same in every state
    assert spread[near].max() > 0.1 * vols.max()             # and the states do differ


def test_assembly_states_differ_by_their_subunits_mass():
    box = 48
    refs = ASSEMBLY.state_coords()
    mass = [ASSEMBLY.volume(s, box).sum() for s in refs]
    for i, present in enumerate(ASSEMBLY.assembly):
        expected = sum(_gauss_mass(a, box) for k in present for a in ASSEMBLY.subunits[k][1])
        assert mass[i] - mass[0] == pytest.approx(expected, rel=2e-3)
    assert len(set(ASSEMBLY.assembly)) == len(ASSEMBLY.assembly) and 4 <= len(refs) <= 8


def test_hinge_domain_is_between_10_and_20_percent_of_the_mass():
    box = 48
    whole = HINGE.volume(np.array([0.5]), box).sum()
    arm = HINGE.arms[0]
    arm_mass = blob_volume(arm.at(np.array([0.5])) * box, arm.amps, SIGMA_FRAC * box, box).sum()
    assert 0.10 <= arm_mass / whole <= 0.20


def test_two_motions_are_independent():
    """Changing t1 moves only the first domain, changing t2 only the second."""
    v = {c: TWO_MOTIONS.volume(np.array(c), BOX) for c in [(0.1, 0.1), (0.9, 0.1), (0.1, 0.9)]}
    d1 = np.abs(v[(0.9, 0.1)] - v[(0.1, 0.1)])
    d2 = np.abs(v[(0.1, 0.9)] - v[(0.1, 0.1)])
    assert d1.max() > 0.1 and d2.max() > 0.1
    assert (d1 * d2).sum() < 0.02 * min((d1 * d1).sum(), (d2 * d2).sum())   # disjoint regions


def test_continuous_kind_samples_uniform_coordinates_and_bins_them():
    coords, states = CONTINUOUS.sample(4000, np.random.default_rng(0))
    hist = np.bincount(states, minlength=CONTINUOUS.bins)
    assert len(np.unique(coords)) == 4000 and hist.min() > 300
    assert np.all(np.abs(coords[:, 0] - CONTINUOUS.state_coords()[states, 0]) <= 0.5 / CONTINUOUS.bins + 1e-12)


@pytest.mark.parametrize("letter", ["a", "b", "h", "j"])
def test_built_images_show_their_labelled_state(letter):
    """Noise-free built particles match the projection of their own state's true map (an independent
    trilinear projector), better than any other state's."""
    from bench.suite.build import build_blob_dataset
    from cryoformer.render import corrupt, project_volume
    from cryoformer_ext.formats.star import read_particles_star

    with tempfile.TemporaryDirectory() as tmp:
        truth = build_blob_dataset(letter, Path(tmp), 24, BOX, 0.0, seed=3)
        folder = Path(tmp) / truth.key
        star = read_particles_star(folder / "particles.star", folder)
        _assert_images_match_states(star.data, np.load(folder / "truth" / "states.npy"),
                                    [true for true in _truth_maps(folder, truth)], corrupt, project_volume)


def _truth_maps(folder: Path, truth) -> list[np.ndarray]:
    import mrcfile

    return [mrcfile.read(folder / "truth" / m).astype(np.float32) for m in truth.state_maps]


def _assert_images_match_states(data, states, maps, corrupt, project_volume):
    idx = np.arange(len(data))
    imgs = data.images.read(idx)
    ctf = torch.as_tensor(data.ctf.take(idx))
    rot, shift = torch.as_tensor(data.rot), torch.as_tensor(data.shift_px, dtype=torch.float32)
    corr = np.zeros((len(idx), len(maps)))
    for s, m in enumerate(maps):
        proj = corrupt(project_volume(torch.as_tensor(m), rot), data.pixel_size_A, shift, ctf).numpy()
        corr[:, s] = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(imgs, proj)]
    own = corr[idx, states]
    assert own.min() > 0.97
    assert (corr.argmax(1) == states).mean() > 0.9


@pytest.mark.relion
def test_relion_project_renders_what_the_analytic_projection_gives():
    """The atomic kind's projector (RELION) and the project's analytic renderer agree on pose, shift and
    CTF conventions, so poses handed to the methods describe RELION-made images."""
    from bench.suite.relion_render import relion_project_states
    from cryoformer.render import corrupt

    acq = random_acquisition(8, np.random.default_rng(1))
    cen, amp, sig = HINGE.model(BOX)(np.array([0.3]))
    img = relion_project_states(blob_volume(cen, amp, sig, BOX)[None], np.zeros(8, int), acq, 4.0)
    ref = np.stack([blob_projection(cen, amp, sig, r, BOX) for r in acq.rot])
    ref = corrupt(torch.as_tensor(ref), 4.0, torch.as_tensor(acq.shift_px), torch.as_tensor(acq.ctf.take(np.arange(8))))
    for a, b in zip(img, ref.numpy()):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
        assert a.std() / b.std() == pytest.approx(1.0, abs=0.02)


def _write_dcd(path: Path, frames: np.ndarray, endian: str = "<") -> None:
    """A CHARMM DCD written from the format description (records framed by their byte lengths)."""
    def rec(payload: bytes) -> bytes:
        return struct.pack(endian + "i", len(payload)) + payload + struct.pack(endian + "i", len(payload))
    icntrl = [500, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24]   # stale frame count on purpose
    out = rec(b"CORD" + struct.pack(endian + "20i", *icntrl))
    out += rec(struct.pack(endian + "i", 1) + b"test".ljust(80))
    out += rec(struct.pack(endian + "i", frames.shape[1]))
    for f in frames:
        for axis in range(3):
            out += rec(f[:, axis].astype(endian + "f4").tobytes())
    path.write_bytes(out)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_dcd_reader_reads_back_written_frames(endian):
    frames = np.random.default_rng(0).normal(0, 10, (3, 7, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        _write_dcd(Path(tmp) / "t.dcd", frames, endian)
        assert np.allclose(read_dcd(Path(tmp) / "t.dcd"), frames)
        (Path(tmp) / "bad.dcd").write_bytes((Path(tmp) / "t.dcd").read_bytes()[:-10])
        with pytest.raises(ValueError, match="bad.dcd"):
            read_dcd(Path(tmp) / "bad.dcd")


def test_psf_reader_takes_masses_and_residues():
    text = ("PSF\n\n       1 !NTITLE\n* x\n\n       2 !NATOM\n"
            "       1 4AKE 1    MET  N      56  -0.300000       14.0070           0\n"
            "       2 4AKE 122  ARG  CA     22   0.070000       12.0110           0\n\n       0 !NBOND\n")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a.psf").write_text(text)
        masses, resid = read_psf_atoms(Path(tmp) / "a.psf")
    assert masses.tolist() == [14.007, 12.011] and resid.tolist() == [1, 122]


def test_atom_density_holds_the_atoms_mass_and_kabsch_undoes_a_rotation():
    rng = np.random.default_rng(0)
    xyz, masses = rng.normal(0, 8, (50, 3)), rng.uniform(1, 16, 50)
    vol = atomic_volume(xyz, masses, 48, 2.0, sigma_A=2.0)                   # sigma = 1 px
    assert vol.sum() == pytest.approx(masses.sum() * (2 * math.pi) ** 1.5, rel=1e-3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    r, sh = kabsch(xyz @ q.T + 5.0, xyz, masses)
    assert np.allclose((xyz @ q.T + 5.0) @ r.T + sh, xyz, atol=1e-8)


def _adk_files_or_skip() -> Path:
    """The AdK files come with the bench-only MDAnalysisTests package (or its cache); never downloaded here."""
    from bench.suite.build import CACHE

    try:
        from MDAnalysisTests import datafiles  # type: ignore[import-not-found]  # noqa: F401

        return CACHE
    except ImportError:
        if not all((CACHE / f).exists() for f in ("adk.psf", "adk_dims.dcd")):
            pytest.skip("AdK files not present (python bench/suite/build.py --kinds e fetches them)")
        return CACHE


def test_adk_frames_move_the_lid_and_nmp_domains_not_the_core():
    from bench.suite.atomic import adk_frames

    frames, masses, moving = adk_frames(_adk_files_or_skip(), 10)
    step = np.sqrt(((frames[-1] - frames[0]) ** 2).sum(-1))
    core_rmsd, domain_rmsd = np.sqrt((step[~moving] ** 2).mean()), np.sqrt((step[moving] ** 2).mean())
    assert domain_rmsd > 8.0 and core_rmsd < 4.0 and domain_rmsd > 3 * core_rmsd
    assert len(masses) == 3341 and 0.2 < masses[moving].sum() / masses.sum() < 0.4


@pytest.mark.relion
def test_built_atomic_images_show_their_labelled_frame():
    from bench.suite.build import build_atomic_dataset
    from cryoformer.render import corrupt, project_volume
    from cryoformer_ext.formats.star import read_particles_star

    _adk_files_or_skip()
    with tempfile.TemporaryDirectory() as tmp:
        truth = build_atomic_dataset(Path(tmp), 24, BOX, 0.0, seed=2, n_states=4)
        folder = Path(tmp) / truth.key
        star = read_particles_star(folder / "particles.star", folder)
        _assert_images_match_states(star.data, np.load(folder / "truth" / "states.npy"),
                                    _truth_maps(folder, truth), corrupt, project_volume)


def test_fourier_resampling_gives_the_same_molecule_at_another_box():
    from bench.suite.scoring import fourier_resample

    small = fourier_resample(true_volume(0.3, 64), 32)
    assert np.corrcoef(small.ravel(), true_volume(0.3, 32).ravel())[0, 1] > 0.9999
    back = fourier_resample(true_volume(0.3, 32), 64)
    assert np.corrcoef(back.ravel(), true_volume(0.3, 64).ravel())[0, 1] > 0.999


def test_two_dimensional_spearman_finds_each_coordinate_on_some_component():
    from bench.suite.scoring import latent_spearman

    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1, (500, 2))
    mix = np.array([[2.0, 0.3], [-0.4, 1.5]])
    z = np.concatenate([coords @ mix, rng.normal(0, 0.01, (500, 6))], 1)
    assert latent_spearman(z, coords) > 0.85
    assert latent_spearman(rng.normal(size=(500, 8)), coords) < 0.2


def test_headline_times_each_method_to_cryodrgns_final_value():
    from bench.suite.report import headline

    def run(method, values, secs):
        eps = [{"epoch": i + 1, "cum_train_s": s, "spearman": v, "knn_accuracy": v, "moving_corr": v, "fsc_auc": v}
               for i, (v, s) in enumerate(zip(values, secs))]
        return {"method": method, "dataset": "x", "train_box": 32, "epochs": eps}

    rows = headline([run("cryodrgn", [0.2, 0.9, 0.8], [10, 20, 30]), run("cryoformer", [0.5, 0.85, 0.95], [40, 80, 120])])
    row = next(r for r in rows if r["score"] == "spearman")
    assert row["cryodrgn_final"] == 0.8 and row["cryodrgn_s"] == 20 and row["cryoformer_s"] == 80
    assert row["ratio_cryoformer_over_cryodrgn"] == pytest.approx(4.0)
    never = headline([run("cryodrgn", [0.9], [10]), run("cryoformer", [0.5], [5])])[0]
    assert never["cryoformer_s"] is None and never["ratio_cryoformer_over_cryodrgn"] is None


def test_combined_suite_takes_each_method_from_the_last_file_that_has_it(tmp_path):
    """cryoDRGN's run of one comparison beside cryoFormer's run of a later default: the combined file holds
    the later cryoFormer run (not the earlier one), both commands, and a headline timed on the two runs."""
    from bench.suite.report import combine

    def run(method, values, secs):
        eps = [{"epoch": i + 1, "cum_train_s": s, "spearman": v, "knn_accuracy": v, "moving_corr": v, "fsc_auc": v}
               for i, (v, s) in enumerate(zip(values, secs))]
        for e in eps:
            e.update(cv_r2=e["spearman"], epoch_s=10.0, images_per_s=1.0)
        return {"method": method, "dataset": "x", "train_box": 32, "epochs": eps, "threads": 1, "date": "d"}

    first, second = tmp_path / "suite_a.json", tmp_path / "suite_b.json"
    first.write_text(json.dumps({"runs": [run("cryodrgn", [0.2, 0.8], [10, 20]), run("cryoformer", [0.1, 0.5], [30, 60])],
                                 "commands": ["both"]}))
    second.write_text(json.dumps({"runs": [run("cryoformer", [0.9], [15])], "commands": ["later"]}))
    out = tmp_path / "suite_c.json"
    md = combine(out, [first, second])
    res = json.loads(out.read_text())
    assert sorted(r["method"] for r in res["runs"]) == ["cryodrgn", "cryoformer"]
    assert next(r for r in res["runs"] if r["method"] == "cryoformer")["epochs"][0]["cum_train_s"] == 15
    assert res["commands"] == ["both", "later"]
    row = next(r for r in res["headline"] if r["score"] == "spearman")
    assert row["cryoformer_s"] == 15 and row["cryodrgn_s"] == 20
    assert md.exists()
