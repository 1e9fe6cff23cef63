import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process, kill-and-resume or large-backbone tests")
