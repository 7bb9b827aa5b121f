"""Latent-space analysis on an analytic fake generator (fast; no training).

The fake's maps are a static Gaussian blob plus a second blob whose position moves along y with the
latent's coordinate on one fixed direction ``u``; particle latents are a noisy linear function of a known
motion coordinate. So we know what a correct analysis must find: PC1 follows the motion, the
flexibility map and the PC1 series' changes sit where the moving blob travels, the attention labels
the static and moving blobs with their own tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.image as mpimg
import mrcfile
import numpy as np
import pytest
from scipy.stats import spearmanr

from cryoformer_ext.commands import analyze as analyze_cli
from cryoformer_ext.analysis.analyze import AnalysisResult, analyze

STATIC_A = np.array([-14.0, 0.0, 0.0])  # static blob centre (x, y, z) in Å
MOVING_BASE_A = np.array([12.0, 0.0, 0.0])  # moving blob at motion 0
TRAVEL_A = 14.0  # moving blob y = TRAVEL_A * motion, motion in about [-1, 1]
SIGMA_A = 4.0


class FakeVolumes:
    """``volumes(z, box)``: static blob + blob at y = TRAVEL_A * (z . u) / scale (no attention hook)."""

    def __init__(self, zdim: int = 4, train_box: int = 32, train_apix: float = 2.0, scale: float = 2.0,
                 seed: int = 1):
        self.zdim, self.train_box, self._apix, self.scale = zdim, train_box, train_apix, scale
        u = np.random.default_rng(seed).normal(size=max(zdim, 1))
        self.u = u / np.linalg.norm(u)
        self.calls = 0

    def voxel_size_A(self, box: int | None = None) -> float:
        return self._apix * self.train_box / (box or self.train_box)

    def motion(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, float) @ self.u / self.scale

    def _grid(self, box):
        c = (np.arange(box) - box // 2) * self.voxel_size_A(box)
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        return np.stack([x, y, z], -1)

    def moving_centre(self, m: float) -> np.ndarray:
        return MOVING_BASE_A + np.array([0.0, TRAVEL_A * m, 0.0])

    def _blob(self, pts, centre, amp=1.0):
        return amp * np.exp(-((pts - centre) ** 2).sum(-1) / (2 * SIGMA_A ** 2))

    def volumes(self, z: np.ndarray | None, box: int | None = None) -> np.ndarray:
        box = box or self.train_box
        self.calls += 1
        pts = self._grid(box)
        ms = [0.0] if (z is None or self.zdim == 0) else list(self.motion(np.asarray(z).reshape(-1, self.zdim)))
        return np.stack([self._blob(pts, STATIC_A) + self._blob(pts, self.moving_centre(m), 0.8)
                         for m in ms]).astype(np.float32)


class FakeGenerator(FakeVolumes):
    """The fake with the point-attention hook."""

    def attention_maps(self, z: np.ndarray, box: int | None = None) -> np.ndarray:
        """Three tokens: static blob, moving blob, a far background point; softmax of -distance^2."""
        box = box or self.train_box
        pts = self._grid(box)
        m = 0.0 if self.zdim == 0 else float(self.motion(np.asarray(z).reshape(1, -1))[0])
        cents = [STATIC_A, self.moving_centre(m), np.array([0.0, 0.0, 25.0])]
        logits = np.stack([-((pts - c) ** 2).sum(-1) / (2 * 8.0 ** 2) for c in cents])
        w = np.exp(logits - logits.max(0))
        return (w / w.sum(0)).astype(np.float32)


def make_latents(gen: FakeVolumes, n: int = 600, noise: float = 0.15, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1.0, 1.0, n)
    z = gen.scale * t[:, None] * gen.u[None, :] + noise * rng.normal(size=(n, gen.zdim))
    return t, z.astype(np.float32)


def region_masks(gen: FakeVolumes, box: int, t_range=(-1.0, 1.0), radius_A: float = 2.5 * SIGMA_A):
    """(moving region swept by the moving blob, static blob region) as boolean masks V[z, y, x]."""
    pts = gen._grid(box)
    moving = np.zeros((box,) * 3, bool)
    for m in np.linspace(*t_range, 21):
        moving |= ((pts - gen.moving_centre(m)) ** 2).sum(-1) <= radius_A ** 2
    static = ((pts - STATIC_A) ** 2).sum(-1) <= radius_A ** 2
    return moving, static


def read_map(path: Path) -> tuple[np.ndarray, float]:
    with mrcfile.open(path, permissive=False) as m:
        return m.data.copy(), float(m.voxel_size.x)


@pytest.fixture(scope="module")
def hetero_run(tmp_path_factory):
    gen = FakeGenerator()
    t, z = make_latents(gen)
    out = tmp_path_factory.mktemp("analysis")
    logs: list[str] = []
    res = analyze(z, gen, out, k=6, n_pcs=2, pc_steps=8, seed=3, loss_history=[5.0, 3.0, 2.0, 1.5, 1.2],
                  settings={"zdim": 4, "epochs": 5}, log=logs.append)
    return gen, t, z, out, res, logs


def test_pc1_of_latents_follows_the_motion(hetero_run):
    gen, t, z, out, res, _ = hetero_run
    coords = np.load(res.pca_coords_file)
    assert coords.shape == (len(z), 4)
    rho = spearmanr(coords[:, 0], t).statistic
    assert abs(rho) >= 0.8, rho
    assert res.pca_explained_variance_ratio[0] > 0.7


def test_pc1_series_moves_the_moving_domain(hetero_run):
    gen, t, z, out, res, _ = hetero_run
    pc1 = sorted((m for m in res.maps if m.kind == "pc" and m.pc == 1), key=lambda m: m.index)
    assert len(pc1) == 8 and pc1[0].path == out.resolve() / "pc1" / "pc1_01.mrc"
    vols = [read_map(m.path)[0] for m in pc1]
    moving, static = region_masks(gen, 32)
    change = sum(np.abs(vols[i + 1] - vols[i]) for i in range(len(vols) - 1))
    assert change[moving].sum() / change.sum() > 0.9
    assert change[static].sum() / change.sum() < 0.02
    # the series spans the motion: 5th..95th percentile of PC1 ~ most of [-1, 1]
    m_first, m_last = gen.motion(np.array([pc1[0].latent, pc1[-1].latent]))
    assert abs(m_last - m_first) > 1.4


def test_flexibility_map_peaks_in_the_moving_domain(hetero_run):
    gen, t, z, out, res, _ = hetero_run
    flex, apix = read_map(out / "flexibility.mrc")
    assert apix == pytest.approx(2.0, rel=1e-5)
    moving, static = region_masks(gen, 32)
    peak = np.unravel_index(np.argmax(flex), flex.shape)
    assert moving[peak] and not static[peak]
    assert flex[static].max() < 0.1 * flex.max()
    top = flex >= np.quantile(flex, 0.99)
    assert moving[top].mean() > 0.95


def test_kmeans_maps_and_labels(hetero_run):
    gen, t, z, out, res, _ = hetero_run
    labels = res.labels_array()
    assert labels.shape == (len(z),) and set(labels.tolist()) == set(range(6))
    assert np.array_equal(np.loadtxt(out / "kmeans_labels.txt", dtype=int), labels)
    km = res.maps_of("kmeans")
    assert [m.path.name for m in km] == [f"class_{i:03d}.mrc" for i in range(1, 7)]
    # each class map is decoded at its nearest particle's latent, and classes are ordered along PC1
    for m, p in zip(km, res.center_particles):
        assert np.allclose(m.latent, z[p], atol=1e-6)
    comp = np.asarray(res.pca_components[0])
    pc1_of_centres = np.asarray(res.centers) @ comp
    assert np.all(np.diff(pc1_of_centres) > 0)
    # class maps show the moving blob at the class's mean motion
    mot_class = np.array([t[labels == c].mean() for c in range(6)])
    assert abs(spearmanr(mot_class, np.arange(6)).statistic) == pytest.approx(1.0)
    summary = json.loads(res.summary_file.read_text())
    corr = np.asarray(summary["kmeans"]["map_correlation"])
    assert corr.shape == (6, 6) and np.allclose(np.diag(corr), 1.0)
    assert corr[0, 5] < corr[0, 1]  # the two ends of the motion differ most


def test_consensus_and_attention_labels(hetero_run):
    gen, t, z, out, res, _ = hetero_run
    cons, apix = read_map(out / "consensus.mrc")
    assert cons.shape == (32, 32, 32) and apix == pytest.approx(2.0)
    # consensus = the particle nearest the mean latent: motion close to the middle
    assert abs(gen.motion(np.asarray(res.consensus_latent)[None])[0]) < 0.15
    arg, _ = read_map(out / "attention_argmax.mrc")
    wmax, _ = read_map(out / "attention_maxweight.mrc")
    pts = gen._grid(32)

    def label_at(centre):
        i = np.argmin(((pts - centre) ** 2).sum(-1))
        return int(arg.ravel()[i])

    assert label_at(STATIC_A) == 0
    assert label_at(gen.moving_centre(float(gen.motion(np.asarray(res.consensus_latent)[None])[0]))) == 1
    assert set(np.unique(arg).astype(int)) <= {0, 1, 2}
    assert wmax.min() >= 1 / 3 - 1e-5 and wmax.max() <= 1 + 1e-5
    summary = json.loads(res.summary_file.read_text())
    frac = summary["attention"]["density_fraction_per_token"]
    assert len(frac) == 3 and sum(frac) == pytest.approx(1.0) and frac[2] < 0.05


def test_every_png_is_a_real_image(hetero_run):
    gen, t, z, out, res, _ = hetero_run
    names = {p.name for p in res.plots}
    assert {"loss.png", "pca_scatter.png", "pca_density.png", "pca_variance.png", "kmeans_correlation.png",
            "maps_projections.png", "pc1_series.png", "pc2_series.png"} <= names
    for p in res.plots:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] >= 150 and img.shape[1] >= 150, (p.name, img.shape)
        rgb = img[..., :3]
        assert rgb.std() > 0.02, p.name
        # more than a blank canvas with a frame: a good share of pixels is neither white nor one colour
        not_white = (rgb < 0.95).any(-1).mean()
        assert not_white > 0.02, (p.name, not_white)


def test_summary_and_report_list_every_file(hetero_run):
    gen, t, z, out, res, logs = hetero_run
    s = json.loads(res.summary_file.read_text())
    assert s["format"] == "cryoformer-analysis/1"
    assert s["n_particles"] == 600 and s["zdim"] == 4 and s["map_box"] == 32
    assert s["job_settings"] == {"zdim": 4, "epochs": 5}
    assert s["analysis_settings"]["k"] == 6 and s["analysis_settings"]["seed"] == 3
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(s["files"]) == on_disk
    assert len(s["maps"]) == 1 + 6 + 2 * 8 + 1 + 2 + 1  # ... + attention (2) + solvent mask
    assert {m["kind"] for m in s["maps"]} == {"consensus", "kmeans", "pc", "flexibility", "attention", "mask"}
    for key in ("pca", "kmeans", "consensus_map", "pc_maps", "flexibility_map", "plots", "total"):
        assert key in s["timings_s"]
    report = res.report_file.read_text()
    for f in s["files"]:
        assert f in report
    assert "PC1" in report and "k-means" in report
    assert any("k-means" in line for line in logs)
    assert {p for p in res.files} == {(out / f).resolve() for f in s["files"]}


def test_map_box_sets_voxel_size(tmp_path):
    gen = FakeGenerator(zdim=2)
    _, z = make_latents(gen, n=80)
    res = analyze(z, gen, tmp_path, k=3, n_pcs=1, pc_steps=3, map_box=24, log=lambda m: None, n_flex=8)
    assert res.map_box == 24 and res.map_pixel_size_A == pytest.approx(2.0 * 32 / 24)
    for m in res.maps:
        vol, apix = read_map(m.path)
        assert vol.shape == (24, 24, 24)
        assert apix == pytest.approx(2.0 * 32 / 24, rel=1e-5)


@pytest.mark.parametrize("latents", ["none", "empty"])
def test_homogeneous_job_gives_consensus_only(tmp_path, latents):
    gen = FakeGenerator(zdim=0)
    lat = None if latents == "none" else np.zeros((50, 0), np.float32)
    res = analyze(lat, gen, tmp_path, loss_history=[2.0, 1.0], log=lambda m: None)
    kinds = sorted(m.kind for m in res.maps)
    assert kinds == ["attention", "attention", "consensus", "mask"]
    assert res.labels is None and res.pca_coords_file is None
    assert not (tmp_path / "kmeans").exists() and not (tmp_path / "flexibility.mrc").exists()
    assert {p.name for p in res.plots} == {"loss.png", "maps_projections.png"}
    s = json.loads(res.summary_file.read_text())
    assert s["kmeans"] is None and s["pca"] is None and s["consensus"]["latent_choice"] == "homogeneous map"
    assert (tmp_path / "report.txt").read_text().startswith("cryoFormer analysis report")


def test_small_and_degenerate_latents(tmp_path):
    gen = FakeVolumes(zdim=1)
    # fewer distinct latents than k, zdim 1 (histogram plots), no attention hook, no loss history
    z = np.repeat(np.array([[-1.0], [0.0], [1.0]], np.float32), 4, axis=0)
    res = analyze(z, gen, tmp_path, k=10, n_pcs=3, pc_steps=4, log=lambda m: None)
    assert sorted(set(res.labels)) == [0, 1, 2]
    assert len(res.maps_of("kmeans")) == 3 and len(res.maps_of("pc")) == 4
    assert not res.maps_of("attention")
    for p in res.plots:
        assert mpimg.imread(p)[..., :3].std() > 0.02
    with pytest.raises(ValueError, match="not finite"):
        analyze(np.array([[np.nan], [0.0]]), gen, tmp_path / "bad", log=lambda m: None)
    with pytest.raises(ValueError, match="zdim"):
        analyze(np.zeros((5, 3)), gen, tmp_path / "bad", log=lambda m: None)


def test_volumes_are_decoded_in_batches(tmp_path):
    gen = FakeVolumes(zdim=2)
    _, z = make_latents(gen, n=100)
    analyze(z, gen, tmp_path, k=4, n_pcs=1, pc_steps=10, n_flex=16, volume_batch=8, log=lambda m: None)
    # consensus 1 call, k-means 1 call (4 maps), PC1 2 calls (10 maps), flexibility 2 calls (16 maps)
    assert gen.calls == 1 + 1 + 2 + 2


def _fake_job(tmp_path: Path, gen: FakeGenerator, z: np.ndarray, cfg: dict) -> Path:
    job = tmp_path / "job"
    (job / "checkpoints").mkdir(parents=True)
    np.save(job / "latents.npy", z)
    (job / "job_config.json").write_text(json.dumps(cfg))
    (job / "loss_history.json").write_text(json.dumps([3.0, 2.0, 1.0]))
    return job


def _cli_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cryoformer")
    sub = parser.add_subparsers(dest="command", required=True)
    analyze_cli.add_parser(sub)
    return parser.parse_args(argv)


def test_cli_rerun_reproduces_kmeans_labels(tmp_path, monkeypatch, capsys):
    gen = FakeGenerator()
    _, z = make_latents(gen, n=300, seed=5)
    cfg = {"zdim": 4, "kmeans": 5, "pcs": 1, "pc_steps": 4, "seed": 7, "map_box": None}
    job = _fake_job(tmp_path, gen, z, cfg)
    # what run_job would have written at the end of training
    first = analyze(np.load(job / "latents.npy"), gen, job / "analysis", k=5, n_pcs=1, pc_steps=4, seed=7,
                    settings=cfg, log=lambda m: None)
    monkeypatch.setattr(analyze_cli, "load_generator", lambda job_dir, checkpoint=None, device=None: FakeGenerator())

    args = _cli_args(["analyze", str(job), "--quiet"])
    assert args.func is analyze_cli.run
    assert analyze_cli.run(args) == 0
    out = capsys.readouterr().out.strip()
    assert out == str((job / "analysis" / "summary.json").resolve())
    rerun = json.loads((job / "analysis" / "summary.json").read_text())
    assert rerun["analysis_settings"]["k"] == 5 and rerun["analysis_settings"]["seed"] == 7
    assert np.array_equal(np.loadtxt(job / "analysis" / "kmeans_labels.txt", dtype=int), first.labels_array())
    assert rerun["loss_history"] == [3.0, 2.0, 1.0] and rerun["job_settings"]["job"] == cfg

    # other k into another folder; then a rerun with fewer classes removes the stale class maps
    assert analyze_cli.run(_cli_args(["analyze", str(job), "--k", "3", "--pc", "2", "--out", str(tmp_path / "k3"),
                                      "--quiet"])) == 0
    s3 = json.loads((tmp_path / "k3" / "summary.json").read_text())
    assert s3["kmeans"]["k"] == 3 and len(s3["pc_series"]) == 2
    assert analyze_cli.run(_cli_args(["analyze", str(job), "--k", "2", "--quiet"])) == 0
    assert sorted(p.name for p in (job / "analysis" / "kmeans").glob("class_*.mrc")) == ["class_001.mrc", "class_002.mrc"]
    capsys.readouterr()


def test_cli_reports_missing_job_parts(tmp_path, monkeypatch, capsys):
    gen = FakeGenerator()
    job = tmp_path / "job"
    job.mkdir()
    assert analyze_cli.run(_cli_args(["analyze", str(job)])) == 2
    assert "checkpoints" in capsys.readouterr().err
    monkeypatch.setattr(analyze_cli, "load_generator", lambda *a, **k: gen)
    assert analyze_cli.run(_cli_args(["analyze", str(job)])) == 2
    assert "latents.npy" in capsys.readouterr().err
    assert analyze_cli.run(_cli_args(["analyze", str(tmp_path / "nope")])) == 2
