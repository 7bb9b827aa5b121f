import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# CI has 2 cores; CRYOFORMER_TEST_THREADS=1 leaves one free when something else runs beside the suite
torch.set_num_threads(int(os.environ.get("CRYOFORMER_TEST_THREADS", min(2, os.cpu_count() or 1))))


# The longest files start first, so that with two workers (scripts/test.sh) the longest one does not start
# last. xdist queues two files per worker at the start, so the longest file's worker gets a short one
# second (test_metrics.py) and the other worker the next long ones.
LONGEST_FIRST = ("test_heterogeneity_snr.py", "test_relion45_protocol.py", "test_metrics.py",
                 "test_occupancy_training.py", "test_reconstruction.py", "test_analysis_e2e.py", "test_explore.py",
                 "test_reliability.py", "test_relion_pipeline.py")


def _start_rank(item) -> int:
    name = Path(str(item.fspath)).name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: the order inside a file is kept
    if shutil.which("relion_project") is None:
        skip = pytest.mark.skip(reason="RELION 3.1 programs not on PATH (apt-get install -y relion)")
        for item in items:
            if "relion" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
