"""The C kernels of the CPU step (``cryoformer/native``) against independent references: the point head
against an explicit float64 softmax, the hash grid against its torch form (itself checked against the
scalar tcnn reference in test_hashgrid.py), the bf16 products within bf16's rounding, the image lattice
trimmed to the molecule's ball against the full one, and the fallbacks when no kernels can be built."""

import numpy as np
import pytest
import torch

import cryoformer.native.build as native_build
import cryoformer.point_density as pd
from cryoformer.device import head_product_dtype
from cryoformer.hashgrid import HashGrid
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.poses import random_rotations as _np_rotations

pytestmark = pytest.mark.skipif(native_build.library() is None, reason="no C compiler: the torch forms run")

SMALL = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32,
             hash_levels=8, hash_log2_size=12)


def _explicit_head(qn, u, k, v, w2, b2):
    """w2 . ReLU(softmax(qn K^T) V + u) + b2 in float64, with torch's own softmax."""
    qn, u, k, v, w2, b2 = (t.double() for t in (qn, u, k, v, w2, b2))
    a = torch.softmax(qn @ k.transpose(1, 2), -1)
    return (torch.relu(a @ v + u) @ w2.t()).squeeze(-1) + b2


def _head_inputs(p: int, seed: int, b: int = 3, n: int = 8, c: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p, c, generator=g) * 0.8, torch.randn(p, c, generator=g) * 0.5,
            torch.randn(b, n, c, generator=g), torch.randn(b, n, c, generator=g), torch.randn(1, c, generator=g),
            torch.randn(1, generator=g)]


def _values_and_grads(fn, inputs, weights):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return out.detach().double(), [g.double() for g in grads]


@pytest.mark.parametrize("keep", [True, False])
def test_native_head_fp32_equals_the_explicit_form(keep, monkeypatch):
    """Several pieces and a ragged last one, with the forward's weights kept for the backward or
    recomputed from the saved maxima and sums: values and the gradients of all six inputs."""
    monkeypatch.setattr(pd, "PIECE_ELEMENTS", 3 * 16 * 10)                  # 10 points per piece
    if not keep:
        monkeypatch.setattr(pd, "KEEP_MAX_ELEMENTS", 0)
    inputs = _head_inputs(37, seed=3)
    weights = torch.linspace(-1, 1, 3 * 37).view(3, 37).double()
    got, got_g = _values_and_grads(pd.native_point_density, inputs, weights)
    want, want_g = _values_and_grads(_explicit_head, inputs, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_head_bf16_products_stay_within_bf16_rounding():
    """Products in bf16 (8 significant bits), softmax and sums in fp32: densities within 2 % of the
    float64 form, every gradient pointing the same way (cosine > 0.99) with its norm within 5 %."""
    inputs = _head_inputs(300, seed=5)
    weights = torch.linspace(-1, 1, 3 * 300).view(3, 300).double()
    got, got_g = _values_and_grads(lambda *t: pd.native_point_density(*t, dtype=torch.bfloat16), inputs, weights)
    want, want_g = _values_and_grads(_explicit_head, inputs, weights)
    assert float((got - want).norm() / want.norm()) < 0.02
    for a, b in zip(got_g[:5], want_g[:5]):
        cos = float((a * b).sum() / (a.norm() * b.norm()))
        assert cos > 0.99 and abs(float(a.norm() / b.norm()) - 1) < 0.05


def test_model_routes_shared_queries_to_the_native_head_and_eval_multiplies_in_fp32(monkeypatch):
    """Training on a CPU takes the native head with the head's product dtype; a map (eval mode) is made
    with fp32 products whatever that dtype, so exported maps do not depend on it."""
    import cryoformer.decoder as decoder

    calls = []
    real = decoder.native_point_density
    monkeypatch.setattr(decoder, "native_point_density", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(7)
    model = CryoFormer(ModelConfig(**SMALL))
    model.head.product_dtype = torch.bfloat16
    model.train()
    model.render(model.tokens_from_latent(torch.randn(2, 2), 2), torch.eye(3).expand(2, 3, 3), step=1)
    assert calls == [torch.bfloat16]
    model.eval()
    with torch.no_grad():
        bf16_set = model.volume(None)
        model.head.product_dtype = torch.float32
        fp32_set = model.volume(None)
    assert calls[1:] == [torch.float32, torch.float32]
    assert torch.equal(bf16_set, fp32_set)


@pytest.mark.parametrize("kept", [True, False])
def test_native_hash_grid_equals_the_torch_form(kept, monkeypatch):
    """Values and the table gradient, hashed and dense levels, points also outside [0, 1]^3, with and
    without the fmaf emulation, with the corners kept for the backward or recomputed there."""
    import cryoformer.hashgrid as hashgrid

    if not kept:
        monkeypatch.setattr(hashgrid, "_CACHE_BYTES", 0)
    torch.manual_seed(0)
    x = torch.rand(500, 3) * 1.4 - 0.2
    g = torch.randn(500, 16)
    for fma in (True, False):
        enc = HashGrid(n_levels=8, log2_table_size=10, base_resolution=4, per_level_scale=1.6, fma_emulation=fma)
        with torch.no_grad():
            enc.params.uniform_(-1, 1)
        results = []
        for lib in (native_build.library(), None):
            monkeypatch.setattr(native_build, "library", lambda _lib=lib: _lib)
            enc.params.grad = None
            out = enc(x)
            out.backward(g)
            results.append((out.detach(), enc.params.grad.clone()))
        (o_native, g_native), (o_torch, g_torch) = results
        assert g_torch.abs().sum() > 0
        torch.testing.assert_close(o_native, o_torch, rtol=0, atol=1e-6)
        torch.testing.assert_close(g_native, g_torch, rtol=1e-5, atol=1e-6)


def test_image_lattice_trimmed_to_the_molecule_renders_the_same(monkeypatch):
    """The canonical renderer's image lattice ends where no sample can reach an occupied voxel in any
    pose and sub-voxel offset; with an off-centre block occupied, the training step's images (offset
    grid) equal those of the whole sphere's lattice."""
    torch.manual_seed(4)
    model = CryoFormer(ModelConfig(**SMALL, occupancy_cells=8)).train()
    model.occupancy.occupied.zero_()
    model.occupancy.occupied[3:5, 4:6, 3:5] = True
    model.occupancy._bump()
    rot = torch.as_tensor(_np_rotations(6, np.random.default_rng(5)), dtype=torch.float32)
    tokens = model.tokens_from_latent(torch.randn(6, 2), 6).detach()
    trimmed = model.render(tokens, rot, step=3).detach()
    lattice = model._lattices[(16, torch.device("cpu"))]
    monkeypatch.setattr(CryoFormer, "_reach_radius", lambda self, pts, box: box / 2.0 + 2.0)
    model._lattices.clear()
    full = model.render(tokens, rot, step=3).detach()
    assert len(model._lattices[(16, torch.device("cpu"))]["image_pts"]) > 1.5 * len(lattice["image_pts"])
    assert trimmed.abs().max() > 0
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)


def test_bf16_products_only_where_the_cpu_multiplies_bf16(monkeypatch):
    import cryoformer.device as device

    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: True)
    assert head_product_dtype(torch.device("cpu"), amp=True) == torch.bfloat16
    assert head_product_dtype(torch.device("cpu"), amp=False) == torch.float32
    assert head_product_dtype(torch.device("cuda", 0), amp=True) == torch.float32   # autocast decides there
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: False)
    assert head_product_dtype(torch.device("cpu"), amp=True) == torch.float32


def test_no_compiler_or_switched_off_means_the_torch_forms(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYOFORMER_NATIVE_DIR", str(tmp_path))
    native_build.library.cache_clear()
    try:
        monkeypatch.setattr(native_build, "_compiler", lambda: None)
        assert native_build.library() is None
        native_build.library.cache_clear()
        monkeypatch.undo()
        monkeypatch.setenv("CRYOFORMER_NATIVE", "0")
        assert native_build.library() is None
    finally:
        native_build.library.cache_clear()
    q, k = torch.randn(5, 4), torch.randn(2, 3, 4)
    monkeypatch.setattr(pd, "native_library", lambda: None)
    assert not pd.native_pays(q, k)


def test_no_lattice_point_beyond_the_trimmed_radius_reaches_an_occupied_voxel():
    """Brute force over poses and sub-voxel offsets: every point of the whole sphere's lattice whose
    trilinear sample can reach an occupied voxel (the renderer's own reach test) lies inside the radius."""
    from cryoformer.lattice import image_plane_points
    from cryoformer.render import reach_lookup, rotated_points

    model = CryoFormer(ModelConfig(**SMALL, occupancy_cells=8)).train()
    model.occupancy.occupied.zero_()
    model.occupancy.occupied[3:5, 4:6, 3:5] = True
    model.occupancy._bump()
    lat = model._lattice(16)
    radius = float(lat["image_pts"].norm(dim=-1).max())
    pts, _ = image_plane_points(16, radius=10.0)
    rot = torch.as_tensor(_np_rotations(64, np.random.default_rng(1)), dtype=torch.float32)
    offsets = torch.rand(64, 1, 3) - 0.5
    reached = reach_lookup(lat["reach"], rotated_points(pts, rot) - offsets).any(0)
    assert reached.sum() > 100
    assert float(pts[reached].norm(dim=-1).max()) <= radius
    assert radius < 9.0                                                     # trimmed at all


def test_native_column_choice_projects_as_the_torch_form(monkeypatch):
    """Rotation, reach test and compaction in C: the same projections as the torch form, with a
    sub-voxel offset and a sparse support, and the same volume gradient."""
    import cryoformer.render as render
    from cryoformer.lattice import image_plane_points

    torch.manual_seed(2)
    box = 16
    support = torch.zeros(box, box, box, dtype=torch.bool)
    support[3:9, 6:12, 4:8] = True
    vols = (torch.randn(3, box, box, box) * support).requires_grad_()
    rot = torch.as_tensor(_np_rotations(3, np.random.default_rng(8)), dtype=torch.float32)
    pts, pix = image_plane_points(box, radius=box / 2 + 2)
    offset = torch.tensor([0.3, -0.45, 0.1])
    reach = render.sample_reach(support)
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(render, "_native_pack", lambda *a: None)
        img = render.project_volumes(vols, rot, pts, pix, offset, reach=reach)
        (grad,) = torch.autograd.grad((img * torch.linspace(-1, 1, img.numel()).view_as(img)).sum(), vols)
        results.append((img.detach(), grad))
    assert results[1][0].abs().max() > 0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def test_kernels_give_the_same_results_on_several_threads():
    """The parallel loops split work without races: head, hash grid and projection on 3 threads equal
    the 1-thread results (sums over threads, and torch's own multithreaded products, may differ by
    rounding only)."""
    from cryoformer.lattice import image_plane_points
    from cryoformer.render import project_volumes, sample_reach

    torch.manual_seed(6)
    inputs = _head_inputs(700, seed=9)
    weights = torch.linspace(-1, 1, 3 * 700).view(3, 700).double()
    enc = HashGrid(n_levels=6, log2_table_size=9, base_resolution=4, per_level_scale=1.7)
    x, g = torch.rand(900, 3), torch.randn(900, 12)
    support = torch.zeros(12, 12, 12, dtype=torch.bool)
    support[2:9, 3:10, 4:8] = True
    vols = (torch.randn(4, 12, 12, 12) * support).requires_grad_()
    rot = torch.as_tensor(_np_rotations(4, np.random.default_rng(3)), dtype=torch.float32)
    pts, pix = image_plane_points(12, radius=8.0)
    reach = sample_reach(support)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            head = _values_and_grads(pd.native_point_density, inputs, weights)
            enc.params.grad = None
            enc(x).backward(g)
            img = project_volumes(vols, rot, pts, pix, None, reach=reach)
            (gv,) = torch.autograd.grad(img.sum(), vols)
            results.append([head[0], *head[1], enc.params.grad.clone(), img.detach(), gv])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_query_norm_equals_the_torch_form(monkeypatch):
    """LayerNorm(q + code) * temperature in one C pass: the query and the gradients of the features,
    the norm's weight and bias, the temperature and the code's projection as in the torch form."""
    import cryoformer.decoder as decoder
    from cryoformer.decoder import SpatialDensityHead

    torch.manual_seed(0)
    head = SpatialDensityHead(32, 16, 64, "point", 16, 2.0)
    with torch.no_grad():
        head.q_norm.weight.uniform_(0.5, 1.5)
        head.q_norm.bias.uniform_(-0.3, 0.3)
        head.log_temp.fill_(1.7)
    feats, pos = torch.randn(300, 32), torch.rand(300, 3) - 0.5
    g = torch.randn(300, 64)
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(decoder, "_scaled_norm_runs", lambda *a: False)
        head.zero_grad()
        leaf = feats.clone().requires_grad_()
        qn, _ = head.spatial_query(leaf, pos)
        (qn * g).sum().backward()
        grads = [head.q_norm.weight.grad, head.q_norm.bias.grad, head.log_temp.grad,
                 head.query_code.proj.weight.grad, head.spatial[0].weight.grad]
        results.append([qn.detach(), leaf.grad, *[t.clone() for t in grads]])
    assert float(results[1][4].abs()) > 0                                   # the temperature learns
    for a, b in zip(*results):                                              # sums over 300 rows: float rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
