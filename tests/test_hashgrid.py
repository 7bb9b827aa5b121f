"""HashGrid against an independent scalar transliteration of tcnn's CUDA kernel.

The reference below does not import or call :mod:`cryoformer.hashgrid`: it is a line-by-line port
of ``kernel_grid`` / ``grid_index`` / ``pos_fract`` (tiny-cuda-nn ``include/tiny-cuda-nn/encodings/
grid.h``) with Python ints masked to 32 bits and numpy float32 arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cryoformer.hashgrid as hashgrid_module
from cryoformer.hashgrid import HashGrid

U32 = 0xFFFFFFFF
f32 = np.float32


# ------------------------------------------------------------------------------------------------
# Scalar reference (tcnn kernel transliteration)
# ------------------------------------------------------------------------------------------------
def ref_offsets(n_levels, log2_T, base_resolution, per_level_scale):
    """GridEncodingTemplated constructor: per-level hashmap offsets (in entries)."""
    log2_pls = f32(np.log2(f32(per_level_scale)))  # std::log2(float)
    offsets, offset = [], 0
    for i in range(n_levels):
        scale = f32(f32(np.exp2(f32(f32(i) * log2_pls))) * f32(base_resolution)) - f32(1.0)
        resolution = int(math.ceil(float(scale))) + 1  # (uint32_t)ceil(scale) + 1
        max_params = U32 // 2
        params_in_level = max_params if float(resolution) ** 3 > max_params else resolution**3
        params_in_level = (params_in_level + 7) // 8 * 8  # next_multiple(.., 8u)
        params_in_level = min(params_in_level, 1 << log2_T)
        offsets.append(offset)
        offset += params_in_level
    offsets.append(offset)
    return offsets, log2_pls


def ref_fmaf(a, b, c):
    """fmaf emulated: exact product in float64 (24+24 bits), one rounding to float32."""
    return f32(float(a) * float(b) + float(c))


def ref_to_int32_sat(v):
    """(int)float on CUDA saturates (cvt.rzi.s32.f32)."""
    return max(-(2**31), min(2**31 - 1, int(v)))


def ref_grid_index(hashmap_size, grid_resolution, pos_grid):
    stride = 1
    index = 0
    dim = 0
    while dim < 3 and stride <= hashmap_size:
        index = (index + pos_grid[dim] * stride) & U32
        stride = (stride * grid_resolution) & U32
        dim += 1
    if hashmap_size < stride:
        primes = (1, 2654435761, 805459861)
        result = 0
        for i in range(3):
            result ^= (pos_grid[i] * primes[i]) & U32
        index = result
    return index % hashmap_size


def ref_encode(x, table, n_levels, n_features, log2_T, base_resolution, per_level_scale):
    """x (P, 3) float32 numpy, table (total, F) float32 numpy -> (P, L*F) float32."""
    offsets, log2_pls = ref_offsets(n_levels, log2_T, base_resolution, per_level_scale)
    P = x.shape[0]
    out = np.zeros((P, n_levels * n_features), dtype=np.float32)
    for i in range(P):
        for level in range(n_levels):
            hashmap_size = offsets[level + 1] - offsets[level]
            scale = f32(f32(np.exp2(f32(f32(level) * log2_pls))) * f32(base_resolution)) - f32(1.0)
            grid_resolution = int(math.ceil(float(scale))) + 1
            pos, pos_grid = [], []
            for dim in range(3):
                p = ref_fmaf(scale, x[i, dim], 0.5)
                tmp = f32(math.floor(p))
                pos_grid.append(ref_to_int32_sat(tmp) & U32)  # (uint32_t)(int)tmp
                pos.append(f32(p - tmp))
            result = [f32(0.0)] * n_features
            for idx in range(8):
                weight = f32(1.0)
                local = [0, 0, 0]
                for dim in range(3):
                    if (idx & (1 << dim)) == 0:
                        weight = f32(weight * f32(f32(1.0) - pos[dim]))
                        local[dim] = pos_grid[dim]
                    else:
                        weight = f32(weight * pos[dim])
                        local[dim] = (pos_grid[dim] + 1) & U32
                index = ref_grid_index(hashmap_size, grid_resolution, local)
                val = table[offsets[level] + index]
                for f in range(n_features):
                    result[f] = ref_fmaf(weight, val[f], result[f])  # fma((T)weight, val, result)
            out[i, level * n_features : (level + 1) * n_features] = result
    return out, offsets


def ref_corners(x, n_levels, log2_T, base_resolution, per_level_scale):
    """Rows (P, L, 8) into the flat [total, F] table and weights (P, L, 8), from the reference."""
    offsets, log2_pls = ref_offsets(n_levels, log2_T, base_resolution, per_level_scale)
    P = x.shape[0]
    rows = np.zeros((P, n_levels, 8), dtype=np.int64)
    wts = np.zeros((P, n_levels, 8), dtype=np.float32)
    for i in range(P):
        for level in range(n_levels):
            size = offsets[level + 1] - offsets[level]
            scale = f32(f32(np.exp2(f32(f32(level) * log2_pls))) * f32(base_resolution)) - f32(1.0)
            res = int(math.ceil(float(scale))) + 1
            pos, pg = [], []
            for dim in range(3):
                p = ref_fmaf(scale, x[i, dim], 0.5)
                tmp = f32(math.floor(p))
                pg.append(ref_to_int32_sat(tmp) & U32)
                pos.append(f32(p - tmp))
            for c in range(8):
                w = f32(1.0)
                local = []
                for dim in range(3):
                    bit = (c >> dim) & 1
                    w = f32(w * (pos[dim] if bit else f32(f32(1.0) - pos[dim])))
                    local.append((pg[dim] + bit) & U32)
                rows[i, level, c] = offsets[level] + ref_grid_index(size, res, local)
                wts[i, level, c] = w
    return rows, wts


def _points(n, seed=0):
    """Mostly in [0,1]^3, plus out-of-range, negative and boundary points."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3), dtype=np.float32)
    k = n // 4
    x[:k] = rng.uniform(-1.5, 2.5, size=(k, 3)).astype(np.float32)
    x[k : k + 8] = np.array(
        [[0, 0, 0], [1, 1, 1], [-1e-7, 0.5, 1 + 1e-7], [0.999999, 1e-6, 0.5], [-3, -2, 5],
         [0.5, 0.5, 0.5], [1 / 3, 2 / 3, 0.25], [-0.5, 0.49, -0.01]],
        dtype=np.float32,
    )
    return x


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
def test_level_table_default_config():
    enc = HashGrid(backend="torch")
    t = enc.level_table()
    assert [lv["res"] for lv in t] == [16, 24, 36, 54, 81, 122, 183, 274, 411, 616, 923, 1384,
                                       2076, 3114, 4671, 7007]
    assert [lv["size"] for lv in t] == [4096, 13824] + [32768] * 14
    assert [lv["hashed"] for lv in t] == [False, False] + [True] * 14
    assert [lv["offset"] for lv in t] == list(np.cumsum([0] + [lv["size"] for lv in t])[:-1])
    assert enc.n_entries == 476_672
    assert enc.params.numel() == 953_344
    assert enc.n_output_dims == 32
    offsets, _ = ref_offsets(16, 15, 16, 1.5)
    assert [lv["offset"] for lv in t] == offsets[:-1]
    # tcnn init: U(-1e-4, 1e-4), and one flat parameter named ``params`` (tcnn's layout)
    assert float(enc.params.detach().abs().max()) <= 1e-4
    assert list(enc.state_dict().keys()) == ["params"]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(n_levels=16, n_features=2, log2_table_size=15, base_resolution=16, per_level_scale=1.5),
        # non-power-of-two level sizes, F=1 and F=4, a level that is dense only after rounding to 8
        dict(n_levels=6, n_features=4, log2_table_size=12, base_resolution=3, per_level_scale=2.0),
        dict(n_levels=5, n_features=1, log2_table_size=10, base_resolution=5, per_level_scale=1.7),
    ],
)
def test_matches_scalar_kernel_reference(cfg):
    """Max abs difference to the scalar CUDA transliteration is <= 2e-6 (params in [-1, 1]).

    Both sides emulate ``fmaf`` through float64, so positions, floors and weights agree exactly;
    what remains is the order of the 8-corner sum (tcnn accumulates sequentially with fma, the
    module sums a (P, 8, F) tensor), i.e. a few fp32 ulps of |out| <= 1.
    """
    n = 200 if cfg["n_levels"] == 16 else 120
    enc = HashGrid(backend="torch", **cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        enc.params.copy_(torch.rand(enc.params.shape, generator=gen) * 2 - 1)
    x = _points(n)
    got = enc(torch.from_numpy(x)).detach().numpy()
    table = enc.params.detach().numpy().reshape(-1, cfg["n_features"])
    want, offsets = ref_encode(x, table, cfg["n_levels"], cfg["n_features"],
                               cfg["log2_table_size"], cfg["base_resolution"], cfg["per_level_scale"])
    assert offsets[-1] == enc.n_entries
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 2e-6


def test_fp32_positions_within_stated_tolerance():
    """Without fma emulation the finest level is off by at most ~1e-3 * max|param| (notes §2.3)."""
    enc = HashGrid(backend="torch", fma_emulation=False)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        enc.params.copy_(torch.rand(enc.params.shape, generator=gen) * 2 - 1)
    x = np.random.default_rng(3).random((64, 3), dtype=np.float32)
    got = enc(torch.from_numpy(x)).detach().numpy()
    want, _ = ref_encode(x, enc.params.detach().numpy().reshape(-1, 2), 16, 2, 15, 16, 1.5)
    assert np.abs(got - want).max() <= 3e-3


@pytest.mark.parametrize("cache_bytes", [256 << 20, 0], ids=["cached-corners", "recomputed-corners"])
def test_custom_backward_matches_autograd_gather(monkeypatch, cache_bytes):
    """index_add_ backward == autograd through a naive gather built from the reference corners, both
    when the forward keeps the corner indices for the backward and when the backward recomputes them."""
    monkeypatch.setattr(hashgrid_module, "_CACHE_BYTES", cache_bytes)
    cfg = dict(n_levels=4, n_features=2, log2_table_size=9, base_resolution=4, per_level_scale=2.0)
    enc = HashGrid(backend="torch", **cfg)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        enc.params.copy_(torch.rand(enc.params.shape, generator=gen) * 2 - 1)
    x = _points(60, seed=5)
    rows, wts = ref_corners(x, 4, 9, 4, 2.0)  # (P, L, 8)
    upstream = torch.randn(60, 8, generator=gen)

    out = enc(torch.from_numpy(x))
    (out * upstream).sum().backward()
    g_custom = enc.params.grad.clone()

    p = enc.params.detach().clone().double().requires_grad_(True)
    table = p.view(-1, 2)
    naive = (table[torch.from_numpy(rows)] * torch.from_numpy(wts).double()[..., None]).sum(2)
    naive = naive.reshape(60, 8)  # (P, L, F) -> level-major columns
    assert torch.allclose(naive.float(), out.detach(), atol=2e-6)
    (naive * upstream.double()).sum().backward()
    assert torch.allclose(g_custom.double(), p.grad, atol=1e-5, rtol=1e-5)
    assert g_custom.abs().sum() > 0


def test_no_gradient_to_positions():
    enc = HashGrid(n_levels=2, log2_table_size=8, backend="torch")
    x = torch.rand(10, 3, requires_grad=True)
    enc(x).sum().backward()
    assert x.grad is None
    assert enc.params.grad is not None


def test_output_is_level_major():
    """Column l*F+f is feature f of level l: set one level's table to a constant per feature."""
    enc = HashGrid(n_levels=3, n_features=2, log2_table_size=10, base_resolution=4, backend="torch")
    t = enc.level_table()
    with torch.no_grad():
        table = enc.params.view(-1, 2)
        table.zero_()
        for lv in t:
            sl = slice(lv["offset"], lv["offset"] + lv["size"])
            table[sl, 0] = 10.0 * lv["level"] + 1.0
            table[sl, 1] = 10.0 * lv["level"] + 2.0
    out = enc(torch.rand(17, 3))
    # trilinear weights sum to 1, so each column returns its constant
    want = torch.tensor([1.0, 2.0, 11.0, 12.0, 21.0, 22.0]).expand(17, 6)
    assert torch.allclose(out, want, atol=1e-5)


def test_batch_shape_and_autocast_cpu():
    enc = HashGrid(n_levels=4, log2_table_size=10, backend="torch")
    x = torch.rand(2, 5, 3)
    y = enc(x)
    assert y.shape == (2, 5, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z = enc(x.reshape(-1, 3))
        z.float().sum().backward()
    assert z.dtype == torch.float32
    assert torch.equal(z.detach(), y.detach().reshape(-1, 8))
    assert enc.params.grad.dtype == torch.float32


def test_state_dict_roundtrip():
    a = HashGrid(n_levels=3, log2_table_size=9, backend="torch", seed=1)
    b = HashGrid(n_levels=3, log2_table_size=9, backend="torch", seed=2)
    assert not torch.equal(a.params, b.params)
    b.load_state_dict(a.state_dict())
    x = torch.rand(9, 3)
    assert torch.equal(a(x), b(x))


def test_cpu_fast_paths_equal_generic_paths(monkeypatch):
    """The CPU-only bmm / complex64 scatter equal the broadcast form used on CUDA (F = 1, 2, 4)."""
    import cryoformer.hashgrid as hg

    x = torch.from_numpy(_points(50, seed=7))
    for F in (1, 2, 4):
        enc = HashGrid(n_levels=4, n_features=F, log2_table_size=9, base_resolution=4, backend="torch")
        with torch.no_grad():
            enc.params.copy_(torch.randn(enc.params.shape, generator=torch.Generator().manual_seed(F)))
        up = torch.randn(50, 4 * F, generator=torch.Generator().manual_seed(10 + F))
        results = []
        for fast in (True, False):
            monkeypatch.setattr(hg, "_cpu_fast_paths", lambda _x, fast=fast: fast)
            enc.params.grad = None
            out = enc(x)
            (out * up).sum().backward()
            results.append((out.detach(), enc.params.grad.clone()))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
        assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_backend_selection_without_tinycudann():
    import cryoformer.hashgrid as hg

    enc = HashGrid(n_levels=2, log2_table_size=8)  # "auto" on CPU -> torch path
    assert enc(torch.rand(4, 3)).shape == (4, 4)
    if not hg._tcnn_available():
        with pytest.raises(RuntimeError):
            HashGrid(backend="tcnn")
    with pytest.raises(ValueError):
        HashGrid(backend="cuda")
