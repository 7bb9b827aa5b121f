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


def activation_bytes_per_point(attention: str, tokens: int, channels: int) -> int:
    """Bytes kept for the backward per (image, point) by the spatial attention and the density FFN.

    Counted from the tensors autograd saves: point form -- logits and softmax output (2N), attention
    output, residual, FFN hidden before and after ReLU (4C); literal form -- the per-point N x N attention
    (2 N^2) and N x C outputs (4 N C). fp32; a factor 1.5 covers temporaries of the same size."""
    n, c = tokens, channels
    per = 2 * n + 4 * c if attention == "point" else 2 * n * n + 4 * n * c
    return int(per * 4 * 1.5)


def points_per_chunk(attention: str, tokens: int, channels: int, batch: int, device: torch.device,
                     share: float = MEMORY_SHARE) -> int:
    """Points of one image batch whose activations fit in ``share`` of the free memory (at least 1024)."""
    per = activation_bytes_per_point(attention, tokens, channels) * max(batch, 1)
    return max(1024, int(available_bytes(device) * share // per))
