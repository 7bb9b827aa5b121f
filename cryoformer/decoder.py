"""The deformation transformer decoder and the spatial attention that turns it into density.

Structure queries (N learned tokens of width C) pass through blocks of self-attention,
cross-attention to the image's deformation tokens F_D, and a feed-forward layer. The resulting
per-image tokens T describe the conformation. Density at a point x then comes from the hash-grid
feature of x attending over T.

Two forms of that spatial attention are offered (the paper's per-point N x N form costs about 20x the
point-query form at equal N and C, which is why the latter is the default):

* ``point`` (default): the C-wide feature q(x) attends over the N tokens, so each point costs two
  small GEMMs (N*C each) and the keys/values are computed once per image, not per point. The
  attention weights a(x) over the structure queries are the paper's "3D attention map".
* ``literal``: the paper read literally, F_S(x) is an N x C matrix per point and
  softmax(T F_S(x)^T / sqrt(C)) T is an N x N attention per point, followed by a per-token FFN and a
  mean. About 20x more work per point; for small boxes and ablations.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .point_density import native_point_density, native_pays, point_density
from .point_density import pays as point_density_pays


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"token width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        h = self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, -1, h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)))
        return self.o(out.transpose(1, 2).reshape(b, n, c))


class DeformationBlock(nn.Module):
    """Self-attention over the queries, cross-attention to F_D, FFN (pre-norm residual).

    ``norm_fd``: layer-normalise F_D, as a pre-norm block would. F_D is a linear map of the latent z, so
    the normalised F_D depends, once z is large next to the map's bias, on z's direction only: the encoder
    then spreads the conformations over angles. Without a KL term z grows all through training (its s.d.
    from 14 to 30 on adenylate kinase, epochs 4-18), the motion lay on an arc across two principal
    components (PC2: 13 % of the variance at epoch 4, 28 % at 18) and PC1 followed it less well as
    training went on (|Spearman| 0.86-0.91, cryoDRGN 0.96). Without the norm the cross-attention's values
    move with z's length too: on that set PC1 held 96-98 % of the variance, z's s.d. went from 6 to 9, and
    |Spearman| rose to 0.97, as on a continuous motion (``bench/results/settings_deformation_norm.md``)."""

    def __init__(self, dim: int, heads: int, values: Literal["queries", "deformation"], *, norm_fd: bool):
        super().__init__()
        self.values = values
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_fd = nn.LayerNorm(dim) if norm_fd else nn.Identity()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor, f_d: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(t)
        t = t + self.self_attn(x, x, x)
        if f_d is not None:
            x = self.norm2(t)
            fd = self.norm_fd(f_d)
            # the paper writes Attn(Q, F_D, Q): keys from the deformation, values from the queries
            t = t + self.cross_attn(x, fd, x if self.values == "queries" else fd)
        return t + self.ffn(self.norm3(t))


class StructureDecoder(nn.Module):
    def __init__(self, tokens: int, dim: int, blocks: int = 3, heads: int = 4,
                 values: Literal["queries", "deformation"] = "queries", *, norm_fd: bool):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, dim) * 0.5)
        self.blocks = nn.ModuleList(DeformationBlock(dim, heads, values, norm_fd=norm_fd) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, f_d: torch.Tensor | None, batch: int) -> torch.Tensor:
        t = self.queries.unsqueeze(0).expand(batch, -1, -1)
        for blk in self.blocks:
            t = blk(t, f_d)
        return self.norm(t)


def point_attention_explicit(qn: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(qn K^T) V`` with the (B, P, N) weights materialised: the form that can hand the attention
    map to the analysis. ``qn`` (P, C) or (B, P, C) is already scaled; the softmax runs in fp32."""
    logits = torch.matmul(qn, keys.transpose(1, 2))                           # (B, P, N)
    a = torch.softmax(logits.float(), dim=-1).to(values.dtype)
    return torch.matmul(a, values), a


def point_attention_fused(qn: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The same product through ``scaled_dot_product_attention``: flash / memory-efficient kernels (GPU)
    and the fused CPU kernel never hold the (B, P, N) logits and weights, which at one point per voxel
    are the largest tensors of a step, in the forward or for the backward."""
    b = keys.shape[0]
    if qn.dim() == 2:                                  # points shared by the images (canonical grid)
        qn = qn.unsqueeze(0).expand(b, -1, -1)
    # fp32: with bf16 inputs a 2-rank CPU-bf16 run's maps drifted from the 1-rank run's (correlation 0.91
    # after 6 steps, 0.99 in fp32). One head: (B, 1, P, C); the temperature and 1/sqrt(C) are in qn
    # already, hence scale=1.
    with torch.autocast(keys.device.type, enabled=False):
        out = F.scaled_dot_product_attention(qn.float().unsqueeze(1), keys.float().unsqueeze(1),
                                             values.float().unsqueeze(1), scale=1.0)
    return out.squeeze(1).to(values.dtype)


class PositionCode(nn.Module):
    """A fixed smooth code of the position, added to the point attention's query (not to the density path).

    The hash features start at about 1e-4, so every point's query is at first the same vector and the
    softmax over the tokens is the same everywhere: a conformation's tokens can only change the whole map
    at once, and the latent gets no gradient that tells one region's change from another's. The motion of
    a 2,000-particle hinge was picked up only after 7-16 epochs (cryoDRGN, whose decoder mixes z with the
    position from the first step: 5-7). With this code, regions attend to different tokens from the start;
    on that hinge the motion appeared at epoch 4, at SNR 0.1 and 0.05 (``bench/results/settings_query_code.md``).
    Random Fourier features of ``cycles`` periods per box (standard deviation), drawn from their own seed so
    that every run and rank has the same code; a buffer, so a checkpoint carries it."""

    FEATURES = 16
    SEED = 1234

    def __init__(self, dim: int, cycles: float):
        super().__init__()
        g = torch.Generator().manual_seed(self.SEED)
        self.register_buffer("freq", torch.randn(3, self.FEATURES, generator=g) * (2 * math.pi * cycles))
        self.proj = nn.Linear(2 * self.FEATURES, dim)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        # the phases in fp32 also under autocast: bf16 would put errors of ~0.1 rad on phases of up to ~40 rad
        with torch.autocast(pos.device.type, enabled=False):
            ang = pos.float() @ self.freq
            code = torch.cat([ang.sin(), ang.cos()], -1)
        return self.proj(code)


class _ScaledNorm(torch.autograd.Function):
    """``LayerNorm(q + c) * t`` for (P, C) fp32 CPU tensors in one C pass each way
    (``native/layer_norm.c``); the same function as the torch form in :meth:`SpatialDensityHead.spatial_query`."""

    @staticmethod
    def forward(ctx, q, c, gamma, beta, t, eps):
        from .native.build import kernels

        q, c = q.contiguous(), c.contiguous()
        p, ch = q.shape
        y, mean, rstd = torch.empty(p, ch), torch.empty(p), torch.empty(p)
        kernels().scaled_norm_fwd(q.data_ptr(), c.data_ptr(), p, ch, gamma.data_ptr(), beta.data_ptr(), float(t),
                                  eps, y.data_ptr(), mean.data_ptr(), rstd.data_ptr())
        ctx.save_for_backward(q, c, mean, rstd, gamma, beta, t)
        return y

    @staticmethod
    def backward(ctx, dy):
        from .native.build import kernels

        q, c, mean, rstd, gamma, beta, t = ctx.saved_tensors
        p, ch = q.shape
        dx, dgamma, dbeta, dt = torch.empty(p, ch), torch.zeros(ch), torch.zeros(ch), torch.zeros(1)
        kernels().scaled_norm_bwd(q.data_ptr(), c.data_ptr(), mean.data_ptr(), rstd.data_ptr(), p, ch,
                                  gamma.data_ptr(), beta.data_ptr(), float(t), dy.contiguous().data_ptr(),
                                  dx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr(), dt.data_ptr())
        return dx, dx, dgamma, dbeta, dt.reshape(t.shape), None


def _scaled_norm_runs(q: torch.Tensor, c: torch.Tensor, norm: nn.LayerNorm) -> bool:
    from .native.build import library

    return (q.device.type == "cpu" and q.dim() == 2 and q.shape == c.shape and q.dtype == c.dtype == torch.float32
            and norm.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and library() is not None)


class SpatialDensityHead(nn.Module):
    """Hash-grid features of points + per-image tokens T -> density at those points."""

    def __init__(self, feat_dim: int, tokens: int, dim: int, mode: Literal["point", "literal"] = "point",
                 hidden: int = 16, query_code_cycles: float = 0.0):
        super().__init__()
        self.mode = mode
        self.tokens, self.dim = tokens, dim
        # point form through scaled_dot_product_attention (False: the explicit product, as a reference)
        self.fused = True
        # dtype of the point attention's products while training, on a CPU (cryoformer.device); maps and
        # analysis (eval mode) always multiply in fp32
        self.product_dtype = torch.float32
        out = dim if mode == "point" else tokens * dim
        # the paper's "tiny MLP with one layer and hidden dimension 16" after the hash grid
        self.spatial = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))
        if mode == "point":
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
            # QK-norm with a learned temperature: the hash features start at 1e-4, so without it q(x)
            # is nearly the same for every point and the softmax over tokens stays uniform (measured
            # entropy ln(N) after training), which leaves no way to tie a region of space to a token.
            self.q_norm = nn.LayerNorm(dim)
            self.k_norm = nn.LayerNorm(dim)
            self.log_temp = nn.Parameter(torch.tensor(math.log(4.0)))
            self.query_code = PositionCode(dim, query_code_cycles) if query_code_cycles > 0 else None
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def keys_values(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image keys and values (computed once per image, shared by all its points).

        Point form: the values are returned already multiplied by the FFN's first weight matrix. The FFN
        acts on ``o + q`` with ``o = a V``, so ``W1 (a V + q) + b1 = a (V W1^T) + (q W1^T + b1)``: one N x C
        product per image replaces a C x C product per point and image, and the second term depends on
        the position only (:meth:`spatial_query`). The same function, a third fewer operations."""
        if self.mode == "point":
            return self.k_norm(self.k(t)), torch.matmul(self.v(t), self.ffn[0].weight.t())
        return t, t

    def spatial_query(self, feats: torch.Tensor, pos: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The position-only part: hash features (..., P, F) [and positions (..., P, 3) in box units, centred
        on 0, for the query code] -> what each point attends with.

        Split from :meth:`attend` because it does not depend on the image: when the points are the same
        for every image of a batch (the canonical voxel grid), it is computed once per step."""
        if self.mode == "point":
            q = self.spatial(feats)                                       # (..., P, C)
            scale = self.log_temp.exp() / math.sqrt(self.dim)
            if self.query_code is None:
                qa = q
            elif pos is None:  # without it the query would silently be another function than training's
                raise ValueError("this head adds a position code to its query: pass the points' positions")
            else:
                code = self.query_code(pos).to(q.dtype)
                if _scaled_norm_runs(q, code, self.q_norm):                    # add, norm and scale in one pass
                    qn = _ScaledNorm.apply(q, code, self.q_norm.weight, self.q_norm.bias, scale, self.q_norm.eps)
                    return qn, self.ffn[0](q)
                qa = q + code
            return self.q_norm(qa) * scale, self.ffn[0](q)
        return (self.spatial(feats).unflatten(-1, (self.tokens, self.dim)),)  # F_S(x): N x C per point

    def attend(self, query: tuple[torch.Tensor, ...], kv: tuple[torch.Tensor, torch.Tensor],
               return_attention: bool = False):
        """Density (B, P) of each image's conformation at the points of ``query`` [and attention (B, P, N)].

        ``query`` holds (P, ...) tensors shared by the B images or (B, P, ...) tensors of each image."""
        keys, values = kv
        with torch.profiler.record_function("cf:point_attention"):
            if self.mode == "point":
                qn, u = query                                                 # u = W1 q + b1
                autocast = torch.is_autocast_enabled(qn.device.type)
                w2, b2 = self.ffn[2].weight, self.ffn[2].bias
                if self.fused and not return_attention and not autocast and native_pays(qn, keys):
                    dtype = self.product_dtype if self.training else torch.float32
                    return native_point_density(qn, u, keys, values, w2, b2, dtype)
                if self.fused and not return_attention and not autocast and point_density_pays(qn, keys):
                    return point_density(qn, u, keys, values, w2, b2)
                # under autocast (bf16 on a GPU) the explicit form, whose bf16-vs-fp32 maps gpu_check's
                # dry run validated; the fused kernel there gave maps further from fp32 (0.78 vs 0.86)
                if return_attention or not self.fused or autocast:
                    o, a = point_attention_explicit(qn, keys, values)
                else:
                    o, a = point_attention_fused(qn, keys, values), None
                h = self.ffn[1](o.to(u.dtype) + u)                            # ReLU(W1 (a V + q) + b1)
                dens = self.ffn[2](h).squeeze(-1)
                return (dens, a) if return_attention else dens
            (fs,) = query
            if fs.dim() == 3:
                fs = fs.unsqueeze(0).expand(keys.shape[0], -1, -1, -1)
            logits = torch.einsum("bic,bpjc->bpij", keys, fs) / math.sqrt(self.dim)
            a = torch.softmax(logits.float(), dim=-1).to(fs.dtype)            # (B, P, N, N)
            o = torch.einsum("bpij,bjc->bpic", a, values)                     # Attn(T, F_S(x), T)
            dens = self.ffn(o).squeeze(-1).mean(-1)
            return (dens, a.mean(2)) if return_attention else dens

    def forward(self, feats: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                return_attention: bool = False, pos: torch.Tensor | None = None):
        """``feats`` (B, P, F) or (P, F) hash features [``pos`` their positions, for the query code]; returns
        density (B, P) [and attention (B, P, N)]."""
        return self.attend(self.spatial_query(feats, pos), kv, return_attention)
