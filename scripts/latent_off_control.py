"""A pytest plugin for control runs of the learning tests: the decoder never sees the latent (z * 0).

A learning test that still passes this way checks something other than the learned motion. Usage:

    PYTHONPATH=scripts pytest -p latent_off_control tests/test_heterogeneity_snr.py tests/test_analysis_e2e.py \
        tests/test_reconstruction.py::test_two_state_heterogeneity_is_recovered

Each of these must fail.
"""

from __future__ import annotations

import torch

from cryoformer.model import CryoFormer

_tokens_from_latent = CryoFormer.tokens_from_latent


def _blind(self: CryoFormer, z: torch.Tensor | None, batch: int) -> torch.Tensor:
    return _tokens_from_latent(self, None if z is None else z * 0, batch)


CryoFormer.tokens_from_latent = _blind
