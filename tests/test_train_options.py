"""Training options that a run could silently ignore: each test fails if its option had no effect.

Real single-process `moecl train` runs of the tiny config on the session's world (shapes, digits; colors held
out), each a few seconds to half a minute."""
import json
import re
import subprocess

import pytest
from safetensors.torch import load_file

from helpers import ROOT, cpu_env, read_json, run_train, train_cmd
from moecl.train.checkpoint import latest_valid, load_nested


def _adapters(ckpt_dir):
    return load_file(str(ckpt_dir / "adapters" / "adapters.safetensors"))


def _killed_after(run, world, step: int, *args: str) -> subprocess.CompletedProcess:
    """A run SIGKILLed (moecl/train/faults.py) before the optimizer step of task 0 step ``step``, so the
    mid-task checkpoint before it stays (a finished task prunes its mid-task checkpoints)."""
    proc = subprocess.run(train_cmd(run, world, *args), env=cpu_env(MOECL_FAULT=f"kill@step:0:{step}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    return proc


def _adam_steps(state) -> set[int]:
    """The step counts of every parameter in a (torch) AdamW state dict."""
    return {int(s["step"]) for s in state["state"].values()}


def test_grad_accum_steps_the_optimizer_once_per_loop_step(world, tmp_path):
    """train.grad_accum=2: each of the trainer's steps runs 2 micro-batches and then ONE optimizer step. DeepSpeed
    counts micro-steps in ``engine.step()``: a loop that called it once per 2 backwards would step the optimizer
    every other loop step (1 AdamW step after 2 loop steps), one that stepped per micro-batch would take 4."""
    run = tmp_path / "run"
    _killed_after(run, world, 3, "train.grad_accum=2", "data.batch_size=16", "train.iterations=4",
                  "train.checkpoint_every=2", "ddas.iterations=5")
    ckpt = latest_valid(run)
    assert ckpt.name == "step-000-0000002"
    assert read_json(ckpt / "trainer.json")["progress"]["step"] == 2
    assert _adam_steps(load_nested(ckpt, "optimizer-rank0")) == {2}
