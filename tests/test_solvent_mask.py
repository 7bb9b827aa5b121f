"""The soft solvent mask against RELION's own ``relion_mask_create``, and the helpers behind the outputs'
scale: nearest-neighbour resampling of label maps and the subsampled UMAP embedding."""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from cryoformer_ext.analysis.label_resample import resample_nearest
from cryoformer_ext.analysis.solvent_mask import SoftMaskSettings, relion_soft_mask, soft_mask

BOX, APIX = 40, 2.5


def blob_map(box: int = BOX, seed: int = 0) -> np.ndarray:
    """A few Gaussian blobs (a small, lumpy molecule) plus weak noise, V[z, y, x]."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = 0.02 * rng.normal(size=(box, box, box))
    for _ in range(6):
        c, s, a = rng.uniform(-6, 6, 3), rng.uniform(1.5, 2.5), rng.uniform(0.6, 1.0)
        vol += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_mask_create") is None, reason="RELION 3.1 programs not on PATH")
@pytest.mark.parametrize("extend, soft", [(3, 6), (0, 4), (2, 0)])
def test_mask_matches_relion_mask_create(tmp_path, extend, soft):
    vol = blob_map()
    with mrcfile.new(tmp_path / "map.mrc") as m:
        m.set_data(vol)
        m.voxel_size = APIX
    ours = soft_mask(vol, SoftMaskSettings(threshold_fraction=0.3, extend_px=extend, soft_edge_px=soft))
    subprocess.run(["relion_mask_create", "--i", "map.mrc", "--o", "mask.mrc", "--ini_threshold", f"{ours.threshold:.8g}",
                    "--extend_inimask", str(extend), "--width_soft_edge", str(soft)],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    with mrcfile.open(tmp_path / "mask.mrc") as m:
        theirs = np.asarray(m.data, np.float32)
    assert theirs.shape == ours.values.shape
    region_ours, region_theirs = ours.values > 0.5, theirs > 0.5
    differ = np.mean(region_ours != region_theirs) / max(np.mean(region_theirs), 1e-9)
    assert differ < 0.03, f"{differ:.2%} of RELION's mask region differs"
    assert np.abs(ours.values - theirs).max() < 0.05
    # a real mask: soft where asked, and a small part of the box
    assert 0.01 < np.mean(region_theirs) < 0.4
    if soft:
        assert ((ours.values > 0.05) & (ours.values < 0.95)).sum() > 0.2 * region_ours.sum()


def test_threshold_follows_the_map_scale():
    vol = blob_map()
    a, b = soft_mask(vol), soft_mask(vol * 1000.0)
    assert b.threshold == pytest.approx(1000.0 * a.threshold, rel=1e-5)
    np.testing.assert_array_equal(a.values, b.values)


def test_empty_map_is_refused():
    with pytest.raises(ValueError, match="no positive density"):
        soft_mask(np.zeros((8, 8, 8), np.float32))


def test_extension_reaches_exactly_the_distance():
    vol = np.zeros((21, 21, 21), np.float32)
    vol[10, 10, 10] = 1.0
    m = relion_soft_mask(vol, 0.5, extend_px=3, soft_edge_px=0)
    zz, yy, xx = np.mgrid[:21, :21, :21] - 10
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    np.testing.assert_array_equal(m > 0.5, r < 3)  # RELION compares r^2 < extend^2 strictly


def test_nearest_resampling_keeps_labels_and_centre():
    lab = np.arange(8 ** 3, dtype=np.float32).reshape(8, 8, 8)
    up = resample_nearest(lab, 32)
    assert up.shape == (32, 32, 32) and set(np.unique(up)) <= set(np.unique(lab))
    assert up[16, 16, 16] == lab[4, 4, 4]  # the origin voxel (box // 2) maps onto the origin voxel
    np.testing.assert_array_equal(up[::4, ::4, ::4], lab)
