"""Checkpoints made before a model field existed rebuild the model they were trained with.

Each field below was added with a new default that changes the architecture; a saved configuration that
lacks it must take the value that rebuilds the older model, or its weights would not load (or, worse,
would load into another function)."""

from __future__ import annotations

import pytest

from cryoformer.model import CryoFormer, ModelConfig

SMALL = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32)

# (field, the value every checkpoint made before the field was added was trained with)
ADDED_FIELDS = [("query_code_cycles", 0.0), ("deformation_norm", True)]


@pytest.mark.parametrize(("field", "older"), ADDED_FIELDS)
def test_a_checkpoint_without_the_field_loads_as_it_was(field: str, older) -> None:
    old_cfg = ModelConfig(**SMALL, **{field: older})
    old = CryoFormer(old_cfg)
    saved = old_cfg.model_dump()
    del saved[field]
    cfg = ModelConfig.from_checkpoint(saved)
    assert getattr(cfg, field) == older
    # today's default builds other weights, so loading into it would fail: the fill-in is what matters
    assert getattr(ModelConfig(**SMALL), field) != older
    assert set(CryoFormer(ModelConfig(**SMALL)).state_dict()) != set(old.state_dict())
    CryoFormer(cfg).load_state_dict(old.state_dict(), strict=True)
