"""Throughput of :class:`cryoformer.hashgrid.HashGrid` on one D=64 cube (262,144 points).

Default tcnn config (16 levels, F=2, T=2^15, N_min=16, b=1.5).  Times the forward (no grad) and
forward + backward (table gradient) on CPU, with the fp64 ``fmaf`` emulation (default) and with
plain fp32 positions, and on CUDA when available (torch path, and tinycudann when it imports).
Best of ``--repeats`` runs after one warm-up.  Writes ``bench/results/hashgrid.json``.

    python bench/bench_hashgrid.py [--box 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryoformer.hashgrid import HashGrid, _tcnn_available  # noqa: E402


def cube_points(box: int, device) -> torch.Tensor:
    """Voxel centres of a box^3 cube mapped to [0, 1]^3 (x / box + 0.5 for centred coordinates)."""
    c = (torch.arange(box, dtype=torch.float32, device=device) - box // 2) / box + 0.5
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1).reshape(-1, 3)


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_one(device, backend: str, fma: bool, box: int, repeats: int) -> dict:
    enc = HashGrid(backend=backend, fma_emulation=fma).to(device)
    x = cube_points(box, device)
    upstream = torch.randn(x.shape[0], enc.n_output_dims, device=device)

    def fwd():
        with torch.no_grad():
            enc(x)

    def fwd_bwd():
        enc.params.grad = None
        (enc(x) * upstream).sum().backward()

    t_f = _time(fwd, device, repeats)
    t_fb = _time(fwd_bwd, device, repeats)
    n = x.shape[0]
    return {
        "device": str(device),
        "backend": backend,
        "fma_emulation": fma,
        "points": n,
        "forward_s": round(t_f, 4),
        "forward_backward_s": round(t_fb, 4),
        "forward_points_per_s": round(n / t_f),
        "forward_backward_points_per_s": round(n / t_fb),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "hashgrid.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    runs = []
    cpu = torch.device("cpu")
    # 1 thread as well as the default: on a shared machine a 2-thread OpenMP pool that loses a core
    # to another process can be slower than 1 thread.
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for fma in (True, False):
            runs.append({"threads": threads, **bench_one(cpu, "torch", fma, args.box, args.repeats)})
    torch.set_num_threads(default_threads)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs.append(bench_one(cuda, "torch", True, args.box, args.repeats))
        if _tcnn_available():
            runs.append(bench_one(cuda, "tcnn", True, args.box, args.repeats))

    result = {
        "benchmark": "HashGrid default config (L=16, F=2, T=2^15, N_min=16, b=1.5)",
        "box": args.box,
        "torch": torch.__version__,
        "cpu_threads_default": default_threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "repeats": args.repeats,
        "timing": "best of repeats after one warm-up, seconds",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
