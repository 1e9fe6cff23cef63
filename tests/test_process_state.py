"""moecl leaves the process as it found it: the trainer's train.log handler and logger level end with its run,
and a world of one made by moecl.runtime.distributed() ends with its block, environment restored."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT, cpu_env

SCRIPT = r"""
import json, logging, os, sys
from moecl.config import load_config
from moecl.runtime import distributed
from moecl.train.loop import ContinualTrainer
import torch.distributed as dist

world, run = sys.argv[1], sys.argv[2]
ours = logging.getLogger("moecl")
before = {"handlers": len(ours.handlers), "level": ours.level,
          "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}
cfg = load_config("tiny", [f"data.root={world}", f"data.sequence={world}/sequence.yaml", "train.iterations=1",
                           "ddas.iterations=5", "runtime.progress=false"])
with distributed("cpu") as info:
    during = {"rank_env": os.environ.get("RANK"), "world": dist.get_world_size()}
    ContinualTrainer(cfg, run).run()
    after_run = {"handlers": len(ours.handlers), "level": ours.level}
after = {"env": {k: os.environ.get(k) for k in before["env"]}, "initialized": dist.is_initialized()}
print(json.dumps({"before": before, "during": during, "after_run": after_run, "after": after}))
"""


@pytest.mark.slow
def test_trainer_and_world_of_one_leave_no_process_state(world, tmp_path):
    env = cpu_env()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(world), str(tmp_path / "run")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["during"] == {"rank_env": "0", "world": 1}
    # the trainer's file handler and DEBUG level were its own, for its run only
    assert got["after_run"] == {"handlers": got["before"]["handlers"], "level": got["before"]["level"]}
    # the world of one is gone and RANK / MASTER_* are as before (unset: cpu_env removed them)
    assert got["after"] == {"env": got["before"]["env"], "initialized": False}
    assert all(v is None for v in got["before"]["env"].values())
    assert "task 1 done" in (tmp_path / "run" / "train.log").read_text()
