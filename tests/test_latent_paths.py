"""Latent-space paths and cryoDRGN's pickle formats, checked against cryoDRGN's own recorded results.

The oracle for the graph traversal is cryoDRGN's test suite (``tests/test_graph_traversal.py`` of
ml-struct-bio/cryodrgn): the paths and lengths it asserts for ``cryodrgn graph_traversal`` on its latent
files ``zvals_het-2_1k.pkl`` (2-D) and ``zvals_het-8_4k.pkl`` (8-D), copied into the test fixtures (``data/cryodrgn``).
"""

from __future__ import annotations

import pickle
import re
import pickletools

import numpy as np
import pytest

from cryoformer_ext.formats.cryodrgn import write_ind_pkl, write_z_pkl
from cryoformer_ext.analysis.paths import NoPathError, graph_path, resample_path, straight_line

# (file, anchors, max_neighbors, avg_neighbors) -> (path, total distance, cut-off) as printed by cryoDRGN
CRYODRGN_PATHS = [
    (("zvals_het-2_1k.pkl", 50, 100, 30, 10), ([50, 22, 1310, 1047, 1093, 857, 159, 1215, 157, 1006, 672, 100],
                                               0.8441, 0.1022)),
    (("zvals_het-2_1k.pkl", 50, 100, 50, 20), ([50, 22, 1310, 1047, 1069, 688, 913, 100], 0.808, 0.149)),
    (("zvals_het-8_4k.pkl", 2020, 3030, 10, 5), ([2020, 4117, 1402, 3480, 1106, 3030], 2.409, 0.7912)),
    (("zvals_het-8_4k.pkl", 3030, 4040, 10, 5), ([3030, 3824, 3792, 707, 41, 3210, 2257, 392, 301, 4040], 5.141,
                                                 0.7912)),
]


def _load(shared_data, name):
    with open(shared_data / "cryodrgn" / name, "rb") as fh:
        return pickle.load(fh)


@pytest.mark.parametrize("case, expected", CRYODRGN_PATHS)
def test_graph_path_equals_cryodrgn_graph_traversal(shared_data, case, expected):
    name, a, b, max_n, avg_n = case
    path, total, cutoff = expected
    z = _load(shared_data, name)
    res = graph_path(z, a, b, max_neighbors=max_n, avg_neighbors=avg_n)
    assert res.particles == path
    assert res.length == pytest.approx(total, abs=6e-4)
    assert res.max_edge == pytest.approx(cutoff, abs=6e-4)


@pytest.mark.parametrize("a, b", [(50, 1500), (75, 1300)])
def test_no_path_where_cryodrgn_finds_none(shared_data, a, b):
    z = _load(shared_data, "zvals_het-8_4k.pkl")
    with pytest.raises(NoPathError, match=f"no path from particle {a} to particle {b}"):
        graph_path(z, a, b, max_neighbors=7, avg_neighbors=3)


def _suggested(err) -> float:
    return float(re.search(r"--avg-neighbors ([\d.]+) connects them", str(err.value)).group(1))


def test_no_path_message_names_the_avg_neighbors_that_connects(shared_data):
    z = _load(shared_data, "zvals_het-8_4k.pkl")
    with pytest.raises(NoPathError, match="connects them") as err:
        graph_path(z, 50, 1500, max_neighbors=7, avg_neighbors=3)
    need = _suggested(err)
    assert graph_path(z, 50, 1500, max_neighbors=7, avg_neighbors=need).particles[-1] == 1500
    with pytest.raises(NoPathError):
        graph_path(z, 50, 1500, max_neighbors=7, avg_neighbors=need - 0.02)
    with pytest.raises(NoPathError, match="raise --max-neighbors"):  # two latents far from everything else
        graph_path(np.array([[0.0], [0.1], [0.2], [9.0], [9.1], [9.2]]), 0, 5, max_neighbors=2, avg_neighbors=1)


def test_graph_path_follows_a_curved_distribution_where_the_straight_line_leaves_it():
    """Particles on a half circle: the straight line between the ends crosses the empty middle; the graph
    path visits only particles, in order along the arc, in short steps."""
    rng = np.random.default_rng(0)
    theta = np.linspace(0, np.pi, 400) + rng.normal(0, 0.002, 400)
    z = np.stack([np.cos(theta), np.sin(theta)], 1) + rng.normal(0, 0.003, (400, 2))
    start, end = 0, 399
    res = graph_path(z, start, end)
    steps = np.linalg.norm(np.diff(z[res.particles], axis=0), axis=1)
    assert res.particles[0] == start and res.particles[-1] == end
    assert steps.max() < res.max_edge
    assert np.all(np.diff(theta[res.particles]) > -0.05)  # monotone along the arc (up to noise)
    assert res.length < 1.1 * np.pi and res.euclidean == pytest.approx(np.linalg.norm(z[end] - z[start]))
    line = straight_line(z[start], z[end], 20)
    off_data = [np.min(np.linalg.norm(z - p, axis=1)) for p in line]
    assert max(off_data) > 0.5  # the straight line runs far from every particle
    assert resample_path(z, res.particles, None) == res.particles
    picked = resample_path(z, res.particles, 5)
    assert picked[0] == start and picked[-1] == end and len(picked) == 5
    assert set(picked) <= set(res.particles) and picked == sorted(picked, key=res.particles.index)


def test_straight_line_and_argument_checks():
    line = straight_line(np.zeros(3), np.array([1.0, 2.0, 4.0]), 5)
    assert line.shape == (5, 3) and line.dtype == np.float32
    assert np.allclose(line[2], [0.5, 1.0, 2.0]) and np.allclose(line[-1], [1, 2, 4])
    with pytest.raises(ValueError, match="at least 2 steps"):
        straight_line(np.zeros(2), np.ones(2), 1)
    with pytest.raises(ValueError, match="out of range"):
        graph_path(np.zeros((5, 2)), 0, 7)


def test_identical_latents_stay_connected():
    # three groups of 4 identical latents 0.1 apart (zero-length links), and a far group that sets the cut-off
    z = np.repeat(np.array([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [5.0, 0.0]]), 4, axis=0)
    res = graph_path(z, 0, 11, max_neighbors=12, avg_neighbors=11)
    assert res.particles[0] == 0 and res.particles[-1] == 11
    assert res.length == pytest.approx(0.2)


def _globals(blob: bytes) -> set[str]:
    return {str(arg) for op, arg, _ in pickletools.genops(blob) if op.name in ("GLOBAL", "SHORT_BINUNICODE")
            and isinstance(arg, str) and ("numpy" in arg or arg in ("_reconstruct", "ndarray", "dtype", "scalar"))}


def test_z_pkl_and_ind_pkl_have_cryodrgns_format(shared_data, tmp_path):
    """Same Python types, dtypes and pickled globals as cryoDRGN's own z / index pickles."""
    z = np.random.default_rng(1).normal(size=(30, 8))
    write_z_pkl(tmp_path / "z.pkl", z)
    ours = (tmp_path / "z.pkl").read_bytes()
    theirs = (shared_data / "cryodrgn" / "zvals_het-8_4k.pkl").read_bytes()
    got, ref = pickle.loads(ours), pickle.loads(theirs)
    assert type(got) is type(ref) is np.ndarray and got.dtype == ref.dtype == np.float32 and got.ndim == ref.ndim == 2
    assert np.array_equal(got, z.astype(np.float32))
    assert _globals(ours) <= _globals(theirs) | {"numpy._core.multiarray", "numpy._core.numeric"}
    write_ind_pkl(tmp_path / "ind.pkl", [3, 1, 4])
    ind, ref_ind = pickle.loads((tmp_path / "ind.pkl").read_bytes()), _load(shared_data, "ind100.pkl")
    assert ind.dtype == ref_ind.dtype == np.int64 and ind.tolist() == [3, 1, 4]
