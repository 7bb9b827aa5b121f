"""What training does differently on each device: precision, the current device, the RNG state.

Kept apart from the training loop so that each rule can be tested on a CPU machine with
``torch.cuda`` functions monkeypatched, and so the GPU check (``bench/gpu_check.py``) uses the same
functions the trainer does.
"""

from __future__ import annotations

import functools

import torch

#: bf16 tensor cores arrived with Ampere (A100 = 8.0, RTX 30xx / A40 = 8.6, L40 / RTX 40xx = 8.9, H100 = 9.0)
BF16_MIN_CAPABILITY = (8, 0)


def resolve(device: torch.device | str) -> torch.device:
    """``cuda`` without an index means the current device; name it, so every later call agrees."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of a training step on ``device``, or None for plain fp32.

    bf16 only on GPUs of compute capability >= 8.0, which run it on tensor cores. Older GPUs (V100 7.0,
    T4 / RTX 20xx 7.5, P100 6.0) train in fp32. We chose fp32 over fp16 + ``GradScaler`` there: the
    scaler decides on the host whether to skip each optimizer step (one synchronisation per step,
    which the step loop otherwise avoids), fp16 overflows at 65504 where bf16 and fp32 do not, and
    the field's hot path (the hash grid) is fp32 and memory-bound either way. CPU: fp32 (CPU bf16 is
    slower than fp32 on most CPUs).
    """
    if not amp or device.type != "cuda":
        return None
    if tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY:
        return torch.bfloat16
    return None


@functools.lru_cache(maxsize=1)
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo:
    there a bf16 matrix product runs 2-3x as fast as fp32 (one core, the point head's 64-wide products:
    about 190 against 70-90 GFLOP/s); elsewhere torch emulates bf16 and it is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def head_product_dtype(device: torch.device, amp: bool) -> torch.dtype:
    """The dtype of the point head's matrix products in training on ``device``.

    On a CPU that multiplies bf16 natively the head (the largest part of a step) multiplies in bf16, with
    its softmax, ReLU and every sum in fp32 (``cryoformer.point_density``): the same split as GPU autocast,
    and learning per epoch on the suite as in fp32 (``docs/performance.md``). Elsewhere fp32; on a GPU
    autocast decides."""
    if amp and device.type == "cpu" and cpu_multiplies_bf16():
        return torch.bfloat16
    return torch.float32


def precision_note(device: torch.device, amp: bool) -> str:
    """One phrase for the training log: what runs, and why not bf16 when it was asked for."""
    dtype = autocast_dtype(device, amp)
    if dtype is not None:
        return "bf16 autocast"
    if head_product_dtype(device, amp) == torch.bfloat16:
        return "fp32, the point head's products in bf16 (CPU with bf16 instructions)"
    if amp and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"fp32 (compute capability {major}.{minor} < 8.0: no bf16 tensor cores)"
    return "fp32"


def bind(device: torch.device | None) -> None:
    """Make ``device`` the current CUDA device of the calling thread.

    The current device is per thread. Without this, with ``gpus = 1`` the autocast checks, memory
    statistics and pinned buffers of a thread would belong to GPU 0 (and create a context there).
    """
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The generator state of the GPU in use, as a CPU byte tensor (None off CUDA).

    Only this one device's: a checkpoint must resume on another GPU id or with fewer GPUs visible, and
    in a data-parallel job every rank's generator is in the same state (they draw the same noise)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_rng_state(device).cpu()


def restore_cuda_rng(saved: torch.Tensor | list | None, device: torch.device) -> None:
    """Set the GPU generator of ``device`` from a checkpoint's ``cuda_rng``.

    ``torch.cuda.set_rng_state`` takes only a CPU byte tensor. Checkpoints written before the state was
    saved per device hold a list (one per visible GPU): take this device's entry, else the first."""
    if device.type != "cuda" or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        if not saved:
            return
        index = device.index or 0
        saved = saved[index] if index < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved.detach().to("cpu", torch.uint8), device)
