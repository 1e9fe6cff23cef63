"""Training options that a run could silently ignore: each test fails if its option had no effect.

Real single-process `moecl train` runs of the tiny config on the session's world (shapes, digits; colors held
out), each a few seconds to half a minute."""
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, cpu_env, read_json, run_train, train_cmd
from moecl.runstate.files import latest_valid, load_nested


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


def _scalars(run, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_epochs_set_the_steps_of_each_task(world, tmp_path):
    """train.epochs=0.75 at batch 16: shapes (8 classes x 16 = 128 train images) gets ceil(0.75 x 128 / 16) = 6
    steps and digits (160 images) ceil(7.5) = 8, instead of tiny.yaml's 4 iterations per task."""
    assert [read_json(world / t / "task.json")["counts"]["train"] for t in ("shapes", "digits")] == [128, 160]
    run = tmp_path / "run"
    run_train(run, world, "train.epochs=0.75", "ddas.iterations=5")
    log = (run / "train.log").read_text()
    assert re.findall(r"task (\d)/2 (\w+): (\d+) steps", log) == [("1", "shapes", "6"), ("2", "digits", "8")]
    assert len(_scalars(run, "train/loss")) == 6 + 8  # runtime.log_every=1: one loss per step that ran


def test_aux_loss_weight_adds_the_load_balancing_loss(tiny_run, tmp_path):
    """moe.aux_loss_weight=2: the first step's loss is the session tiny run's (weight 0, same weights, batch and
    noise before any update) plus 2 x the load-balancing loss; later steps' routers differ from that run's."""
    world, base = tiny_run
    run = tmp_path / "run"
    run_train(run, world, "moe.aux_loss_weight=2.0", "ddas.iterations=5")
    loss0, aux0 = _scalars(base, "train/loss")[0], _scalars(base, "train/aux_loss")[0]
    loss, aux = _scalars(run, "train/loss")[0], _scalars(run, "train/aux_loss")[0]
    assert aux == pytest.approx(aux0, rel=1e-6) and aux > 0.1
    assert loss == pytest.approx(loss0 + 2.0 * aux, rel=1e-5)
    a, b = _adapters(run / "checkpoints" / "task-000"), _adapters(base / "checkpoints" / "task-000")
    assert not all(a[k].equal(b[k]) for k in a if ".router.0" in k)


def test_dense_adapter_trains_one_adapter_per_block(world, tmp_path):
    """train.method=dense-adapter: the state holds one adapter per block of both towers (no experts, routers or
    noise), learned from its zero-output init in task 0 and trained on in task 1; the report names the method."""
    run = tmp_path / "run"
    run_train(run, world, "train.method=dense-adapter", "train.iterations=2", "ddas.iterations=5")
    a0, a1 = (_adapters(run / "checkpoints" / f"task-00{t}") for t in (0, 1))
    assert not any(re.search(r"\.(experts|router|noise)\.", k) for k in a0), sorted(a0)[:8]
    sites = {".".join(k.split(".")[:2]) for k in a0}
    assert sites == {f"{tower}.{i}" for tower in ("image", "text") for i in range(2)}
    ups = [k for k in a0 if k.endswith("up.weight")]
    assert len(ups) == 4 and all(a0[k].abs().sum() > 0 for k in ups)  # zero at init
    assert all(not a0[k].equal(a1[k]) for k in ups)
    assert set(read_json(run / "report.json")["methods"]) == {"dense-adapter", "zero-shot"}


def test_class_incremental_run_with_one_shared_router(world, tmp_path):
    """The CIL variant (cil_*.yaml's settings on the tiny world): 2 experts, one shared router, no freeze, no DDAS,
    eval.cil. One router per site is trained by both tasks; row t scores the test images of every task seen so
    far against all their classes (shapes: 64 images, then shapes + digits: 144), so each accuracy is a whole
    count of them; the report gives CIL Avg / Last."""
    run = tmp_path / "run"
    run_train(run, world, "moe.num_experts=2", "moe.shared_router=true", "moe.freeze_top=0", "ddas.enabled=false",
              "eval.cil=true", "eval.modes=[oracle]", "eval.templates=train", "train.label_smoothing=0",
              "train.iterations=2")
    a0, a1 = (_adapters(run / "checkpoints" / f"task-00{t}") for t in (0, 1))
    assert {k.rsplit(".", 1)[1] for k in a1 if ".router." in k} == {"0"}
    assert all(not a0[k].equal(a1[k]) for k in a1 if ".router." in k)  # task 1 trained the shared router
    assert not any(a1[k].any() for k in a1 if k.endswith(".frozen"))
    entry = read_json(run / "report.json")["methods"]["moecl"]
    assert set(entry) == {"oracle"} and entry["oracle"]["kind"] == "cil"
    acc = entry["oracle"]["accuracies"]
    assert len(acc) == 2 and all(abs(a * n / 100 - round(a * n / 100)) < 1e-6 for a, n in zip(acc, (64, 144)))
    metrics = entry["oracle"]["metrics"]
    assert metrics["avg"] == pytest.approx(sum(acc) / 2) and metrics["last"] == acc[1]


def test_shipped_deepspeed_configs_set_precision_and_zero_stage(world, tmp_path):
    """train.ds_config=fp32 / bf16_zero0 / bf16_zero1 on the CPU, each killed before task 0's step 1 so its mid-task
    checkpoint holds step 0's result: fp32 and bf16_zero0 keep torch's AdamW state (ZeRO stage 0), bf16_zero1
    DeepSpeed's ZeRO-1 state; bf16 autocast of the backbone changes step 0's update (slightly) against fp32.
    (The bf16 configs enable torch autocast, not DeepSpeed's bf16 engine: DeepSpeed's "bf16" section needs a GPU
    and moecl refuses it on a CPU, see tests/test_faults.py; fp32 differs from cpu.json only in settings that a
    one-process CPU run never uses, so the two give the same numbers.)"""
    common = ["train.iterations=2", "train.checkpoint_every=1", "train.deterministic=true"]
    states, adapters = {}, {}
    for name in ("fp32", "bf16_zero0", "bf16_zero1"):
        run = tmp_path / name
        _killed_after(run, world, 1, f"train.ds_config={name}", *common)
        ckpt = latest_valid(run)
        assert ckpt.name == "step-000-0000001"
        states[name], adapters[name] = load_nested(ckpt, "optimizer-rank0"), _adapters(ckpt)
    for name in ("fp32", "bf16_zero0"):
        assert "zero_stage" not in states[name] and _adam_steps(states[name]) == {1}, name
    assert states["bf16_zero1"]["zero_stage"] == 1
    assert _adam_steps(states["bf16_zero1"]["base_optimizer_state"]) == {1}
    fp32, bf16 = adapters["fp32"], adapters["bf16_zero0"]
    moved = [k for k in fp32 if ".experts." in k and not fp32[k].equal(bf16[k])]
    assert moved and all(torch.allclose(fp32[k], bf16[k], atol=1e-2) for k in fp32 if fp32[k].is_floating_point())
