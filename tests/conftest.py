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

# Every test gets this limit (pytest-timeout) unless it sets its own: a hung collective or loader fails the
# test instead of the whole CI job. Generous: multi-process tests on a loaded 2-core machine take minutes.
TEST_TIMEOUT_S = 900


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process, kill-and-resume, demo or soak test "
                                       "(the fast subset: pytest -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """The tiny synthetic world (shapes, digits; colors held out; 16 train / 8 test images per class), built once
    per session. Tests must not modify it: copy it first."""
    from helpers import build_world
    return build_world(tmp_path_factory.mktemp("world") / "w")


@pytest.fixture(scope="session")
def tiny_run(world, tmp_path_factory) -> tuple[Path, Path]:
    """(world, run): one 2-task run of the tiny config on ``world``, shared by every test that only reads a run.

    Made the way a user makes it: the installed ``moecl`` console script, with no DS_ACCELERATOR in the
    environment (moecl picks DeepSpeed's CPU accelerator itself; tests/test_cli.py checks this run's log)."""
    from helpers import cpu_env, run_train
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    env = {k: v for k, v in cpu_env().items() if k != "DS_ACCELERATOR"}
    run_train(run, world, launcher="console", env=env)
    return world, run


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory) -> Path:
    """The demo's pretrained moecl-tiny CLIP (tests/data/pretrained_tiny, see its provenance) as a full open_clip
    safetensors file for ``model.init_checkpoint``."""
    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from make_pretrained_tiny import write_full
    return write_full(tmp_path_factory.mktemp("pretrained") / "model.safetensors")


@pytest.fixture(scope="session")
def reference(world, tmp_path_factory):
    """``reference(nproc)``: the uninterrupted run of RESUME_ARGS[nproc] on ``world``, made once per session on first
    use. Tests must not modify it: copy it first."""
    from helpers import RESUME_ARGS, run_train
    runs = {}

    def get(nproc: int) -> Path:
        if nproc not in runs:
            run = tmp_path_factory.mktemp(f"ref{nproc}") / "run"
            run_train(run, world, *RESUME_ARGS[nproc], nproc=nproc)
            runs[nproc] = run
        return runs[nproc]
    return get
