"""Shared test helpers: launching real multi-process runs; inputs and non-trivial adapter weights for the tiny model."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Uninterrupted deterministic runs that the kill-and-resume tests (tests/test_faults.py, tests/test_train.py) compare
# against: 2 tasks x 4 steps, a mid-task checkpoint every 2 steps (1 process); 2 x 2 steps at ep_size 2 (2 processes).
RESUME_ARGS = {1: ["train.iterations=4", "train.checkpoint_every=2", "train.deterministic=true", "ddas.iterations=20"],
               2: ["train.iterations=2", "train.checkpoint_every=1", "train.deterministic=true", "ddas.iterations=10",
                   "moe.ep_size=2"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def cpu_env(**extra) -> dict:
    """A child's environment: CPU DeepSpeed, one thread, and none of the rendezvous variables that an in-process
    world of one (set up by an earlier test) left in os.environ."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(ROOT / script), *args]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def build_world(out: Path, domains: str = "shapes,digits,colors", held_out: int = 1, train: int = 16,
                test: int = 8, shard_size: int | None = None) -> Path:
    """A tiny synthetic world (a few seconds)."""
    cmd = [sys.executable, "-m", "data_tools", "synthetic", "--out", str(out), "--domains", domains,
           "--held-out", str(held_out), "--train-per-class", str(train), "--test-per-class", str(test),
           "--pretrain-per-class", "0", "--no-progress"]
    if shard_size:
        cmd += ["--shard-size", str(shard_size)]
    subprocess.run(cmd, env=cpu_env(), check=True, capture_output=True, cwd=ROOT, timeout=300)
    return out


def train_cmd(run: Path, world: Path, *overrides: str, nproc: int = 1, resume: str | None = None,
              config: str = "tiny", launcher: str = "torchrun") -> list[str]:
    if nproc == 1 and launcher == "console":  # the installed `moecl` script itself, next to this python
        base = [str(Path(sys.executable).parent / "moecl")]
    elif nproc == 1:
        base = [sys.executable, "-m", "moecl"]
    elif launcher == "torchrun":
        base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "-m", "moecl"]
    else:  # DeepSpeed's own launcher (its CPU accelerator spawns one process per "slot")
        base = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--no_local_rank", "--module", "moecl"]
    cmd = base + ["train", "--config", config, "--out", str(run), f"data.root={world}",
                  f"data.sequence={world / 'sequence.yaml'}", *overrides]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def run_train(run: Path, world: Path, *overrides: str, nproc: int = 1, resume: str | None = None,
              timeout: int = 600, check: bool = True, launcher: str = "torchrun",
              env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(run, world, *overrides, nproc=nproc, resume=resume, launcher=launcher),
                          env=env or cpu_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"moecl train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def resumed_from(run: Path) -> tuple[str, int, int] | None:
    """(checkpoint name, task, step) of the last "resumed from" line of RUN/train.log, or None."""
    found = re.findall(r"resumed from (\S+) \(task (\d+), step (\d+)\)", (Path(run) / "train.log").read_text())
    return (Path(found[-1][0]).name, int(found[-1][1]), int(found[-1][2])) if found else None


def steps_per_process(step_log: Path, rank: int = 0) -> list[list[tuple[int, int]]]:
    """The (task, step) pairs each process finished on ``rank``, in order, one list per process, from the file
    MOECL_STEP_LOG names (moecl/train/faults.py; a step that a checkpoint already held kills the run)."""
    runs: dict[str, list[tuple[int, int]]] = {}
    for line in Path(step_log).read_text().splitlines():
        kind, pid, *rest = line.split()
        if kind == "step" and int(rest[0]) == rank:
            runs.setdefault(pid, []).append((int(rest[1]), int(rest[2])))
    return list(runs.values())


def inputs(n_img=6, texts=("a red circle", "a blue square", "the glyph q")):
    """Fixed images [n_img, 3, 32, 32] and tokenized prompts for the tiny CLIP."""
    import open_clip
    import torch
    g = torch.Generator().manual_seed(1)
    return torch.randn(n_img, 3, 32, 32, generator=g), open_clip.get_tokenizer("moecl-tiny")(list(texts))


def scramble(model, std=0.5):
    """Give experts and routers non-trivial values so routing and adapters matter."""
    import torch
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for site in model.moe_sites():
            for p in site.parameters():
                if p.dtype.is_floating_point:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
