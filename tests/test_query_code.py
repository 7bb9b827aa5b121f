"""The position code in the point attention's query: what it changes at the start of training, and how it
behaves under autocast (older checkpoints: ``test_checkpoint_compat.py``)."""

from __future__ import annotations

import torch

from cryoformer.decoder import PositionCode
from cryoformer.model import CryoFormer, ModelConfig

SMALL = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32)


def _attention_at_init(cycles: float) -> torch.Tensor:
    """(P, N) attention of two opposite corners' and the centre's points over one conformation's tokens."""
    torch.manual_seed(0)
    model = CryoFormer(ModelConfig(**SMALL, query_code_cycles=cycles)).eval()
    pts = torch.tensor([[-5.0, -5.0, -5.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    with torch.no_grad():
        kv = model.head.keys_values(model.tokens_from_latent(torch.zeros(1, 2), 1))
        _, a = model.head.attend(model.field_query(pts), kv, return_attention=True)
    return a[0]


def test_without_the_code_every_point_attends_alike_at_the_start():
    """The reason for the code: with hash features near 0 the attention over the tokens is the same at
    every point (the paper's query); with it, distant points weight the tokens differently."""
    plain, coded = _attention_at_init(0.0), _attention_at_init(2.0)
    assert (plain - plain[1]).abs().max() < 1e-3
    assert (coded[0] - coded[2]).abs().max() > 0.05


def test_code_phases_stay_fp32_under_autocast():
    """Phases of up to ~40 rad in bf16 would be off by ~0.1 rad; the sines and cosines must match fp32."""
    code = PositionCode(16, 2.0)
    code.proj = torch.nn.Identity()          # look at the features themselves
    pos = torch.rand(50, 3) - 0.5
    ref = code(pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = code(pos)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, ref, rtol=1e-6, atol=1e-6)


def test_a_coded_head_refuses_a_query_without_positions():
    """Dropping the code when no positions are passed would evaluate another field than the trained one."""
    import pytest

    model = CryoFormer(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="position code"):
        model.head.spatial_query(torch.zeros(4, model.grid.n_output_dims))
