"""How many point evaluations fit in memory at once, so that activations are only recomputed when needed.

Keeping every activation of a training step for the backward is about a third faster than activation
checkpointing (which runs the forward twice), so a step is done in one piece when its activations fit
in a share of the memory that is free, and cut into checkpointed chunks only when they would not.
"""

from __future__ import annotations

import os

import torch

# share of the free memory a training step's activations may take (the rest: model, optimiser, data,
# the allocator's slack and other processes)
MEMORY_SHARE = 0.5


def available_bytes(device: torch.device) -> int:
    """Memory a step may still use on ``device``: on CUDA the driver's free memory plus what PyTorch's
    caching allocator holds but does not use (``cudaMemGetInfo`` counts cached blocks as used, so after
    the first step the free memory alone would look halved); on the host MemAvailable (Linux), else 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    env = os.environ.get("CRYOFORMER_MEMORY_BYTES")  # for tests and for capping a shared node
    if env:
        return int(env)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def activation_bytes_per_point(mode: str, tokens: int, channels: int, feat_dim: int = 32, hidden: int = 16,
                               bytes_per_float: int = 4) -> int:
    """Bytes of the forward tensors the spatial head keeps per point and image (fp32).

    Point form: a few C-wide vectors and three N-wide ones (logits, softmax, its cast). Literal form:
    F_S(x), the attention output and the FFN's two layers are N x C each, the logits, their scaled
    copy and the softmax N x N each."""
    base = feat_dim + 2 * hidden
    if mode == "point":
        floats = base + 7 * channels + 3 * tokens
    else:
        floats = base + 4 * tokens * channels + 3 * tokens * tokens + tokens
    return floats * bytes_per_float


def points_per_chunk(mode: str, *, tokens: int, channels: int, batch: int, budget_bytes: int,
                     feat_dim: int = 32, hidden: int = 16) -> int:
    """Points per image in one chunk so that ``batch`` images' head activations fit ``budget_bytes``."""
    per_point = activation_bytes_per_point(mode, tokens, channels, feat_dim, hidden)
    return max(1, int(budget_bytes) // (max(1, batch) * per_point))


# CUDA budgets by device, kept until :func:`invalidate_budget`: the chunk size must not change from step to
# step with what the allocator happens to hold, and the driver query is not free
_BUDGETS: dict[torch.device, int] = {}


def activation_budget(device: torch.device, share: float = MEMORY_SHARE) -> int:
    """Bytes a training step's activations may take: ``share`` of the available memory.

    On CUDA computed once and reused until :func:`invalidate_budget` (the trainer calls it when training
    starts and whenever the occupancy grid, hence the number of points a step renders, changes)."""
    if device.type != "cuda":
        return int(available_bytes(device) * share)
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _BUDGETS:
        _BUDGETS[key] = int(available_bytes(key) * share)
    return _BUDGETS[key]


def invalidate_budget() -> None:
    """Forget the CUDA budgets: the next :func:`activation_budget` asks the device again."""
    _BUDGETS.clear()
