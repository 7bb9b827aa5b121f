"""Maps made after the job (``eval``, ``analyze``) default to the particles' box the job recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cryoformer_ext.commands.eval import default_box
from cryoformer_ext.job.run import output_map_box
from cryoformer_ext.config import JobConfig
from cryoformer_ext.jobdir import InputScale, JobFilesError, read_input_scale, write_input_scale


def test_eval_defaults_to_the_recorded_particle_box(tmp_path):
    gen = SimpleNamespace(train_box=16)
    assert default_box(tmp_path, gen, log=lambda m: None) == 16  # an older job: the training box
    write_input_scale(tmp_path, InputScale(box=32, pixel_size_A=3.0))
    assert read_input_scale(tmp_path) == InputScale(box=32, pixel_size_A=3.0)
    assert default_box(tmp_path, gen, log=lambda m: None) == 32


def test_damaged_record_names_the_file(tmp_path):
    (tmp_path / "input_particles.json").write_text("{not json")
    with pytest.raises(JobFilesError, match="input_particles.json"):
        read_input_scale(tmp_path)


def test_job_map_box_is_the_particle_box_unless_set():
    assert output_map_box(JobConfig(), 256) == 256
    assert output_map_box(JobConfig(map_box=64), 256) == 64
