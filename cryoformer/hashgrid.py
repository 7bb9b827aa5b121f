"""tiny-cuda-nn's multi-resolution HashGrid encoding, reproduced in plain PyTorch.

Why reproduce tcnn instead of using one of the common PyTorch hash grids: cryoFormer used tcnn, and the
well-known PyTorch ports (nerfstudio, fast-ngp) compute a *different* function (no ``-1`` in the scale,
no ``+0.5`` offset, every level hashed, other init).  Matching tcnn means a checkpoint trained on a GPU
with tcnn evaluates to the same density on a CPU without it, and the ablations are about the model and
not about an accidental change of encoding.  The reference is tcnn's own source (NVlabs/tiny-cuda-nn at
commit 6ee3546: ``include/tiny-cuda-nn/encodings/grid.h`` and the torch bindings' ``modules.py``).

Design decisions, and why:

* ``scale_l = exp2(l * log2(b)) * N_min - 1`` in fp32 and ``res_l = ceil(scale_l) + 1``: tcnn counts
  *vertices*, so a level with ``N_min = 16`` spans 15 cells plus the one extra vertex the ``+0.5``
  offset needs.  Every constant is computed exactly as the CUDA code does (fp32), because ``res_l``
  decides the table sizes and therefore the parameter layout.
* ``pos = fma(scale, x, 0.5)``: the half-cell offset staggers the levels so vertices of different
  levels do not coincide at integer multiples of the base scale (Instant-NGP, App. A); without it
  all levels would share the vertex at the origin and at every power-of-``b`` position.  We emulate
  the single rounding of ``fmaf`` by forming ``scale * x + 0.5`` in fp64 and rounding once to fp32:
  a plain fp32 ``x * scale + 0.5`` rounds twice.  For pos > 1 adding 0.5 is exact, so the two only
  differ where the sum crosses a power of two -- rarely, but then by up to one ulp of pos (~5e-4 at
  pos ~ 7000), and by ~1e-7 relative everywhere at coarse levels.  The fp64 step is only on the
  (3, P) positions, not on the (8, P, F) gathers; its cost was within timing noise
  (``bench/bench_hashgrid.py`` measures both; ``fma_emulation=False`` gives the plain fp32 path).
* ``scale`` uses numpy's fp32 ``exp2``, which may differ from CUDA's ``exp2f`` (<= 2 ulp) in the last
  bit.  That moves fine-level positions by up to ~1e-3 of a cell, and could change ``res`` only
  where ``scale`` is within an ulp of an integer (default config: level 1 gives 23.0, level 4
  79.99999).  For hashed levels ``res`` does not enter the index; for dense level 1 our res = 24
  matches the level table in the design notes.  Not verifiable here without a GPU.
* Coarse levels are *dense* (``g0 + g1*res + g2*res^2``) while ``res^3`` fits the table: then every
  vertex has its own entry and there are no collisions to average out; hashing is only used where the
  grid has more vertices than ``2^log2_T`` entries.  Nothing is clamped: out-of-range positions wrap in
  uint32 and then modulo the level size, exactly as in tcnn (the dense index of a negative vertex
  wraps, it is not clipped).  ``floor`` is converted to int32 with saturation, as CUDA's ``cvt`` does.
* Integer arithmetic is done in int64 with the vertex coordinates kept as *signed* 32-bit values and
  the result masked to 32 bits: ``(uint32)g * prime mod 2^32`` equals ``(int64)g * prime mod 2^32``
  and the signed product never overflows int64 (|g| <= 2^31, prime < 2^32).
* A custom :class:`torch.autograd.Function` with an ``index_add_`` backward: autograd through
  ``table[idx]`` builds a (P*8, F) gather node per level and a generic scatter in backward, which is
  several times slower on CPU and keeps all indices alive.  Our backward recomputes the indices and
  weights per level (cheap integer work) instead of storing 16 x (P, 8) int64 tensors, so the
  memory held between forward and backward is just ``x``.
* **Only the table gets a gradient.**  ``x`` gets ``None``: poses are given (or refined elsewhere),
  so dL/dx would be pure cost.  Do not put this encoder on a path that needs gradients w.r.t. the
  positions.
* Everything is computed in fp32 with autocast disabled, so forward and backward behave the same
  under ``torch.autocast`` on CUDA or CPU; the output is fp32.  (tcnn's default accumulates in fp16,
  which no fp32 implementation can reproduce bit-for-bit.)
* One flat ``nn.Parameter`` named ``params`` of length ``total * F``, level by level, feature
  innermost: this is tcnn's own layout, so a ``state_dict`` moves between the torch and tcnn
  backends (and a tcnn ``params`` tensor loads directly).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from .compiled import CompiledFunction

__all__ = ["HashGrid", "hashgrid_level_table"]

_MASK32 = 0xFFFFFFFF
# tcnn's CoherentPrime factors for the first three dimensions ("1" keeps x-neighbours coherent in memory).
_PRIMES = (1, 2654435761, 805459861)
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_CACHE_BYTES = 256 << 20  # corner indices + weights kept for the backward up to this size


def _next_multiple(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def hashgrid_level_table(
    n_levels: int, log2_table_size: int, base_resolution: float, per_level_scale: float
) -> list[dict]:
    """Per-level ``scale``, ``res``, ``size``, ``offset`` and ``hashed`` exactly as tcnn derives them.

    All float steps are fp32 (tcnn computes them with ``float`` on host and device), so the table
    sizes -- hence the parameter layout -- agree with a tcnn checkpoint.
    """
    log2s = np.float32(np.log2(np.float32(per_level_scale)))
    base = np.float32(base_resolution)
    cap = 1 << int(log2_table_size)
    max_params = _MASK32 // 2
    table, offset = [], 0
    for level in range(n_levels):
        scale = np.float32(np.exp2(np.float32(level) * log2s)) * base - np.float32(1.0)
        scale = np.float32(scale)
        res = int(math.ceil(float(scale))) + 1
        dense = res**3
        size = min(_next_multiple(min(dense, max_params), 8), cap)
        hashed = size < dense
        table.append(
            dict(level=level, scale=float(scale), res=res, size=size, offset=offset, hashed=hashed)
        )
        offset += size
    return table


def _positions_t(x: torch.Tensor, fma_emulation: bool) -> torch.Tensor:
    """(3, P) coordinates, fp64 when emulating ``fmaf``.  Dimension-major so that every per-level
    tensor below has the long point axis innermost (broadcasting over a trailing axis of 2 or 8
    defeats vectorization and was ~4x slower on CPU)."""
    return (x.double() if fma_emulation else x.float()).t().contiguous()


def _level_corners(xt: torch.Tensor, lv: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (8, P) int64 into this level's table and trilinear weights (8, P) fp32.

    Corner ``c = 4*c2 + 2*c1 + c0`` takes ``g_d + c_d``, the CUDA loop order; weights are formed as
    ``(w_0 * w_1) * w_2`` in fp32, tcnn's order, so they match it bit for bit.
    """
    P = xt.shape[1]
    # fmaf(scale, x, 0.5): in fp64 the product is exact, so this rounds once, like fmaf.
    pos = (xt * lv["scale"] + 0.5).float()
    fl = torch.floor(pos)
    frac = pos - fl  # (3, P), the same fp32 subtraction as tcnn
    # (uint32)(int)floor(pos): CUDA's float->int32 conversion saturates; keep it as signed int64.
    g = fl.clamp_(-2147483648.0, 2147483648.0).long().clamp_(_INT32_MIN, _INT32_MAX)
    gg = torch.stack((g, g + 1))  # (2, 3, P): g_d + c_d
    ww = torch.stack((1.0 - frac, frac))  # (2, 3, P)
    w = (ww[None, None, :, 0] * ww[None, :, None, 1]) * ww[:, None, None, 2]  # (2, 2, 2, P)
    size = lv["size"]
    # Per-dimension factors as Python scalars, never a tensor made from a list: on CUDA that is a
    # synchronous host-to-device copy, two per level and pass (hundreds per training step).
    if lv["hashed"]:
        a0, a1, a2 = (gg[:, d] * m for d, m in enumerate(_PRIMES))  # (2, P) each
        pow2 = size & (size - 1) == 0
        # "& (2^32-1) then % size" is one mask for a power-of-two size, and masks commute with xor.
        for a in (a0, a1, a2):
            a &= (size - 1) if pow2 else _MASK32
        idx = a2[:, None, None] ^ a1[None, :, None] ^ a0[None, None, :]
        if not pow2:
            idx = idx % size
    else:
        res = lv["res"]
        a0, a1, a2 = (gg[:, d] * m for d, m in enumerate((1, res, res * res)))
        idx = (a2[:, None, None] + a1[None, :, None] + a0[None, None, :]) & _MASK32
        idx = idx % size
    return idx.view(8, P), w.reshape(8, P)


#: the level arithmetic the hash grid runs: ~30 small integer and float kernels per level, fused when compiled
level_corners = CompiledFunction(_level_corners, "the hash grid", graphs_per_fn=64)


def _cpu_fast_paths(x: torch.Tensor) -> bool:
    """CPU-tuned bmm / complex64 scatter; the plain broadcast form is used elsewhere (and in a test)."""
    return x.device.type == "cpu"


def _gather_rows(tab: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tab[idx]`` for a (size, F) fp32 table.  A row of F=2 (F=4) floats is gathered as one
    float64 (complex128) element, which is ~3x faster on CPU than gathering 2-float rows."""
    F = tab.shape[1]
    wide = {2: torch.float64, 4: torch.complex128}.get(F)
    if wide is not None and tab.is_contiguous():
        return tab.view(wide).view(-1).index_select(0, idx).view(torch.float32).view(-1, F)
    return tab.index_select(0, idx)


def _native_levels(x: torch.Tensor, params: torch.Tensor, levels: list[dict]):
    """The C kernels and the level table as arrays, where they can run this call: fp32 CPU tensors, all
    levels in order, and the kernels built on this machine (``cryoformer.native.build``); else None."""
    if x.device.type != "cpu" or params.dtype != torch.float32 or \
            [lv["level"] for lv in levels] != list(range(len(levels))):
        return None
    from .native.build import kernels

    lib = kernels()
    if lib is None:
        return None
    table = tuple((lv["scale"], lv["res"], lv["size"], lv["offset"], lv["hashed"]) for lv in levels)
    return lib, _level_arrays(table)


@functools.lru_cache(maxsize=8)
def _level_arrays(table: tuple[tuple, ...]) -> tuple[torch.Tensor, ...]:
    """A grid's level table as the C kernels' arrays (scale fp64; res, size, offset, hashed int64), made
    once per grid rather than at every forward."""
    scale, *ints = zip(*table)
    return (torch.tensor(scale, dtype=torch.float64), *(torch.tensor([int(v) for v in col], dtype=torch.int64)
                                                        for col in ints))


def _native_call(fn, x64: torch.Tensor, arrays, fma: bool, data: torch.Tensor, F: int, out: torch.Tensor,
                 corners: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    scale, res, size, offset, hashed = arrays
    rows, weights = (None, None) if corners is None else (corners[0].data_ptr(), corners[1].data_ptr())
    fn(x64.data_ptr(), x64.shape[0], scale.data_ptr(), res.data_ptr(), size.data_ptr(), offset.data_ptr(),
       hashed.data_ptr(), len(scale), int(fma), data.data_ptr(), F, out.data_ptr(), rows, weights)


def _native_forward(ctx, x, params, levels, n_features, fma, native):
    """The forward in one C loop (``native/hash_grid.c``): the torch form's arithmetic, one pass. The
    corners' rows and weights are kept for the backward while they fit ``_CACHE_BYTES`` (8 bytes per
    corner: 2.8 MB at train box 32, 22 MB at 64), as the torch form keeps its own."""
    lib, arrays = native
    x64 = x.detach().reshape(-1, 3).double().contiguous()
    table = params.detach().view(-1, n_features).contiguous()
    p, n_levels = x64.shape[0], len(levels)
    out = torch.empty(p, n_levels * n_features)
    corners = None
    if params.requires_grad and p * n_levels * 8 * 8 <= _CACHE_BYTES:
        corners = (torch.empty(n_levels, p, 8, dtype=torch.int32), torch.empty(n_levels, p, 8))
    _native_call(lib.hash_grid_fwd, x64, arrays, fma, table, n_features, out, corners)
    ctx.save_for_backward(x64)
    ctx.native, ctx.n_features, ctx.fma, ctx.corners = native, n_features, fma, corners
    ctx.params_shape, ctx.params_dtype = params.shape, params.dtype
    return out


def _native_backward(ctx, x64, grad_out) -> torch.Tensor:
    lib, arrays = ctx.native
    total = int(arrays[3][-1] + arrays[2][-1])
    gtab = torch.zeros(total, ctx.n_features)
    corners, ctx.corners = ctx.corners, None
    _native_call(lib.hash_grid_bwd, x64, arrays, ctx.fma, grad_out.float().contiguous(), ctx.n_features, gtab,
                 corners)
    return gtab.view(ctx.params_shape).to(ctx.params_dtype)


class _HashGridFunction(torch.autograd.Function):
    """Forward gathers 8 rows per level; backward scatters with ``index_add_`` (table gradient only)."""

    @staticmethod
    def forward(ctx, x, params, levels, n_features, fma_emulation):
        native = _native_levels(x, params, levels)
        if native is not None:
            return _native_forward(ctx, x, params, levels, n_features, fma_emulation, native)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            table = params.float().view(-1, n_features)
            P, F = x.shape[0], n_features
            xt = _positions_t(x, fma_emulation)
            cpu = _cpu_fast_paths(x)
            out = torch.empty(P, len(levels) * F, device=x.device, dtype=torch.float32)
            # Keep (idx, w) for the backward when they are small: recomputing them is about a quarter of
            # the forward+backward time on CPU; past the budget, memory matters more than that.
            keep = params.requires_grad and P * len(levels) * 8 * 12 <= _CACHE_BYTES
            cache = []
            for lv in levels:
                idx, w = level_corners(xt, lv)
                if keep:
                    cache.append((idx.to(torch.int32), w))
                tab = table.narrow(0, lv["offset"], lv["size"])
                vals = _gather_rows(tab, idx.view(-1)).view(8, P, F)
                l = lv["level"]
                if cpu and F == 2:  # a corner's feature pair as one complex64: see _corner_sum
                    o = torch.view_as_real((torch.view_as_complex(vals) * w).sum(0))
                elif cpu:  # a broadcast over a trailing axis of F is ~2x slower than bmm on CPU
                    o = torch.bmm(w.t().unsqueeze(1), vals.transpose(0, 1)).view(P, F)
                else:
                    o = (vals * w.unsqueeze(-1)).sum(0)
                out[:, l * F : (l + 1) * F] = o
        ctx.save_for_backward(x)
        ctx.levels, ctx.n_features, ctx.fma = levels, n_features, fma_emulation
        ctx.cache = cache if keep else None
        ctx.params_shape, ctx.params_dtype = params.shape, params.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        if getattr(ctx, "native", None) is not None:
            return None, _native_backward(ctx, x, grad_out), None, None, None
        F = ctx.n_features
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_out = grad_out.float()
            total = ctx.levels[-1]["offset"] + ctx.levels[-1]["size"]
            gtab = torch.zeros(total, F, device=x.device, dtype=torch.float32)
            P = x.shape[0]
            cpu = _cpu_fast_paths(x)
            cache = ctx.cache
            ctx.cache = None
            xt = None if cache is not None else _positions_t(x, ctx.fma)
            for lv in ctx.levels:
                # Recomputed unless cached: 16 levels x (8, P) indices would dominate memory at large P.
                idx, w = cache[lv["level"]] if cache is not None else level_corners(xt, lv)
                l = lv["level"]
                g = grad_out[:, l * F : (l + 1) * F]  # (P, F)
                gl = gtab.narrow(0, lv["offset"], lv["size"])
                idx = idx.view(-1)
                if not cpu:
                    gl.index_add_(0, idx, (w.unsqueeze(-1) * g.unsqueeze(0)).view(8 * P, F))
                elif F == 1:
                    gl.view(-1).index_add_(0, idx, (w * g.reshape(1, P)).view(-1))
                elif F == 2:  # one complex-by-real multiply and one complex64 add per row (_corner_spread)
                    src = w * _as_complex(g).unsqueeze(0)                                     # (8, P)
                    gl.view(torch.complex64).view(-1).index_add_(0, idx, src.view(-1))
                else:
                    # CPU: the weights repeated per feature keep the multiply contiguous (~3x faster than
                    # broadcasting over F)
                    src = (w.repeat_interleave(F, dim=1) * g.reshape(1, P * F)).view(8 * P, F)
                    gl.index_add_(0, idx, src)
        return None, gtab.view(ctx.params_shape).to(ctx.params_dtype), None, None, None


@functools.lru_cache(maxsize=None)
def _tcnn_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


# what a tiny tinycudann forward did on each device: None = it ran in fp32, else why tcnn is not used
_TCNN_PROBES: dict[torch.device, str | None] = {}
_PROBE_CONFIG = {"otype": "HashGrid", "n_levels": 2, "n_features_per_level": 2, "log2_hashmap_size": 8,
                 "base_resolution": 4, "per_level_scale": 1.5, "interpolation": "Linear"}


def _make_tcnn_encoding(tcnn, config: dict, seed: int):
    """An fp32 tcnn Encoding. Bindings too old for ``dtype`` would run fp16 (tcnn's default) without a
    word: refused, with the reason."""
    try:
        return tcnn.Encoding(3, config, seed=seed, dtype=torch.float32)
    except TypeError as err:
        raise RuntimeError(f"these tinycudann bindings take no dtype and would run the hash grid in fp16 ({err}); "
                           "install bindings of a newer tiny-cuda-nn") from None


def _probe_points(device: torch.device) -> torch.Tensor:
    return torch.rand(256, 3, device=device)


def tcnn_probe(device: torch.device) -> str | None:
    """Whether tinycudann really runs on ``device``: None when a tiny fp32 forward worked, else the reason.

    A build without this GPU's architecture imports fine and fails at its first kernel ("no kernel image
    is available"), so importing proves nothing; the result is kept per device."""
    device = torch.device(device)
    if device in _TCNN_PROBES:
        return _TCNN_PROBES[device]
    if not _tcnn_available():
        reason = "tinycudann does not import"
    else:
        try:
            import tinycudann as tcnn

            with torch.cuda.device(device):
                enc = _make_tcnn_encoding(tcnn, _PROBE_CONFIG, 1337)
                out = enc(_probe_points(device))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # a kernel's failure surfaces here at the latest
            reason = None if out.dtype == torch.float32 else f"it returned {out.dtype}, not float32"
        except Exception as err:  # noqa: BLE001 - any failure means: use the torch grid
            reason = f"its first forward failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    _TCNN_PROBES[device] = reason
    return reason


class HashGrid(torch.nn.Module):
    """Multi-resolution hash-grid encoding, numerically tcnn's ``HashGrid`` with Linear interpolation.

    ``forward(x)`` takes ``x`` (P, 3) (or (..., 3)) nominally in [0, 1]^3 -- nothing is clamped -- and
    returns (P, n_levels * n_features) fp32, level-major (column ``level * F + f``).

    Only ``params`` receives a gradient; ``x`` does not (see the module docstring).

    ``backend``: ``"torch"`` always uses the PyTorch path; ``"auto"`` uses ``tinycudann`` when it
    imports and ``x`` is on CUDA, else PyTorch; ``"tcnn"`` requires tinycudann.  Both share the one
    flat ``params`` parameter, so checkpoints are interchangeable.  The init is tcnn's
    U(-1e-4, 1e-4), drawn from a torch generator seeded with ``seed`` (tcnn's own PCG stream is not
    reproduced).
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features: int = 2,
        log2_table_size: int = 15,
        base_resolution: int = 16,
        per_level_scale: float = 1.5,
        seed: int = 1337,
        backend: str = "auto",
        fma_emulation: bool = True,
    ):
        super().__init__()
        if backend not in ("auto", "torch", "tcnn"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'tcnn', got {backend!r}")
        if n_features not in (1, 2, 4, 8):
            raise ValueError("n_features must be 1, 2, 4 or 8 (as in tcnn)")
        self.n_levels = int(n_levels)
        self.n_features = int(n_features)
        self.log2_table_size = int(log2_table_size)
        self.base_resolution = base_resolution
        self.per_level_scale = float(per_level_scale)
        self.seed = int(seed)
        self.backend = backend
        self.fma_emulation = bool(fma_emulation)
        self.n_input_dims = 3
        self.n_output_dims = self.n_levels * self.n_features
        self._levels = hashgrid_level_table(
            self.n_levels, self.log2_table_size, base_resolution, self.per_level_scale
        )
        self.n_entries = self._levels[-1]["offset"] + self._levels[-1]["size"]
        gen = torch.Generator().manual_seed(self.seed)
        init = (torch.rand(self.n_entries * self.n_features, generator=gen) * 2.0 - 1.0) * 1e-4
        self.params = torch.nn.Parameter(init)
        if backend == "tcnn" and not _tcnn_available():
            raise RuntimeError("backend='tcnn' but tinycudann does not import")
        self.__dict__["_tcnn_module"] = None  # not a submodule: its own params must not enter state_dict

    def level_table(self) -> list[dict]:
        """res, size, offset, hashed (and scale) per level; a copy."""
        return [dict(lv) for lv in self._levels]

    def extra_repr(self) -> str:
        return (
            f"n_levels={self.n_levels}, n_features={self.n_features}, log2_T={self.log2_table_size}, "
            f"base_resolution={self.base_resolution}, per_level_scale={self.per_level_scale}, "
            f"n_params={self.params.numel()}, backend={self.backend!r}"
        )

    # -- tcnn path -----------------------------------------------------------------------------------
    def _use_tcnn(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "tcnn":
            return True
        return x.is_cuda and _tcnn_available() and tcnn_probe(x.device) is None

    def backend_note(self, device: torch.device) -> str:
        """For the training log: which hash-grid implementation runs on ``device`` and in what precision
        (and why not tcnn, when it is installed but does not run)."""
        device = torch.device(device)
        if self.backend == "tcnn" or (self.backend == "auto" and device.type == "cuda" and _tcnn_available()):
            reason = tcnn_probe(device)
            if reason is None:
                return "hash grid tinycudann (fp32)"
            if self.backend == "tcnn":
                raise RuntimeError(f"backend='tcnn' but tinycudann does not run on {device}: {reason}")
            return f"hash grid torch (fp32; tinycudann not used: {reason})"
        return "hash grid torch (fp32)"

    def _tcnn_forward(self, x: torch.Tensor) -> torch.Tensor:
        import tinycudann as tcnn

        if not (x.is_cuda and self.params.is_cuda):
            raise RuntimeError("the tcnn backend needs x and the module on CUDA")
        enc = self.__dict__["_tcnn_module"]
        if enc is None or self.__dict__.get("_tcnn_device") != self.params.device:
            config = {
                "otype": "HashGrid",
                "n_levels": self.n_levels,
                "n_features_per_level": self.n_features,
                "log2_hashmap_size": self.log2_table_size,
                "base_resolution": self.base_resolution,
                "per_level_scale": self.per_level_scale,
                "interpolation": "Linear",
            }
            with torch.cuda.device(self.params.device):
                enc = _make_tcnn_encoding(tcnn, config, self.seed)
            if enc.params.numel() != self.params.numel():
                raise RuntimeError(
                    f"tcnn HashGrid has {enc.params.numel()} params, the torch layout "
                    f"{self.params.numel()}: layouts differ, refusing to mix them"
                )
            self.__dict__["_tcnn_module"] = enc
            self.__dict__["_tcnn_device"] = self.params.device
        # Share our parameter so the optimizer, state_dict and both backends see one tensor. tcnn runs
        # its training forward (keeping a context for the backward) whenever the params require grad,
        # even under no_grad: there, hand it a non-grad view of the same storage, for its inference kernel.
        if torch.is_grad_enabled() and self.params.requires_grad:
            enc.params = self.params
        else:
            enc.params = torch.nn.Parameter(self.params.detach(), requires_grad=False)
        return enc(x).float()

    def uses_tcnn(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` would run tinycudann (then a :class:`HashGridPlan` is of no use)."""
        return self._use_tcnn(x.reshape(-1, 3))

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # Positions never get a gradient, on either backend: otherwise the refine/predict pose modes
        # would train the orientation encoder through the field only with tcnn, and tcnn would keep a
        # dL/dx buffer per point.
        x = x.reshape(-1, 3).detach()
        if self._use_tcnn(x):
            out = self._tcnn_forward(x)
        else:
            out = _HashGridFunction.apply(x, self.params, self._levels, self.n_features, self.fma_emulation)
        return out.reshape(*lead, self.n_output_dims)


# -- fixed point sets ----------------------------------------------------------------------------------
# A field evaluated at the same points every step (the canonical voxel grid of the renderer) is a fixed
# sparse linear map of the table: its corner rows and weights are computed once and reused, which leaves
# one gather and one small GEMM per step instead of the per-level index arithmetic (most of the cost).


class HashGridPlan(NamedTuple):
    """Corner rows of the whole (entries, F) table, (levels, P, 8) int32, and their weights (fp32)."""

    rows: torch.Tensor
    weights: torch.Tensor

    @property
    def n_points(self) -> int:
        return int(self.weights.shape[1])


def plan_bytes(n_points: int, n_levels: int) -> int:
    """Memory a :class:`HashGridPlan` of ``n_points`` takes."""
    return n_points * n_levels * 8 * 8


def _as_complex(t: torch.Tensor) -> torch.Tensor:
    """(M, 2) fp32 as (M,) complex64, without a copy where the strides allow one complex per row."""
    if t.stride(-1) != 1 or t.stride(0) % 2 or t.storage_offset() % 2:
        t = t.contiguous()
    return torch.view_as_complex(t)


def _corner_sum(w: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """(M, F) = sum over the 8 corners of w (M, 8) times vals (M, 8, F).

    For F = 2 a corner's pair of features is one complex64 number, so each corner's term is one
    complex-by-real multiply: a batched (1 x 8) @ (8 x 2) GEMM costs about 2x that on CPU (16 levels of
    22,000 points: 11 vs 6.6 ms), and broadcasting over the trailing axis of 2 about 4x."""
    if vals.shape[-1] == 2 and vals.is_contiguous():
        vc = torch.view_as_complex(vals)
        # corner by corner, in the C kernel's order (native/hash_grid.c), so that the planned grid and the
        # grid give the same numbers to the last bit
        out = vc[:, 0] * w[:, 0]
        for c in range(1, 8):
            out += vc[:, c] * w[:, c]
        return torch.view_as_real(out)
    return torch.bmm(w.unsqueeze(1), vals).squeeze(1)


def _corner_spread(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(M, 8, F) = w (M, 8) times g (M, F): the table gradient's source rows. For F = 2 one complex-by-real
    multiply; as a batched (8 x 1) @ (1 x 2) GEMM it was 10x slower on CPU (33 vs 3 ms at 352,000 rows)."""
    if g.shape[-1] == 2:
        return torch.view_as_real(w * _as_complex(g).unsqueeze(-1))
    return torch.bmm(w.unsqueeze(-1), g.unsqueeze(1))


class _PlannedHashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, rows, weights, n_features):
        with torch.autocast(device_type=params.device.type, enabled=False):
            L, P, _ = weights.shape
            F = n_features
            table = params.float().view(-1, F)
            vals = _gather_rows(table, rows.view(-1)).view(L * P, 8, F)
            o = _corner_sum(weights.view(L * P, 8), vals).view(L, P, F)
        ctx.save_for_backward(rows, weights)
        ctx.n_features, ctx.n_entries = F, table.shape[0]
        ctx.params_shape, ctx.params_dtype = params.shape, params.dtype
        return o.transpose(0, 1).reshape(P, L * F)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        F = ctx.n_features
        L, P, _ = weights.shape
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g = grad_out.float().view(P, L, F).transpose(0, 1).reshape(L * P, 1, F)
            src = _corner_spread(weights.view(L * P, 8), g.view(L * P, F)).view(-1, F)   # (L*P*8, F)
            gtab = torch.zeros(ctx.n_entries, F, device=grad_out.device, dtype=torch.float32)
            if F == 2:  # one complex64 add per row, as in _HashGridFunction
                gtab.view(torch.complex64).view(-1).index_add_(0, rows.view(-1), torch.view_as_complex(src))
            else:
                gtab.index_add_(0, rows.view(-1), src)
        return gtab.view(ctx.params_shape).to(ctx.params_dtype), None, None, None


def make_plan(grid: "HashGrid", x: torch.Tensor) -> HashGridPlan:
    """Corner rows and weights of points ``x`` (P, 3) in [0, 1]^3 for ``grid`` (the same numbers its
    forward computes, so a planned evaluation equals ``grid(x)``)."""
    with torch.no_grad():
        xt = _positions_t(x.reshape(-1, 3).float(), grid.fma_emulation)
        rows, weights = [], []
        for lv in grid._levels:
            idx, w = level_corners(xt, lv)
            rows.append((idx + lv["offset"]).t().to(torch.int32))
            weights.append(w.t())
        return HashGridPlan(torch.stack(rows).contiguous(), torch.stack(weights).contiguous())


def planned_forward(grid: "HashGrid", plan: HashGridPlan) -> torch.Tensor:
    """``grid(x)`` at the points ``plan`` was made for: (P, levels * F) fp32."""
    return _PlannedHashGridFunction.apply(grid.params, plan.rows, plan.weights, grid.n_features)
