"""`moecl train` end to end on CPU: real processes, real DeepSpeed engines, real WebDataset shards."""
import json
import math
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import RESUME_ARGS, ROOT, cpu_env, resumed_from, run_train, steps_per_process, train_cmd
from moecl.runstate.files import latest_valid, list_checkpoints, verify


def _adapters(ckpt_dir):
    return load_file(str(ckpt_dir / "adapters" / "adapters.safetensors"))


def _check_run_folder(run, num_tasks=2):
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts if p.name.startswith("task-")] == [f"task-{i:03d}" for i in range(num_tasks)]
    assert all(verify(p) is None for p in ckpts)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    report = json.loads((run / "report.json").read_text())
    entry = report["methods"]["moecl"]
    for mode in ("oracle", "agnostic"):
        m = entry[mode]["matrix"]
        assert len(m) == num_tasks and all(len(r) == num_tasks + 1 for r in m)  # + 1 held-out column
        assert set(entry[mode]["metrics"]) >= {"transfer", "avg", "last"}
    assert (run / "report.md").is_file()
    return report


def test_single_process_run_keeps_old_routers_and_frozen_experts(tiny_run):
    _, run = tiny_run
    _check_run_folder(run)
    a0, a1 = _adapters(run / "checkpoints" / "task-000"), _adapters(run / "checkpoints" / "task-001")
    routers0 = [k for k in a0 if k.endswith((".router.0", ".noise.0"))]
    assert routers0 and all(torch.equal(a0[k], a1[k]) for k in routers0), "router 0 changed in task 1"
    # router 1 of every site exists only after task 1 and was trained (moved away from its initial zeros)
    routers1 = [k[:-1] + "1" for k in routers0 if k.endswith(".router.0")]
    assert all(k not in a0 for k in routers1)
    assert all(not torch.equal(a1[k], torch.zeros_like(a1[k])) for k in routers1)
    frozen0 = {k.rsplit(".", 1)[0]: a0[k].bool() for k in a0 if k.endswith(".frozen")}
    checked = 0
    for site, mask in frozen0.items():
        assert int(mask.sum()) == 2  # activate-freeze: top-2 per block
        for gid in mask.nonzero().flatten().tolist():
            for k in a0:
                if k.startswith(f"{site}.experts.{gid}."):
                    assert torch.equal(a0[k], a1[k]), f"frozen expert {k} changed in task 1"
                    checked += 1
    assert checked > 0
    meta = json.loads((run / "checkpoints" / "task-001" / "adapters" / "adapters.json").read_text())
    assert meta["num_tasks"] == 2
    _check_activate_freeze(run, iterations=4, ranks=1)
    # the unfrozen experts did train in task 1
    unfrozen = [k for k in a0 if ".experts." in k and k.endswith("up.weight")
                and not frozen0[k.split(".experts.")[0]][_expert_id(k)]]
    assert any(not torch.equal(a0[k], a1[k]) for k in unfrozen)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_processes_expert_parallel_through_a_launcher(world, tmp_path, launcher):
    from moecl import load_run
    from moecl.evaluation.cli import evaluate_run
    from moecl.model.state import adapter_state
    run = tmp_path / "ep2"
    run_train(run, world, "moe.ep_size=2", "train.iterations=2", "train.checkpoint_every=1", nproc=2,
              launcher=launcher)
    report = _check_run_folder(run)
    assert report["config"]["moe"]["ep_size"] == 2
    meta = json.loads((run / "checkpoints" / "task-001" / "adapters" / "adapters.json").read_text())
    assert meta["moe"]["ep_size"] == 2
    state = _adapters(run / "checkpoints" / "task-001")
    assert sum(1 for k in state if k.startswith("image.0.experts.") and k.endswith("up.weight")) == 4
    log = (run / "train.log").read_text()
    assert "2 rank(s)" in log
    _check_activate_freeze(run, iterations=2, ranks=2)  # counts summed over both ranks, frozen = their top 2
    # the ranks agree on the frozen set: rank 1 holds experts 2 and 3 of each site at ep_size 2, and those that
    # task 0 froze (by the counts rank 0 wrote) come out of task 1 unchanged, while task 1 trains the others
    a0 = _adapters(run / "checkpoints" / "task-000")
    experts = [k for k in a0 if ".experts." in k]
    frozen_on_1 = [k for k in experts if _frozen_in(a0, k) and _expert_id(k) >= 2]
    assert frozen_on_1 and all(torch.equal(a0[k], state[k]) for k in frozen_on_1), "rank 1 trained a frozen expert"
    assert any(not torch.equal(a0[k], state[k]) for k in experts if not _frozen_in(a0, k))
    # each rank scored its part of every test set: reduced over the ranks, each routing-confusion row (test set)
    # counts every test image once (a report of one rank's counts would show about half)
    sizes = [json.loads((world / name / "task.json").read_text())["counts"]["test"]
             for name in ("shapes", "digits", "colors")]
    for mode in ("oracle", "agnostic"):
        assert [sum(row) for row in report["methods"]["moecl"][mode]["routing_confusion"]] == sizes, mode
    # the checkpoint of the 2-rank, ep_size 2 run loads into one process at ep_size 1 with every tensor it holds
    # (2 iterations move the rows too little to show experts that were not loaded)
    loaded = load_run(run, device="cpu")
    assert loaded.model.moe_cfg.ep_size == 1
    held = adapter_state(loaded.model)[0]
    assert held.keys() == state.keys() and [k for k in state if not torch.equal(held[k], state[k])] == []
    # and evaluated there gives the report's rows
    results, _ = evaluate_run(run, device="cpu")
    for mode in ("oracle", "agnostic"):
        entry = report["methods"]["moecl"][mode]
        assert results["modes"][mode]["row"] == entry["matrix"][-1], mode
        assert results["modes"][mode]["routing_confusion"] == entry["routing_confusion"], mode
    if launcher != "torchrun":
        return
    # its task-end checkpoint resumes in one process at ep_size 1: task 0 is kept as it was, task 1 trains
    one = tmp_path / "ep1"
    run_train(one, world, "moe.ep_size=1", "train.iterations=2", resume=str(run / "checkpoints" / "task-000"))
    assert resumed_from(one) == ("task-000", 1, 0) and "1 rank(s)" in (one / "train.log").read_text()
    resumed = json.loads((one / "report.json").read_text())
    assert resumed["config"]["moe"]["ep_size"] == 1
    for mode in ("oracle", "agnostic"):
        assert resumed["methods"]["moecl"][mode]["matrix"][0] == report["methods"]["moecl"][mode]["matrix"][0]
    b1 = _adapters(one / "checkpoints" / "task-001")
    kept = [k for k in a0 if k.endswith((".router.0", ".noise.0")) or (".experts." in k and _frozen_in(a0, k))]
    assert kept and all(torch.equal(a0[k], b1[k]) for k in kept), "task 0's routers or frozen experts changed"
    assert any(not torch.equal(a0[k], b1[k]) for k in a0 if ".experts." in k), "task 1 did not train at ep_size 1"


def _check_activate_freeze(run, iterations, ranks, batch=16, top_k=2, freeze_top=2):
    """Each site's counts sum to steps x samples x top_k over all ranks (image: the global batch; text: every
    rank encodes each class prompt), and the frozen set grows by the top ``freeze_top`` of the task's counts."""
    seq = [json.loads((run / "checkpoints" / f"task-00{t}" / "trainer.json").read_text()) for t in (0, 1)]
    frozen_before = {}
    for t, classes in enumerate((8, 10)):  # shapes, digits
        state = _adapters(run / "checkpoints" / f"task-00{t}")
        newly = seq[t]["progress"]["frozen"][t]
        for site in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".counts")}):
            counts = state[f"{site}.counts"]
            per_step = batch if site.startswith("image") else ranks * classes
            assert int(counts.sum()) == iterations * per_step * top_k, (t, site, counts.tolist())
            top = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))[:freeze_top]
            assert newly[site] == top, (t, site, counts.tolist(), newly[site])
            frozen = set(state[f"{site}.frozen"].nonzero().flatten().tolist())
            assert frozen == frozen_before.get(site, set()) | set(top), (t, site)
            frozen_before[site] = frozen


def _expert_id(key):
    """The global expert id in a key such as ``image.0.experts.3.up.weight``."""
    return int(key.split(".experts.")[1].split(".")[0])


def _frozen_in(state, key):
    return bool(state[f"{key.split('.experts.')[0]}.frozen"][_expert_id(key)])


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_final_state(world, reference, tmp_path):
    """SIGKILL at a random moment of task 1 (once its first mid-task checkpoint exists), then --resume auto: the run
    ends equal to the session's uninterrupted reference run (tests/conftest.py) and trains no step twice."""
    common, ref = RESUME_ARGS[1], reference(1)
    run, steps = tmp_path / "killed", tmp_path / "steps.log"
    proc = subprocess.Popen(train_cmd(run, world, *common), env=cpu_env(MOECL_STEP_LOG=str(steps)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith("step-001") for p in list_checkpoints(run)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    held = latest_valid(run)
    assert held is not None
    progress = json.loads((held / "trainer.json").read_text())["progress"]
    out = run_train(run, world, *common, resume="auto", env=cpu_env(MOECL_STEP_LOG=str(steps)))
    # it resumed from the newest valid checkpoint and trained none of the steps that checkpoint holds
    assert resumed_from(run) == (held.name, progress["task"], progress["step"])
    first, second = steps_per_process(steps)
    assert second[0] == (progress["task"], progress["step"]) and second == sorted(set(second))
    assert sorted(set(first) | set(second)) == [(t, s) for t in range(2) for s in range(4)]
    a, b = _adapters(ref / "checkpoints" / "task-001"), _adapters(run / "checkpoints" / "task-001")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    ra, rb = (json.loads((r / "report.json").read_text())["methods"]["moecl"] for r in (ref, run))
    assert ra["oracle"]["matrix"] == rb["oracle"]["matrix"] and ra["agnostic"]["matrix"] == rb["agnostic"]["matrix"]
    assert out.returncode == 0


def test_resume_with_a_different_model_config_is_refused_and_existing_run_needs_resume(tiny_run, tmp_path):
    world, shared = tiny_run
    run = tmp_path / "run"
    shutil.copytree(shared, run)
    proc = run_train(run, world, "moe.num_experts=6", resume="auto", check=False)
    assert proc.returncode == 2
    assert "moe.num_experts=4 but this command has 6" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train(run, world, check=False)
    assert proc.returncode == 2 and "pass --resume auto" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_zero2_with_bf16_autocast_resumes_to_the_uninterrupted_run(world, tmp_path, nproc):
    """The shipped bf16 configs (torch autocast of the backbone) with ZeRO stage 2, on 1 and on 2 processes (the
    optimizer state partitioned over the ranks): killed (rank 1 only, on 2) before task 0's step 1, resumed from
    the mid-task checkpoint with its ZeRO-2 optimizer state, the run ends where an uninterrupted one ends: the same
    adapters bit for bit and the same accuracy matrices."""
    args = ["train.ds_config=bf16_zero2", "train.iterations=2", "train.checkpoint_every=1", "ddas.iterations=5",
            "train.deterministic=true"]
    reference = tmp_path / "reference"
    run_train(reference, world, *args, nproc=nproc)
    run, steps = tmp_path / "z2", tmp_path / "steps.log"
    killed = subprocess.run(train_cmd(run, world, *args, nproc=nproc),
                            env=cpu_env(MOECL_FAULT="kill@step:0:1", MOECL_FAULT_RANK=str(nproc - 1),
                                        MOECL_STEP_LOG=str(steps)),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and latest_valid(run).name == "step-000-0000001"
    assert (killed.returncode == -9) == (nproc == 1)  # (torchrun reports a killed rank as its own failure)
    # loads the ZeRO-2 optimizer state of the mid-task checkpoint and goes on from step 1
    run_train(run, world, *args, nproc=nproc, resume="auto", env=cpu_env(MOECL_STEP_LOG=str(steps)))
    assert resumed_from(run) == ("step-000-0000001", 0, 1)
    for rank in range(nproc):
        first, second = steps_per_process(steps, rank)
        assert first == [(0, 0)] and second == [(0, 1), (1, 0), (1, 1)]
    report = _check_run_folder(run)
    assert report["config"]["train"]["ds_config"] == "bf16_zero2"
    ours, theirs = _adapters(run / "checkpoints" / "task-001"), _adapters(reference / "checkpoints" / "task-001")
    assert ours.keys() == theirs.keys() and [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    ref = json.loads((reference / "report.json").read_text())["methods"]["moecl"]
    assert {m: report["methods"]["moecl"][m]["matrix"] for m in ("oracle", "agnostic")} == \
        {m: ref[m]["matrix"] for m in ("oracle", "agnostic")}


def test_tensorboard_has_the_documented_tags(tiny_run):
    """README, run folder: loss, lr, gradient norm, images/s, aux loss, expert-selection histograms per block
    and tower, the frozen set, DDAS thresholds, accuracies; one scalar per step at runtime.log_every=1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moecl.train.engine import lr_at
    _, run = tiny_run
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    steps = list(range(1, 9))  # tiny.yaml: 2 tasks x 4 steps, logged after every step
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/aux_loss"):
        assert [e.step for e in events.Scalars(tag)] == steps, tag
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert all(0 < v < float("inf") for v in norms), norms
    # the learning-rate schedule: warmup 1, then cosine within each task, peak 1e-3 (tiny.yaml)
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([lr_at(s, 4, 1e-3, 1) for s in range(4)] * 2)
    assert lrs[:4] == pytest.approx([1e-3, 1e-3, 7.5e-4, 2.5e-4])  # by hand: warmup, then (1 + cos(k pi / 3)) / 2
    sites = [f"experts/{tower}_block{i}" for tower in ("image", "text") for i in range(2)]
    assert sorted(tags["histograms"]) == sorted(sites)
    assert all([e.step for e in events.Histograms(s)] == [0, 1] for s in sites)
    assert [e.step for e in events.Scalars("experts/frozen_total")] == [0, 1]
    frozen = [sum(int(v.sum()) for k, v in _adapters(run / "checkpoints" / f"task-00{t}").items()
                  if k.endswith(".frozen")) for t in (0, 1)]
    assert frozen[0] == 8 and [e.value for e in events.Scalars("experts/frozen_total")] == frozen  # 2 x 4 sites
    assert "experts/frozen/text_summary" in tags["tensors"]
    assert [e.step for e in events.Scalars("ddas/threshold")] == [0, 1]
    for mode in ("oracle", "agnostic"):
        for name in ("shapes", "digits", "colors"):
            assert [e.step for e in events.Scalars(f"accuracy_{mode}/{name}")] == [0, 1], (mode, name)


def test_lr_schedule_matches_a_hand_worked_table():
    """Linear warmup over 2 steps to the peak, then cosine from the peak to 0 over the remaining 8 steps."""
    from moecl.train.engine import lr_at
    table = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 * (1 + math.sqrt(0.5)), 6: 0.5, 8: 0.5 * (1 - math.sqrt(0.5)), 10: 0.0}
    assert {s: lr_at(s, 10, 1.0, 2) for s in table} == pytest.approx(table)
    assert lr_at(3, 4, 1e-3, 0) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 3 / 4)))  # no warmup


def test_task_loss_applies_label_smoothing():
    """Cross-entropy with smoothing eps over C classes: -(1 - eps) log p_y - eps/C sum_c log p_c, by hand."""
    from moecl.train.loop import task_loss
    logits, label, eps = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0]), 0.3
    logp = [x - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)) for x in (2.0, 0.0, -1.0)]
    expected = -(1 - eps) * logp[0] - eps / 3 * sum(logp)
    assert float(task_loss(logits, label, eps)) == pytest.approx(expected, rel=1e-6)
    assert float(task_loss(logits, label, 0.0)) == pytest.approx(-logp[0], rel=1e-6)


def test_grad_clip_accumulation_and_zero_stage_reach_the_deepspeed_config():
    from moecl.config import load_config
    from moecl.train.engine import ds_config
    cfg = load_config("tiny", ["train.grad_clip=0.5", "train.grad_accum=2", "data.batch_size=16", "train.zero_stage=1",
                               "train.ds_config=cpu"])
    ds = ds_config(cfg, 2, torch.device("cpu"))
    assert (ds["gradient_clipping"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"],
            ds["train_batch_size"], ds["zero_optimization"]["stage"]) == (0.5, 2, 4, 16, 1)
