"""Job defaults that depend on the run: the learning-rate decay."""

from __future__ import annotations

import pytest

from cryoformer_ext.config import JobConfig
from cryoformer_ext.job.configs import train_config_for


@pytest.mark.parametrize("particles, epochs, given, expected", [
    (2000, 18, None, 0.1), (2000, 6, None, 0.1), (1000, 10, None, 0.1),   # 10,000 images or more: decay
    (200, 4, None, 1.0), (999, 10, None, 1.0),                          # fewer: constant rates
    (200, 4, "0.1", 0.1), (2000, 18, "1", 1.0), (2000, 18, "0.3", 0.3)])  # a value the user gives is kept
def test_lr_final_default_decays_only_runs_of_10000_images_or_more(particles, epochs, given, expected):
    strings = {"epochs": str(epochs)} | ({} if given is None else {"lr_final": given})
    assert train_config_for(JobConfig.from_strings(strings), particles).lr_final == expected
