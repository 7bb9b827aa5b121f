"""Our FSC against RELION's (relion_image_handler --fsc) and against analytic cases."""

import subprocess

import numpy as np
import pytest

from cryoformer.metrics import fsc, fsc_auc, resolution_px
from cryoformer.simulate import true_volume
from cryoformer_ext.formats.atomic import write_mrc


def test_fsc_identical_and_independent_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(24, 24, 24))
    assert np.allclose(fsc(a, a), 1.0)
    b = rng.normal(size=(24, 24, 24))
    assert np.abs(fsc(a, b)[2:]).max() < 0.35  # independent noise: FSC ~ 1/sqrt(shell size)
    assert resolution_px(np.ones(13)) == 2.0
    assert fsc_auc(np.ones(13)) == pytest.approx(0.5)


@pytest.mark.relion
def test_fsc_matches_relion_image_handler(tmp_path):
    a = true_volume(0.2, 32)
    b = a + np.random.default_rng(1).normal(0, 0.05, a.shape).astype(np.float32)
    write_mrc(tmp_path / "a.mrc", a, 3.0)
    write_mrc(tmp_path / "b.mrc", b, 3.0)
    out = subprocess.run(["relion_image_handler", "--i", "a.mrc", "--fsc", "b.mrc", "--angpix", "3"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    relion = np.array([float(r[3]) for r in rows])
    ours = fsc(a, b)[: len(relion)]
    assert len(relion) >= 16
    assert np.abs(ours - relion).max() < 0.02
