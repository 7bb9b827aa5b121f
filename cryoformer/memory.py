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
    """Free memory on ``device``: CUDA's free memory, or the host's MemAvailable (Linux), else 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
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


def activation_budget(device: torch.device, share: float = MEMORY_SHARE) -> int:
    """Bytes a training step's activations may take: ``share`` of the free memory."""
    return int(available_bytes(device) * share)
