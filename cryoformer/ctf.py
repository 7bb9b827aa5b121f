"""RELION's contrast transfer function, evaluated in torch on a (half-)plane of frequencies.

Same formula and sign as RELION 3.1 ``CTF::getCTF`` so that a projection multiplied by it reproduces
``relion_project --ctf``: the CTF is positive at zero frequency (amplitude contrast), defocus > 0
is underfocus, and the astigmatism angle runs from +x towards +y (the row index).
"""

from __future__ import annotations

import math

import torch

from .compiled import CompiledFunction


def electron_wavelength_A(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


def freq_grid(box: int, pixel_size_A: float, *, rfft: bool = True, device=None, dtype=torch.float32):
    """Spatial frequencies (ky, kx) in 1/Å laid out like ``torch.fft.rfft2`` (or ``fft2``) output."""
    ky = torch.fft.fftfreq(box, d=pixel_size_A, device=device, dtype=dtype)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(box, d=pixel_size_A, device=device, dtype=dtype)
    return torch.meshgrid(ky, kx, indexing="ij")


def compute_ctf(params: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
    """CTF values (B, *grid) for per-particle parameters ``params`` (B, 9).

    The columns of ``params`` follow :attr:`cryoformer.data.CTFParams.FIELDS`: defocus U, defocus V
    (Å), defocus angle (deg), voltage (kV), Cs (mm), amplitude contrast, phase shift (deg),
    B-factor (Å^2), scale.
    """
    p = params.to(kx.dtype)
    du, dv, ang, kv, cs, q0, phase, bfac, scale = (p[:, i].view(-1, 1, 1) for i in range(9))
    lam = electron_wavelength_A(kv)
    a = torch.deg2rad(ang)
    k2 = kx * kx + ky * ky
    xr = kx * torch.cos(a) + ky * torch.sin(a)
    yr = -kx * torch.sin(a) + ky * torch.cos(a)
    # du*xr^2 + dv*yr^2 equals defocus(theta) * k^2 without dividing by k^2 (safe at k = 0)
    defocus_k2 = du * xr * xr + dv * yr * yr
    cs_A = cs * 1e7
    q0c = torch.clamp(q0, -0.999999, 0.999999)
    gamma = (-math.pi * lam * defocus_k2 + 0.5 * math.pi * cs_A * lam ** 3 * k2 * k2
             - torch.deg2rad(phase) - torch.asin(q0c))
    return -torch.sin(gamma) * torch.exp(-bfac * k2 / 4.0) * scale


#: the CTF the renderer applies: an elementwise chain of ~25 kernels, fused into one when compiled
ctf_values = CompiledFunction(compute_ctf, "the CTF")
