"""End-to-end analysis on a trained job (slow): simulated hinge motion -> run_job -> analysis outputs.

The simulator (``cryoformer.simulate``) makes a static body and a two-blob domain swinging about a hinge
with a known conformation coordinate ``t`` per particle. After training through the job layer, the
analysis must find that motion: PC1 of the latents follows ``t``, the PC1 map series changes density
where the true moving domain is (not on the static body), the flexibility map is highest there, every
plot is a real image, and ``cryoformer analyze`` on the finished job gives the same k-means labels.
2,000 particles is the smallest set tried that learns the motion: with 1,000 (same epochs) |Spearman(PC1, t)|
was 0.40 and the PC1 series changed the moving domain no more than the static body. With the decoder blind
to the latent (z * 0, a control run) |Spearman(PC1, t)| was 0.10 and the PC1 series and flexibility map were
flat, so these tests fail when no motion is learned.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib.image as mpimg
import mrcfile
import numpy as np
import pytest
from scipy.stats import spearmanr

from cryoformer.data import ArraySource, ParticleData
from cryoformer.simulate import moving_domain_mask, simulate, true_volume
from cryoformer_ext.commands import analyze as analyze_cli
from cryoformer_ext.config import JobConfig
from cryoformer_ext.job.run import run_job

pytestmark = [pytest.mark.slow]

N, BOX, APIX, SNR = int(os.environ.get("E2E_N", 2000)), 16, 8.0, 2.0
CONFIG = dict(epochs=int(os.environ.get("E2E_EPOCHS", 6)), zdim=8, train_box=BOX, batch_size=8,
              kmeans=5, pcs=1, pc_steps=6, seed=0)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    sim = simulate(N, BOX, pixel_size_A=APIX, snr=SNR, states="continuous", seed=0)
    data = ParticleData(ArraySource(sim.images), sim.pixel_size_A, ctf=sim.ctf, rot=sim.rot, shift_px=sim.shift_px)
    out = tmp_path_factory.mktemp("e2e_job")
    t0 = time.perf_counter()
    res = run_job(data, JobConfig(**CONFIG), out, log=lambda m: None)
    print(f"e2e: run_job {time.perf_counter() - t0:.1f} s, timings {res.timings_s}")
    return sim, out, res


def _regions(box: int):
    """(moving-domain region, static-body region) from the true maps."""
    moving = moving_domain_mask(box)
    truth = np.stack([true_volume(float(t), box) for t in np.linspace(0, 1, 9)])
    body = (truth.min(axis=0) > 0.2 * truth.max()) & ~moving  # density present in every conformation
    return moving, body


def test_pc1_of_latents_follows_the_true_motion(job):
    sim, out, res = job
    pc = np.load(res.analysis.pca_coords_file)
    rho = spearmanr(pc[:, 0], sim.conformation).statistic
    assert abs(rho) >= 0.8, f"|Spearman(PC1, true t)| = {abs(rho):.3f}"


def test_pc1_series_moves_the_moving_domain(job):
    sim, out, res = job
    series = sorted(res.analysis.maps_of("pc"), key=lambda m: m.index)
    assert [m.path.name for m in series] == [f"pc1_{i:02d}.mrc" for i in range(1, 7)]
    vols = [mrcfile.read(m.path) for m in series]
    change = sum(np.abs(vols[i + 1] - vols[i]) for i in range(len(vols) - 1))
    moving, body = _regions(BOX)
    frac = change[moving].sum() / change.sum()
    # concentrated: far more change per voxel in the moving domain than on the static body and than overall
    assert change[moving].mean() > 3 * change[body].mean(), (change[moving].mean(), change[body].mean())
    assert frac > 3 * moving.mean(), (frac, moving.mean())


def test_flexibility_map_is_highest_in_the_moving_domain(job):
    sim, out, res = job
    with mrcfile.open(out / "analysis" / "flexibility.mrc") as m:
        flex = m.data.copy()
        assert float(m.voxel_size.x) == pytest.approx(APIX, rel=1e-4)
    moving, body = _regions(BOX)
    assert flex[moving].mean() > 3 * flex[body].mean()
    top = flex >= np.quantile(flex, 0.995)  # the highest ~20 voxels
    assert moving[top].mean() >= 0.5


def test_plots_are_real_images(job):
    sim, out, res = job
    names = {p.name for p in res.analysis.plots}
    assert {"loss.png", "pca_scatter.png", "pca_density.png", "kmeans_correlation.png", "maps_projections.png"} <= names
    for p in res.analysis.plots:
        img = mpimg.imread(p)
        assert img.shape[0] >= 150 and img.shape[1] >= 150 and img[..., :3].std() > 0.02, p.name


def test_analyze_cli_reproduces_the_job_labels(job, tmp_path):
    sim, out, res = job
    parser = argparse.ArgumentParser(prog="cryoformer")
    analyze_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(out), "--out", str(tmp_path / "again"), "--quiet"])
    assert analyze_cli.run(args) == 0
    again = np.loadtxt(tmp_path / "again" / "kmeans_labels.txt", dtype=int)
    assert np.array_equal(again, res.labels)
    first = json.loads(res.summary_file.read_text())
    second = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert second["kmeans"]["center_particles"] == first["kmeans"]["center_particles"]
    assert np.allclose(mrcfile.read(tmp_path / "again" / "flexibility.mrc"), mrcfile.read(out / "analysis" / "flexibility.mrc"),
                       atol=1e-5)
