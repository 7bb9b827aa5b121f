"""The deformation tokens F_D without a layer norm: why (the normalised form sees only the latent's
direction), and that a continue does not drop it silently (older checkpoints: ``test_checkpoint_compat.py``)."""

from __future__ import annotations

import torch

from cryoformer.model import CryoFormer, ModelConfig

SMALL = dict(box=16, pixel_size_A=8.0, zdim=2, tokens=8, channels=16, heads=2, enc_layers=2, enc_dim=32)


def _token_change_from_doubling(norm: bool) -> float:
    """Relative change of the structure tokens when a large latent is doubled."""
    torch.manual_seed(0)
    model = CryoFormer(ModelConfig(**SMALL, deformation_norm=norm)).eval()
    z = torch.tensor([[30.0, -20.0]])
    with torch.no_grad():
        t1, t2 = model.tokens_from_latent(z, 1), model.tokens_from_latent(2 * z, 1)
    return float((t2 - t1).norm() / t1.norm())


def test_normalised_deformation_tokens_see_only_the_latents_direction():
    """With the norm, a latent far from 0 and its double give nearly the same structure: the conformations
    can only be told apart by angle. Without it, the latent's length moves the structure as well."""
    with_norm, without = _token_change_from_doubling(True), _token_change_from_doubling(False)
    assert with_norm < 0.01
    assert without > 0.1


def test_continue_refuses_to_drop_the_norm_of_an_older_checkpoint():
    """A job continued from a normalised checkpoint with today's default names the parameter."""
    from cryoformer_ext.job.run import architecture_changes

    old = ModelConfig(**SMALL, deformation_norm=True)
    new = ModelConfig(**SMALL, deformation_norm=False)
    assert architecture_changes(old, new) == ["deformation_norm = True in the checkpoint, False now"]
