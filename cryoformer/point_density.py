"""Point attention and the density FFN in one pass over cache-sized pieces of the points (CPU).

The head's density at a point is ``w2 . ReLU(softmax(q K^T) V + u) + b2`` for each image's keys K and values
V (the FFN's first layer folded into V). Written as separate torch operations, each step of that reads and
writes a (B, P, C) tensor: at train box 64 those are 45 MB each (8 images, 22,000 occupied voxels, 64
channels), so the step streams them through memory a dozen times forward and backward, and the
memory-bound parts (add, ReLU and its backward, the sums over images of the shared queries' gradients)
cost as much as the two fused attention products. Here the points are taken a few hundred at a time, so
every intermediate stays in the CPU's cache, and the backward recomputes the softmax from the saved
log-sum-exp (as flash attention does) instead of keeping any (B, P, ...) tensor. The same function:
equal to the explicit form to float rounding (``tests/test_render_fast_paths.py``).

On a CPU with the C kernels built (``cryoformer.native``), queries shared by the images (the canonical
voxel grid of training and map export) take :func:`native_point_density` instead: the same pieces, with
the products in torch and everything between them (softmax, its backward, ReLU, the dot with the density
weights and their gradients) one C pass each, and the products in bf16 where the CPU multiplies bf16
natively. The torch form below stays for per-image queries (the rotated renderer) and machines without a
C compiler.

A GPU keeps ``scaled_dot_product_attention``: a Python loop over pieces would launch a dozen kernels
per piece.
"""

from __future__ import annotations

import torch

# points per piece x images x channels: 2^18 floats (1 MB) per (B, p, C) intermediate (512 points of 8
# images; 128-1024 points were within 8 % of each other at 22,000 points)
PIECE_ELEMENTS = 1 << 18
# below this many (B, P, C) elements the fused kernel's tensors stay in cache anyway and the pieces' op
# overhead loses: 8 images x 64 channels, one thread, this CPU: 4,800 points 58 ms in pieces vs 51 ms
# fused, 9,000 points 98 vs 102 ms, 22,000 points 234 vs 288 ms (forward + backward of the head)
PIECEWISE_MIN_ELEMENTS = 1 << 22
# the native head keeps each piece's attention weights and attended values for the backward (which then
# skips two of its six products) while the step's (B, P, N + C) of them stay below this many elements
KEEP_MAX_ELEMENTS = 1 << 25


def piece_points(batch: int, channels: int) -> int:
    return max(16, PIECE_ELEMENTS // max(1, batch * channels))


def pays(qn: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the piecewise pass is the faster one for these shapes (CPU tensors only)."""
    b, _, c = keys.shape
    return qn.device.type == "cpu" and b * qn.shape[-2] * c >= PIECEWISE_MIN_ELEMENTS


def _logits(qn: torch.Tensor, keys: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """(B, p, N) logits of points s:e; shared (P, C) queries take one GEMM against every image's keys."""
    b, n, c = keys.shape
    if qn.dim() == 2:
        return (qn[s:e] @ keys.reshape(b * n, c).t()).view(e - s, b, n).transpose(0, 1)
    return torch.bmm(qn[:, s:e], keys.transpose(1, 2))


def _rows(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    return t[s:e] if t.dim() == 2 else t[:, s:e]


class _PointDensity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qn, u, keys, values, w2, b2):
        b, _, c = keys.shape
        p = qn.shape[-2]
        step = piece_points(b, c)
        dens = qn.new_empty(b, p)
        lse = qn.new_empty(b, p)
        w = w2.reshape(c, 1)
        for s in range(0, p, step):
            e = min(p, s + step)
            logits = _logits(qn, keys, s, e)
            m = torch.logsumexp(logits, -1, keepdim=True)
            h = torch.bmm(logits.sub_(m).exp_(), values).add_(_rows(u, s, e)).relu_()
            dens[:, s:e] = (h @ w).squeeze(-1)
            lse[:, s:e] = m.squeeze(-1)
        ctx.save_for_backward(qn, u, keys, values, w2, lse)
        return dens.add_(b2)

    @staticmethod
    def backward(ctx, grad):
        qn, u, keys, values, w2, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        b, n, c = keys.shape
        p = qn.shape[-2]
        step = piece_points(b, c)
        grad = grad.contiguous()
        dq = torch.empty_like(qn) if need[0] else None
        du = torch.empty_like(u) if need[1] else None
        dk = torch.zeros(b * n, c, dtype=keys.dtype, device=keys.device)
        dv = torch.zeros_like(values)
        dw = torch.zeros(c, dtype=w2.dtype, device=w2.device)
        for s in range(0, p, step):
            e = min(p, s + step)
            a = _logits(qn, keys, s, e).sub_(lse[:, s:e, None]).exp_()            # (B, p, N)
            h = torch.bmm(a, values).add_(_rows(u, s, e)).relu_()                   # (B, p, C)
            g = grad[:, s:e, None]
            dw += (h * g).sum((0, 1))
            dh = (h > 0).to(h.dtype).mul_(g).mul_(w2.reshape(c))                  # d pre-activation
            if du is not None:
                if u.dim() == 2:
                    du[s:e] = dh.sum(0)
                else:
                    du[:, s:e] = dh
            dv += torch.bmm(a.transpose(1, 2), dh)
            da = torch.bmm(dh, values.transpose(1, 2))
            dl = da.sub_((da * a).sum(-1, keepdim=True)).mul_(a)                    # d logits (B, p, N)
            _key_query_grads(qn, keys, dl, s, e, dq, dk)
        db = grad.sum().reshape(1) if need[5] else None
        return dq, du, dk.view(b, n, c), dv, dw.view_as(w2), db


def _key_query_grads(qn: torch.Tensor, keys: torch.Tensor, dl: torch.Tensor, s: int, e: int,
                     dq: torch.Tensor | None, dk: torch.Tensor) -> None:
    """Accumulate the keys' gradient and write the queries' for points s:e (shared queries: one GEMM each
    over all images' tokens, which also sums the images' contributions to a shared query)."""
    b, n, c = keys.shape
    if qn.dim() == 2:
        flat = dl.transpose(0, 1).reshape(e - s, b * n)                            # (p, B*N)
        if dq is not None:
            dq[s:e] = flat @ keys.reshape(b * n, c)
        dk += flat.t() @ qn[s:e]
    else:
        if dq is not None:
            dq[:, s:e] = torch.bmm(dl, keys)
        dk += torch.bmm(dl.transpose(1, 2), qn[:, s:e]).reshape(b * n, c)


def point_density(qn: torch.Tensor, u: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Density (B, P) = ``w2 . ReLU(softmax(qn K^T) V + u) + b2`` in fp32.

    ``qn``, ``u``: (P, C) shared by the B images or (B, P, C); ``keys``, ``values``: (B, N, C); ``w2``
    (1, C), ``b2`` (1,). ``qn`` is already scaled (temperature and 1/sqrt(C))."""
    f = torch.float32
    return _PointDensity.apply(qn.to(f), u.to(f), keys.to(f), values.to(f), w2.to(f), b2.to(f))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# the C passes' names by the products' dtype
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


class _NativePointDensity(torch.autograd.Function):
    """The piecewise head for queries shared by the images, with its elementwise passes in C
    (:mod:`cryoformer.native.build`) and its products in ``dtype`` (fp32, or bf16 on CPUs that multiply
    bf16 natively); softmax, ReLU and all accumulations in fp32."""

    @staticmethod
    def forward(ctx, qn, u, keys, values, w2, b2, dtype):
        lib, sfx = native_library(), _SUFFIX[dtype]
        b, n, c = keys.shape
        p_all = qn.shape[0]
        q, kf = qn.to(dtype).contiguous(), keys.reshape(b * n, c).to(dtype).contiguous()
        v = values.to(dtype).contiguous()
        u32, w = u.float().contiguous(), w2.float().reshape(c).contiguous()
        dens = torch.empty(b, p_all)
        mx, rs = torch.empty(b, p_all), torch.empty(b, p_all)
        step = piece_points(b, c)
        keep = any(ctx.needs_input_grad) and b * p_all * (n + c) <= KEEP_MAX_ELEMENTS
        pieces = []
        for s in range(0, p_all, step):
            e = min(p_all, s + step)
            p = e - s
            logits = q[s:e] @ kf.t()                                                # (p, B*N)
            a = torch.empty(b, p, n, dtype=dtype)
            getattr(lib, "softmax_fwd_" + sfx)(_ptr(logits), _ptr(a), p * n, _ptr(mx) + 4 * s, _ptr(rs) + 4 * s,
                                               p_all, p, b, n)
            o = torch.bmm(a, v)                                                      # (B, p, C)
            getattr(lib, "density_fwd_" + sfx)(_ptr(o), p * c, _ptr(u32) + 4 * s * c, _ptr(w), float(b2),
                                               _ptr(dens) + 4 * s, p_all, p, b, c)
            if keep:
                pieces.append((a, o))
        ctx.dtype, ctx.pieces = dtype, pieces
        ctx.save_for_backward(q, u32, kf, v, w, mx, rs)
        return dens

    @staticmethod
    def backward(ctx, grad):
        q, u32, kf, v, w, mx, rs = ctx.saved_tensors
        dtype = ctx.dtype
        lib, sfx = native_library(), _SUFFIX[dtype]
        bn, c = kf.shape
        b, p_all = mx.shape
        n = bn // b
        g = grad.float().contiguous()
        dq = torch.empty(p_all, c)
        du = torch.zeros(p_all, c)
        dk = torch.zeros(bn, c)
        dv = torch.zeros(b, n, c)
        dw = torch.zeros(c)
        step = piece_points(b, c)
        vt = v.transpose(1, 2)
        pieces, ctx.pieces = ctx.pieces, None
        for k, s in enumerate(range(0, p_all, step)):
            e = min(p_all, s + step)
            p = e - s
            if pieces:
                a, o = pieces[k]
            else:
                logits = q[s:e] @ kf.t()
                a = torch.empty(b, p, n, dtype=dtype)
                getattr(lib, "softmax_again_" + sfx)(_ptr(logits), _ptr(mx) + 4 * s, _ptr(rs) + 4 * s, p_all,
                                                     _ptr(a), p * n, p, b, n)
                o = torch.bmm(a, v)
            dh = torch.empty(b, p, c, dtype=dtype)
            getattr(lib, "density_bwd_" + sfx)(_ptr(o), p * c, _ptr(u32) + 4 * s * c, _ptr(w), _ptr(g) + 4 * s,
                                               p_all, _ptr(dh), _ptr(dw), _ptr(du) + 4 * s * c, p, b, c)
            dv += torch.bmm(a.transpose(1, 2), dh)
            da = torch.bmm(dh, vt)
            dl = torch.empty(p, bn, dtype=dtype)
            getattr(lib, "softmax_bwd_" + sfx)(_ptr(a), _ptr(da), p * n, _ptr(dl), p, b, n)
            dq[s:e] = dl @ kf
            dk += dl.t() @ q[s:e]
        db = g.sum().reshape(1)
        return dq, du, dk.view(b, n, c), dv, dw.view(1, c), db, None


def native_library():
    """The C kernels with their threads set (None where they could not be built)."""
    from .native.build import kernels

    return kernels()


def native_pays(qn: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the native head can run these inputs: fp32 CPU tensors, queries shared by the images (the
    canonical voxel grid), at most 1,024 tokens, and the C passes built on this machine."""
    return (qn.device.type == "cpu" and qn.dim() == 2 and keys.shape[1] <= 1024
            and qn.dtype == keys.dtype == torch.float32 and native_library() is not None)


def native_point_density(qn: torch.Tensor, u: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         w2: torch.Tensor, b2: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`point_density` for (P, C) queries shared by the images, its elementwise passes in C and its
    products in ``dtype`` (torch.float32 or torch.bfloat16)."""
    return _NativePointDensity.apply(qn, u, keys, values, w2, b2, dtype)
