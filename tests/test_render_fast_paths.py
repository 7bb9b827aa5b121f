"""The fast forms of the renderer against explicit slow references: fused point attention, the batched
rotated renderer with an occupancy grid, the occupancy estimate with shared position features, the lazy
hash-grid plan, and occupancy cells sized in Å."""

import math

import numpy as np
import pytest
import torch

from cryoformer.decoder import point_attention_explicit, point_attention_fused
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.occupancy import OccupancyGrid, cell_means, cells_for, union_over_latents
from cryoformer.poses import random_rotations as _np_rotations
from cryoformer.render import pack_rows

def random_rotations(n: int, seed: int) -> torch.Tensor:
    return torch.as_tensor(_np_rotations(n, np.random.default_rng(seed)), dtype=torch.float32)


SMALL = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32,
             hash_levels=8, hash_log2_size=12)


def _softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v one image and one point at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(k.shape[0], q.shape[-2], v.shape[-1], dtype=torch.float64)
    for b in range(k.shape[0]):
        qb = q if q.dim() == 2 else q[b]
        for p in range(qb.shape[0]):
            w = torch.exp(k[b] @ qb[p] - (k[b] @ qb[p]).max())
            out[b, p] = (w / w.sum()) @ v[b]
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_fused_point_attention_equals_explicit_softmax(shared):
    """scaled_dot_product_attention (scale 1) gives softmax(q K^T) V, for points shared by the images and
    per image, and so do its gradients."""
    torch.manual_seed(0)
    q = (torch.randn(37, 16) if shared else torch.randn(3, 37, 16)) * 2
    k, v = torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    ref = _softmax_reference(q, k, v).float()
    grads = []
    for fn in (point_attention_fused, lambda *t: point_attention_explicit(*t)[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_fused, g_explicit in zip(*grads):
        torch.testing.assert_close(g_fused, g_explicit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pieces", [False, True])
def test_model_density_is_the_same_fused_or_explicit_and_attention_map_is_kept(pieces, monkeypatch):
    """The head's fused path (the fused kernel, or the piecewise pass in pieces of 20 points) gives the
    explicit path's densities and loss gradients; asking for the attention map still returns it (rows
    sum to 1) with the same densities."""
    import cryoformer.point_density as pd

    if pieces:
        monkeypatch.setattr(pd, "PIECEWISE_MIN_ELEMENTS", 0)
        monkeypatch.setattr(pd, "PIECE_ELEMENTS", 3 * 16 * 20)
    torch.manual_seed(1)
    model = CryoFormer(ModelConfig(**SMALL))
    images, rot = torch.randn(3, 16, 16), random_rotations(3, seed=1)
    results = []
    for fused in (True, False):
        model.head.fused = fused
        model.zero_grad()
        out = model(images, None, rot, torch.zeros(3, 2), sample=False)
        out["mse"].backward()
        results.append((out["mse"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    for name, g in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], g, rtol=1e-3, atol=1e-6, msg=name)
    model.head.fused = True
    model.eval()
    vol, att = model.volume(None, attention=True)
    torch.testing.assert_close(vol, model.volume(None), rtol=1e-5, atol=1e-6)
    inside = vol.flatten() != 0
    sums = att.reshape(model.cfg.tokens, -1)[:, inside].sum(0)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-5)


def _rotated_per_image(model: CryoFormer, tokens: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The rotated renderer written out image by image: the field at the image's occupied rotated points
    only, summed into their pixels."""
    box = model.cfg.box
    kv = model.head.keys_values(tokens)
    lat = model._lattice(box)
    rows = []
    for i in range(rot.shape[0]):
        world = lat["image_pts"].float() @ rot[i]
        sel = torch.nonzero(model.occupancy.lookup(world, box)).squeeze(1)
        dens = model.density(world[sel].unsqueeze(0), (kv[0][i:i + 1], kv[1][i:i + 1]))[0]
        rows.append(torch.zeros(box * box).index_add(0, lat["image_pix"][sel], dens))
    return torch.stack(rows).view(-1, box, box)


def test_rotated_render_in_one_batch_equals_image_by_image():
    torch.manual_seed(2)
    model = CryoFormer(ModelConfig(**SMALL, render="rotated", occupancy_cells=4)).eval()
    model.occupancy.occupied.zero_()
    model.occupancy.occupied[1:3, 0:3, 1:4] = True      # an off-centre block: images differ in counts
    model.occupancy._bump()
    rot = random_rotations(4, seed=3)
    tokens = model.tokens_from_latent(torch.randn(4, 2), 4)
    with torch.no_grad():
        fast = model.render(tokens, rot)
        ref = _rotated_per_image(model, tokens, rot)
    assert fast.abs().max() > 0
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_occupancy_estimate_with_shared_features_equals_per_latent_evaluation():
    """The estimate that evaluates the position features once marks the cells that evaluating the whole
    field once per latent marks."""
    torch.manual_seed(3)
    model = CryoFormer(ModelConfig(**SMALL, occupancy_cells=8))
    z = torch.randn(5, 2)
    model.eval()
    lat = model._lattice(16)
    pts, vox = lat["voxel_pts"], lat["voxels"]      # cells of 2 px: every voxel is looked at
    cells = []
    with torch.no_grad():
        for zi in z:
            kv = model.head.keys_values(model.tokens_from_latent(zi.view(1, -1), 1))
            cells.append(cell_means(model.density(pts, kv), 16, model.occupancy, vox)[0])
    expected = OccupancyGrid(8)
    expected.update(union_over_latents(torch.stack(cells)).view(8, 8, 8), 0.3, 0)
    model.train()
    model.estimate_occupancy(z, threshold=0.3, margin=0)
    assert 0 < int(expected.occupied.sum()) < 8 ** 3
    assert torch.equal(model.occupancy.occupied, expected.occupied)
    assert model.training


def test_estimate_looks_at_every_cell_of_a_fine_grid():
    """Cells of 1 px: the estimate's lattice is never coarser than a cell, so a field with density
    everywhere occupies the whole sphere's cells (none left at 0 for never being looked at)."""
    torch.manual_seed(4)
    model = CryoFormer(ModelConfig(**SMALL, occupancy_cells=16))
    with torch.no_grad():
        model.head.ffn[2].bias.fill_(10.0)               # density ~10 at every point
    model.estimate_occupancy(torch.randn(2, 2), threshold=0.05, margin=0)
    assert model.occupancy.sphere_fraction(16) == 1.0


def test_hash_grid_plan_is_made_only_when_used():
    """Training steps with the sub-voxel jitter never make the plan; a map makes it, and the planned map
    equals the unplanned field."""
    torch.manual_seed(5)
    model = CryoFormer(ModelConfig(**SMALL, occupancy_cells=4))
    images, rot = torch.randn(2, 16, 16), random_rotations(2, seed=5)
    model(images, None, rot, torch.zeros(2, 2), step=3)["mse"].backward()
    assert model._lattice(16)["plan"] is None
    model.eval()
    vol = model.volume(None)
    lat = model._lattice(16)
    assert lat["plan"] is not None
    kv = model.head.keys_values(model.tokens_from_latent(None, 1))
    with torch.no_grad():
        ref = model.density(lat["voxel_pts"], kv)[0] * model.cfg.data_scale
    torch.testing.assert_close(vol.flatten()[lat["voxels"]], ref, rtol=1e-5, atol=1e-6)


def test_occupancy_cells_follow_the_pixel_size():
    # 8 Å cells: 3 Å pixels -> 2.67 px cells, 12 per axis of a 32 box; 1 Å pixels -> 8 px, 8 per 64
    assert cells_for(32, 3.0, 8.0) == 12
    assert cells_for(64, 1.0, 8.0) == 8
    # never below 2 px (8 Å pixels), and None keeps the fixed 4-px cell
    assert cells_for(32, 8.0, 8.0) == 16
    assert cells_for(32, 3.0, None) == 8
    assert cells_for(32, 3.0, None, cell_px=2) == 16
    with pytest.raises(ValueError, match="positive"):
        cells_for(32, 3.0, 0.0)
    assert math.isclose(32 / cells_for(32, 4.0, 8.0), 2.0)


def test_pack_rows_lists_each_rows_true_columns_in_order():
    keep = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    order, valid = pack_rows(keep)
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert order[0].tolist() == [1, 2, 4] and order[2, 0] == 0


@pytest.mark.parametrize("offset", [None, (0.3, -0.45, 0.1)])
def test_projection_of_occupied_columns_equals_the_full_projection(offset):
    """A map that is zero outside a mask projects the same whether every lattice point is sampled or only
    those whose trilinear samples can reach the mask."""
    from cryoformer.lattice import image_plane_points
    from cryoformer.render import project_volumes, sample_reach

    torch.manual_seed(6)
    box = 16
    support = torch.zeros(box, box, box, dtype=torch.bool)
    support[3:9, 5:12, 6:10] = True
    support[10:13, 2:5, :] = True                        # reaching the box's faces
    vols = torch.randn(3, box, box, box) * support
    rot = random_rotations(3, seed=6)
    pts, pix = image_plane_points(box, radius=box / 2.0 + 2.0)
    off = None if offset is None else torch.tensor(offset)
    full = project_volumes(vols, rot, pts, pix, off)
    fast = project_volumes(vols, rot, pts, pix, off, reach=sample_reach(support))
    assert full.abs().max() > 1
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_job_parameter_sets_the_cells_per_axis():
    """``occupancy_cell_A`` from the job's strings reaches the model: 4 Å at 2 Å pixels of a 64 training
    box is 32 cells (the default); 0 keeps the fixed 4-pixel cell (16)."""
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job.configs import occupancy_cells_for

    assert occupancy_cells_for(64, 2.0, JobConfig.from_strings({"occupancy_cell_A": "4"})) == 32
    assert occupancy_cells_for(64, 2.0, JobConfig.from_strings({"occupancy_cell_A": "0"})) == 16
    assert occupancy_cells_for(64, 2.0, JobConfig()) == 32


def test_autocast_keeps_the_explicit_attention(monkeypatch):
    """Under bf16 autocast the head takes the explicit form (the one the bf16 precision checks cover);
    in fp32 on a CPU without the native kernels (test_native_kernels.py) the fused kernel, or the
    piecewise density pass where the points are many."""
    import cryoformer.decoder as decoder
    import cryoformer.point_density as pd

    monkeypatch.setattr(decoder, "native_pays", lambda qn, keys: False)
    calls = []
    for name in ("point_density", "point_attention_fused"):
        real = getattr(decoder, name)
        monkeypatch.setattr(decoder, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    torch.manual_seed(7)
    model = CryoFormer(ModelConfig(**SMALL)).eval()
    with torch.no_grad():
        model.volume(None)
        monkeypatch.setattr(pd, "PIECEWISE_MIN_ELEMENTS", 0)
        model.volume(None)
        assert calls == ["point_attention_fused", "point_density"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.volume(None)
    assert calls == ["point_attention_fused", "point_density"]


@pytest.mark.parametrize("shared", [True, False])
def test_piecewise_point_density_equals_the_explicit_head(shared, monkeypatch):
    """Density = w2 . ReLU(softmax(q K^T) V + u) + b2 taken a few points at a time, with the backward
    recomputing the softmax from the log-sum-exp: the same values and gradients (all six inputs) as the
    explicit form in float64, over several pieces and a ragged last one."""
    import cryoformer.point_density as pd

    monkeypatch.setattr(pd, "PIECE_ELEMENTS", 3 * 16 * 10)                  # 10 points per piece
    torch.manual_seed(3)
    b, p, n, c = 3, 37, 8, 16
    q = torch.randn(p, c) if shared else torch.randn(b, p, c)
    inputs = [q * 2, torch.randn(q.shape) * 0.5, torch.randn(b, n, c), torch.randn(b, n, c),
              torch.randn(1, c), torch.randn(1)]

    def explicit(qn, u, k, v, w2, b2):
        o = _softmax_reference(qn, k, v)                                      # float64, point by point
        return (torch.relu(o + u.double()) @ w2.double().t()).squeeze(-1) + b2.double()

    weights = torch.linspace(-1, 1, b * p).view(b, p)
    grads = []
    for fn in (pd.point_density, explicit):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        grads.append((out.double(), torch.autograd.grad((out * weights).sum(), leaves)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for g_pieces, g_explicit in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g_pieces.double(), g_explicit.double(), rtol=1e-4, atol=1e-5)


def test_canonical_render_without_column_compaction_is_the_same(monkeypatch):
    """On a GPU the canonical renderer samples every lattice point (the compaction's data-dependent width
    would synchronise with the host every step); its images must equal the compacted CPU path's (torch
    form and C kernel), with an off-centre occupied block so that many columns are empty."""
    import cryoformer.model as model_mod
    import cryoformer.render as render_mod

    assert not model_mod.compacts_columns(torch.device("cuda", 0))
    assert model_mod.compacts_columns(torch.device("cpu"))
    torch.manual_seed(4)
    model = CryoFormer(ModelConfig(**SMALL, occupancy_cells=4)).eval()
    model.occupancy.occupied.zero_()
    model.occupancy.occupied[1:3, 0:3, 1:4] = True
    model.occupancy._bump()
    rot = random_rotations(4, seed=5)
    tokens = model.tokens_from_latent(torch.randn(4, 2), 4)
    packed = []
    monkeypatch.setattr(render_mod, "pack_rows", lambda keep: packed.append(1) or pack_rows(keep))
    with torch.no_grad():
        native = model.render(tokens, rot, step=3)                  # the C compaction, where it is built
        real_native = render_mod._native_pack
        monkeypatch.setattr(render_mod, "_native_pack", lambda *a: None)
        compacted = model.render(tokens, rot, step=3)
        assert packed == [1]
        monkeypatch.setattr(render_mod, "_native_pack", real_native)
        monkeypatch.setattr(model_mod, "compacts_columns", lambda device: False)
        every_point = model.render(tokens, rot, step=3)
        assert packed == [1]
    assert compacted.abs().max() > 0
    torch.testing.assert_close(every_point, compacted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native, compacted, rtol=1e-5, atol=1e-6)
