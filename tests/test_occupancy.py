"""The occupancy grid and the renderer's cost controls: skipping empty cells, one-piece vs chunked
evaluation, the planned hash grid, coarse stages. (Training with the grid: tests/test_occupancy_training.py.)"""

import re

import numpy as np
import pytest
import torch

from cryoformer.hashgrid import HashGrid, make_plan, planned_forward
from cryoformer.lattice import volume_points
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.occupancy import OccupancyGrid, cell_means, dilate
from cryoformer.poses import random_rotations
from cryoformer.simulate import true_volume
from cryoformer.train import TrainConfig, occupancy_due

GAUGE = re.compile(r"(\.k\.bias|k_norm\.bias|norm_fd\.bias)$")
SMALL = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32,
             hash_levels=8, hash_log2_size=12)


def test_cell_lookup_matches_voxel_geometry():
    """A voxel belongs to the cell its centre falls in: with 4 cells over a 16 box, voxels 0-3 along x
    (coordinates -8..-5) are in cell 0, voxels 12-15 in cell 3."""
    grid = OccupancyGrid(4)
    grid.occupied.zero_()
    grid.occupied[1, 2, 3] = True                       # (z, y, x) cell
    mask = grid.voxel_mask(16).numpy()
    expected = np.zeros((16, 16, 16), bool)
    expected[4:8, 8:12, 12:16] = True
    np.testing.assert_array_equal(mask, expected)
    # the same cells at another box, and points outside the box are never occupied
    np.testing.assert_array_equal(grid.voxel_mask(32).numpy(), expected.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    assert not grid.lookup(torch.tensor([[100.0, 0.0, 0.0]]), 16).any()


@pytest.mark.parametrize("box, cells", [(24, 12), (24, 6), (40, 20), (48, 12), (96, 24), (32, 16), (64, 16)])
def test_every_cell_holds_the_same_voxels(box, cells):
    """Where the box is a multiple of the cells, each cell is (box / cells)^3 voxels, the ones counted
    from the box's edge: a boundary voxel rounded into the cell below would leave a cell one voxel wide,
    whose one-cell margin then reaches a single voxel (at box 24 that cut the edge of a molecule)."""
    grid = OccupancyGrid(cells)
    idx, inside = grid.cell_index(volume_points(box), box)
    assert inside.all()
    per_axis = box // cells
    expected = np.arange(box) // per_axis                                  # cell of each voxel along x
    np.testing.assert_array_equal(idx.view(box, box, box)[0, 0].numpy(), expected)
    np.testing.assert_array_equal(np.bincount(idx.numpy(), minlength=cells ** 3), per_axis ** 3)


def test_update_thresholds_cell_means_and_grows_by_the_margin():
    grid = OccupancyGrid(8)
    dens = torch.zeros(8, 8, 8)
    dens[4, 4, 4] = 1.0
    dens[0, 0, 0] = 0.04                                   # below 5 % of the peak: not occupied
    dens[2, 6, 1] = -0.5                                   # |density| counts
    grid.update(dens, threshold=0.05, margin=1)
    occ = grid.occupied
    assert occ[3:6, 3:6, 3:6].all() and occ.sum() == 2 * 27
    assert occ[1:4, 5:8, 0:3].all() and not occ[0, 0, 0]
    assert int(grid.estimates) == 1
    np.testing.assert_array_equal(dilate(torch.ones(3, 3, 3, dtype=torch.bool), 0), torch.ones(3, 3, 3, dtype=torch.bool))


def test_cell_means_average_the_voxels_of_each_cell():
    grid = OccupancyGrid(2)
    box = 4
    vals = torch.arange(box ** 3, dtype=torch.float32).view(1, -1)
    means = cell_means(vals, box, grid).view(2, 2, 2)
    v = vals.view(box, box, box)
    assert float(means[1, 0, 1]) == pytest.approx(float(v[2:, :2, 2:].mean()))


def test_known_molecule_mask_keeps_all_its_density():
    """The mask of the hinge's conformations, grown by the margin, holds every voxel where any of them
    has density above 1 % of its peak, and skips most of the sphere."""
    box = 64
    vols = [true_volume(t, box) for t in np.linspace(0, 1, 5)]
    grid = OccupancyGrid(box // 4)
    frac = grid.set_from_volumes(vols, threshold=TrainConfig().occupancy_threshold, margin=1)
    mask = grid.voxel_mask(box).numpy()
    for v in vols:
        assert mask[v > 0.01 * v.max()].all()
    assert frac < 0.35


def test_planned_hash_grid_equals_the_grid():
    grid = HashGrid(8, 2, 12, 4, 1.5)
    x = torch.rand(3000, 3) * 1.2 - 0.1                    # also outside [0, 1]
    with torch.no_grad():
        grid.params.uniform_(-1, 1)
    plan = make_plan(grid, x)
    torch.testing.assert_close(planned_forward(grid, plan), grid(x), rtol=0, atol=0)
    g = torch.randn(3000, grid.n_output_dims)
    (a,) = torch.autograd.grad((grid(x) * g).sum(), grid.params)
    (b,) = torch.autograd.grad((planned_forward(grid, plan) * g).sum(), grid.params)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _batch(b=3, box=16, seed=0):
    rng = np.random.default_rng(seed)
    rot = torch.as_tensor(random_rotations(b, rng), dtype=torch.float32)
    return torch.randn(b, box, box, generator=torch.Generator().manual_seed(seed)), rot


@pytest.mark.parametrize("render", ["canonical", "rotated"])
def test_chunked_evaluation_equals_one_piece(render):
    """Chunks with recomputation (small memory) give the loss and gradients of the one-piece step."""
    images, rot = _batch()
    grads = []
    for chunk in (None, 97):
        torch.manual_seed(0)
        model = CryoFormer(ModelConfig(**SMALL, render=render, chunk_points=chunk and chunk * 3))
        out = model(images, None, rot, torch.zeros(3, 2), sample=False)
        out["mse"].backward()
        grads.append((float(out["mse"]), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for k, g in grads[0][1].items():
        if GAUGE.search(k):  # a bias on attention keys shifts a whole softmax row: true gradient 0, rounding only
            continue
        torch.testing.assert_close(grads[1][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_recomputation_only_when_memory_is_short(monkeypatch):
    """The step is checkpointed in chunks only when its activations would not fit in the free memory."""
    import cryoformer.model as model_mod

    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    images, rot = _batch()
    model = CryoFormer(ModelConfig(**SMALL))
    monkeypatch.setenv("CRYOFORMER_MEMORY_BYTES", str(64 << 30))
    model(images, None, rot, torch.zeros(3, 2))["mse"].backward()
    assert calls == []
    monkeypatch.setenv("CRYOFORMER_MEMORY_BYTES", str(1 << 20))
    assert model._chunk(3) < len(model._lattice(16)["voxels"])
    model(images, None, rot, torch.zeros(3, 2))["mse"].backward()
    assert len(calls) > 1


@pytest.mark.parametrize("render", ["canonical", "rotated"])
def test_empty_cells_are_skipped_in_rendering_and_maps(render):
    """With part of the grid empty, maps are 0 there and rendering equals rendering the masked field."""
    torch.manual_seed(1)
    model = CryoFormer(ModelConfig(**SMALL, render=render, occupancy_cells=4))
    images, rot = _batch()
    model.eval()
    full_vol = model.volume(None).numpy()
    model.occupancy.occupied.zero_()
    model.occupancy.occupied[1:3, 1:3, :] = True
    model.occupancy._bump()
    vol = model.volume(None).numpy()
    mask = model.occupancy.voxel_mask(16).numpy()
    assert np.all(vol[~mask] == 0)
    np.testing.assert_allclose(vol[mask], full_vol[mask], rtol=1e-5, atol=1e-6)
    tokens = model.tokens_from_latent(None, 3)
    proj = model.render(tokens, rot)
    from cryoformer.render import project_volume
    ref = project_volume(torch.as_tensor(vol / model.cfg.data_scale), rot)
    if render == "canonical":
        torch.testing.assert_close(proj, ref, rtol=1e-4, atol=1e-5)
    else:  # the continuous field at rotated points against trilinear voxels: close, not equal
        assert np.corrcoef(proj.detach().numpy().ravel(), ref.numpy().ravel())[0, 1] > 0.95


def test_coarse_stage_renders_the_same_field_at_half_the_box():
    """At half the box, the render is the projection of the same field sampled at half resolution: it
    matches the Fourier-cropped full-box render at low resolution."""
    from cryoformer.lattice import fourier_crop

    torch.manual_seed(2)
    model = CryoFormer(ModelConfig(**{**SMALL, "box": 32}, hash_scale=1.0)).eval()
    _, rot = _batch(2, 32)
    tokens = model.tokens_from_latent(None, 2)
    with torch.no_grad():
        full = fourier_crop(model.render(tokens, rot), 16)
        half = model.render(tokens, rot, box=16)
    assert np.corrcoef(full.numpy().ravel(), half.numpy().ravel())[0, 1] > 0.95


def test_occupancy_schedule_is_a_function_of_the_image_count():
    """Estimates after the warm-up, then at gaps that double from it until they reach the refresh."""
    cfg = TrainConfig(occupancy_warmup=100, occupancy_refresh=250)
    due = [s for s in range(0, 2000, 10) if occupancy_due(cfg, 1000, s, s + 10)]
    # points 100, 200, 400 (gaps 100, 200), then every 250 images
    assert due == [90, 190, 390, 640, 890, 1140, 1390, 1640, 1890]
    # a data set smaller than the warm-up: the first estimate at the end of the first epoch
    assert [s for s in range(0, 400, 10) if occupancy_due(cfg, 50, s, s + 10)] == [40, 90, 190, 390]
    # no warm-up: the grid is estimated every refresh
    no_warmup = TrainConfig(occupancy_warmup=0, occupancy_refresh=250)
    assert [s for s in range(0, 800, 10) if occupancy_due(no_warmup, 1000, s, s + 10)] == [240, 490, 740]


def test_occupancy_schedule_counts_every_point_once_whatever_the_step():
    """Batches of any size see the same estimate points: the count of points crossed over a run does not
    depend on how the images are cut into steps (a resumed or re-batched run estimates as often)."""
    from cryoformer.train import estimates_by

    cfg = TrainConfig(occupancy_warmup=1000, occupancy_refresh=10000)
    for batch in (1, 7, 8, 64):
        crossed = sum(occupancy_due(cfg, 2000, s, min(s + batch, 60000)) for s in range(0, 60000, batch))
        assert crossed == estimates_by(cfg, 2000, 60000) == 9  # 1k, 2k, 4k, 8k, 16k, 26k, 36k, 46k, 56k


@pytest.mark.parametrize("epochs, given, expected", [(20, None, 3), (18, None, 3), (14, None, 2), (12, None, 2),
                                                      (5, None, 0), (1, None, 0), (20, "0", 0), (4, "3", 3)])
def test_coarse_epochs_default_is_a_sixth_of_the_run(epochs, given, expected):
    """The job's coarse stage reaches the trainer: by default a sixth of the epochs, at most 3 (short runs
    none), and a value the user gives is used as given, 0 included."""
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job.configs import train_config_for

    strings = {"epochs": str(epochs)} | ({} if given is None else {"coarse_epochs": given})
    assert train_config_for(JobConfig.from_strings(strings), 2000).coarse_epochs == expected


def test_union_over_latents_keeps_a_minority_state_and_drops_lone_spikes():
    """A cell that 8 of 64 latents fill is kept at their density; a cell that one latent spikes in, or that
    goes negative, is not; an inverted-contrast map gives the same union."""
    from cryoformer.occupancy import union_over_latents

    k = 64
    vals = torch.zeros(k, 4)
    vals[:, 0] = 1.0                       # the static core
    vals[:8, 1] = 0.6                      # a conformation of 1/8 of the particles
    vals[5, 2] = 0.9                       # one latent's fitted noise
    vals[:, 3] = -0.5                      # density of the other sign everywhere
    union = union_over_latents(vals)
    torch.testing.assert_close(union, torch.tensor([1.0, 0.6, 0.0, 0.0]))
    torch.testing.assert_close(union_over_latents(-vals), union)
    # one latent (a homogeneous model): its own values, of the map's sign
    torch.testing.assert_close(union_over_latents(vals[:1]), torch.tensor([1.0, 0.6, 0.0, 0.0]))
