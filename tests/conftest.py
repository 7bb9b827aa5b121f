import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# CI has 2 cores; CRYOFORMER_TEST_THREADS=1 leaves one free when something else runs beside the suite
torch.set_num_threads(int(os.environ.get("CRYOFORMER_TEST_THREADS", min(2, os.cpu_count() or 1))))


def pytest_collection_modifyitems(config, items):
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
