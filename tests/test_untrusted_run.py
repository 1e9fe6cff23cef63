"""Issue 13, the run folder / checkpoint / trainer items: each refusal names its cause, nothing is lost, no
traceback. Real `moecl` processes on the tiny config (a 1-task world where a second task adds nothing)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, build_world, cpu_env, run_train, train_cmd
from moecl.runstate.files import latest_valid, list_checkpoints, verify

ONE = ["train.iterations=4", "train.deterministic=true", "ddas.iterations=10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One task (shapes) + one held-out domain: the cheapest world the whole loop runs on."""
    return build_world(tmp_path_factory.mktemp("w1") / "w", domains="shapes,colors", held_out=1)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run of ONE, for "resumed equals uninterrupted"."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(run, world, *ONE)
    return run


def _moecl(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "moecl", *map(str, args)], env=env or cpu_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _tensors(folder):
    return {**{f"a.{k}": v for k, v in load_file(str(folder / "adapters" / "adapters.safetensors")).items()}}


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- 3. a checkpoint is tied to its backbone -----------------------------------------------------------

def test_checkpoint_from_another_backbone_is_refused_naming_both(reference, world, tmp_path):
    other = _copy_run(reference, tmp_path / "other")  # the same run, but its config now builds another backbone
    cfg = (other / "config.yaml").read_text()
    assert "seed: 0" in cfg
    (other / "config.yaml").write_text(cfg.replace("seed: 0", "seed: 7"))
    proc = _moecl("eval", other, "--checkpoint", reference / "checkpoints" / "task-000")
    assert proc.returncode == 2, proc.stderr[-2000:]
    _no_traceback(proc)
    assert "task-000 was trained on backbone [moecl-tiny, random init, seed 0]" in proc.stderr
    assert "builds backbone [moecl-tiny, random init, seed 7]" in proc.stderr
    meta = json.loads((reference / "checkpoints" / "task-000" / "adapters" / "adapters.json").read_text())
    assert meta["backbone"] == {"name": "moecl-tiny", "init_seed": 0}  # stored in the adapter state itself
    # resuming onto another backbone: refused as well, even when the config change is allowed
    run = _copy_run(reference, tmp_path / "resume")
    proc = run_train(run, world, *ONE, "train.seed=7", "--allow-config-change", resume="auto", check=False)
    assert proc.returncode == 2 and "random init, seed 0" in proc.stderr and "seed 7" in proc.stderr
    _no_traceback(proc)
    assert (run / "config.yaml").read_text() == (reference / "config.yaml").read_text()  # untouched


def test_backbone_identity_hashes_weight_files_not_their_names(tmp_path):
    from moecl.config import load_config
    from moecl.runstate.identity import backbone_identity
    weights = tmp_path / "init.safetensors"
    weights.write_bytes(b"first")
    a = backbone_identity(load_config("tiny", [f"model.init_checkpoint={weights}"]))
    moved = tmp_path / "moved.safetensors"
    shutil.copyfile(weights, moved)
    assert backbone_identity(load_config("tiny", [f"model.init_checkpoint={moved}"])) == a
    time.sleep(0.01)
    weights.write_bytes(b"other")
    b = backbone_identity(load_config("tiny", [f"model.init_checkpoint={weights}"]))
    assert a != b and "init_seed" not in a and a["init_checkpoint"].startswith("sha256:")


# ---- 4. a checkpoint is complete only when its manifest lists every file its kind needs ------------------

def _forge(src, dst, files):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "MANIFEST.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k in files}
    (dst / "MANIFEST.json").write_text(json.dumps(manifest))
    return dst


def test_manifest_listing_too_few_files_is_not_a_checkpoint(reference, tmp_path):
    good = reference / "checkpoints" / "task-000"
    assert verify(good) is None
    empty = _forge(good, tmp_path / "empty", [])
    assert "does not list trainer.json" in verify(empty)
    half = _forge(good, tmp_path / "half", ["trainer.json", "ddas.json", "ddas.safetensors"])
    assert "needs adapters/adapters.safetensors, adapters/adapters.json" in verify(half)
    outside = _forge(good, tmp_path / "outside", ["trainer.json"])
    manifest = json.loads((outside / "MANIFEST.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (outside / "MANIFEST.json").write_text(json.dumps(manifest))
    assert "outside the checkpoint" in verify(outside)
    proc = _moecl("eval", reference, "--checkpoint", empty)
    assert proc.returncode == 2 and "is not a valid checkpoint" in proc.stderr
    assert "does not list trainer.json" in proc.stderr
    _no_traceback(proc)


def test_mid_task_checkpoint_needs_every_ranks_part(tmp_path):
    from moecl.errors import CheckpointError
    from moecl.runstate import files as ckpt
    folder = tmp_path / "step"
    folder.mkdir()
    state = {"progress": {"task": 0, "step": 2}, "task_end": False, "world_size": 2, "method": "full-ft",
             "ddas_tasks": 0}
    (folder / "trainer.json").write_text(json.dumps(state))
    for name in ["backbone.safetensors"] + ckpt.rank_files(0):  # rank 1 never wrote its part
        (folder / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"optimizer-rank1.safetensors.*never appeared"):
        ckpt.wait_for_parts(folder, state, timeout_s=0.5)
    ckpt.write_manifest(folder, {"task_end": False})  # a manifest written anyway is not a checkpoint
    assert "mid-task (2 rank(s)) checkpoint needs optimizer-rank1.safetensors" in verify(folder)
    for name in ckpt.rank_files(1):
        (folder / name).write_bytes(b"x")
    ckpt.wait_for_parts(folder, state, timeout_s=0.5)
    ckpt.write_manifest(folder, {"task_end": False})
    assert verify(folder) is None


# ---- 5. nan_policy=skip leaves the state untouched and stops after too many skips in a row ----------------

@pytest.mark.parametrize("ds", ["cpu", "bf16_zero2"])
def test_skipped_step_leaves_weights_and_optimizer_untouched(world, tmp_path, ds):
    """Step 1's loss is NaN: the checkpoint after it equals the one before it, weights and optimizer state
    (a SIGTERM after step 2 stops the run before the task end prunes the step checkpoints)."""
    run = tmp_path / "run"
    args = ["train.iterations=4", "train.checkpoint_every=1", "train.keep_checkpoints=3", "ddas.iterations=5",
            "train.nan_policy=skip", f"train.ds_config={ds}"]
    proc = subprocess.run(train_cmd(run, world, *args), env=cpu_env(MOECL_FAULT="nan@step:0:1,term@step:0:2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "task 0 (shapes) step 1 skipped: non-finite loss (nan)" in proc.stderr
    before, after, last = (run / "checkpoints" / f"step-000-000000{i}" for i in (1, 2, 3))
    for name in ("adapters/adapters.safetensors", "optimizer-rank0.safetensors"):
        a, b, c = (load_file(str(folder / name)) for folder in (before, after, last))
        assert a.keys() == b.keys()
        changed = [k for k in a if not torch.equal(a[k], b[k])]
        assert not changed, f"{name}: the skipped step changed {changed[:4]}"
        assert any(not torch.equal(b[k], c[k]) for k in b), f"{name}: step 2 (not skipped) changed nothing"
        assert all(torch.isfinite(v.float()).all() for v in c.values())
    assert json.loads((last / "trainer.json").read_text())["progress"]["skipped_steps"] == 1


def test_too_many_skips_in_a_row_stop_naming_task_and_step(world, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, world, "train.lr=1e6", "train.iterations=20", "train.nan_policy=skip",
                     "train.max_consecutive_skips=3", "train.checkpoint_every=1", "ddas.iterations=5", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _no_traceback(proc)
    assert "3 steps in a row skipped for non-finite loss or gradients, the last at task 0 (shapes) step" in proc.stderr
    assert "train.max_consecutive_skips=3" in proc.stderr
    assert proc.stderr.count("skipped: non-finite") >= 3
    for folder in list_checkpoints(run):  # nothing non-finite reached a checkpoint
        assert verify(folder) is None
        assert all(torch.isfinite(v).all() for v in _tensors(folder).values()), folder


# ---- 6. one trainer per run folder; the demo's cache is built by one process at a time -------------------

def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_trainer_is_refused_and_a_stale_lock_is_taken_over(world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": time.time()}))
    first = subprocess.Popen(train_cmd(run, world, *ONE), env=cpu_env(), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                holder = json.loads((run / ".lock").read_text())
                if holder.get("pid") == first.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        else:
            pytest.fail("the first trainer never took the lock")
        first.send_signal(signal.SIGSTOP)  # held still (alive, holding the lock) while the second one tries
        try:
            second = run_train(run, world, *ONE, "train.lr=5e-4", check=False)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2
        _no_traceback(second)
        assert f"is in use by PID {first.pid} on host {socket.gethostname()} (moecl train" in second.stderr
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert f"taking over the lock of PID {dead}" in err
    assert not (run / ".lock").exists()  # released on exit
    assert "lr: 0.001" in (run / "config.yaml").read_text()  # the first run's config, not the refused one's
    assert verify(run / "checkpoints" / "task-000") is None


def test_demo_cache_waits_for_a_build_in_progress_and_reuses_it(tmp_path, capsys):
    from moecl.demo import _world_dir, build_world_cached
    from moecl.folder_lock import FolderLock
    params = dict(domains=["shapes"], image_size=16, train_per_class=2, test_per_class=2, pretrain_per_class=0,
                  seed=0, held_out=0)
    world = _world_dir(tmp_path / "cache", params)
    other = FolderLock(world.parent, "another demo", name=f".{world.name}.lock")
    assert other.try_acquire() is None  # "another demo" is building right now
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("w", build_world_cached(world, params, workers=1,
                                                                                        progress=False)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive()  # waiting, not building beside it
    assert "is being built by PID" in capsys.readouterr().out
    from data_tools.synthetic import build_world
    build_world(world, **params)  # the other demo finishes ...
    waiter.join(timeout=60)
    other.release()
    assert result["w"] == world and not waiter.is_alive()  # ... and its world is reused
    fresh = _world_dir(tmp_path / "cache2", params)
    build_world_cached(fresh, params, workers=1, progress=False)  # alone: staged, renamed, lock released
    assert (fresh / "world.json").is_file() and sorted(p.name for p in fresh.parent.iterdir()) == [fresh.name]


# ---- 7. SIGTERM / Ctrl-C: a checkpoint at the next step boundary, one line, non-zero exit ------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [("term", 143), ("int", 130)])
def test_signal_checkpoints_at_the_next_step_and_resume_matches(world, reference, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = subprocess.run(train_cmd(run, world, *ONE), env=cpu_env(MOECL_FAULT=f"{sig}@step:0:1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    _no_traceback(proc)
    assert "interrupted at task 0 step 2; resume with --resume auto" in proc.stderr
    assert latest_valid(run).name == "step-000-0000002"
    assert not (run / ".lock").exists()
    if sig == "int":
        return
    run_train(run, world, *ONE, resume="auto")
    a, b = _tensors(reference / "checkpoints" / "task-000"), _tensors(run / "checkpoints" / "task-000")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ---- 9. --resume with another config is refused unless the change is intended ------------------------------

def test_resume_with_changed_config_lists_the_differences(reference, world, tmp_path):
    run = _copy_run(reference, tmp_path / "run")
    saved = (run / "config.yaml").read_text()
    proc = run_train(run, world, *ONE, "train.iterations=6", "train.lr=2e-3", resume="auto", check=False)
    assert proc.returncode == 2
    _no_traceback(proc)
    assert "train.iterations: 4 -> 6" in proc.stderr and "train.lr: 0.001 -> 0.002" in proc.stderr
    assert "--allow-config-change" in proc.stderr
    assert (run / "config.yaml").read_text() == saved
    run_train(run, world, *ONE, "train.iterations=6", "--allow-config-change", resume="auto")
    assert "resuming with a changed config (train.iterations: 4 -> 6)" in (run / "train.log").read_text()
    assert (run / "config.before-resume-1.yaml").read_text() == saved


# ---- 12. disk full while writing a checkpoint ---------------------------------------------------------------

FULL_DISK = """
import errno, sys
import safetensors.torch as st
real = st.save_file
def save_file(tensors, filename, metadata=None):
    if ".task-000.tmp" in str(filename):
        with open(filename, "wb") as f:
            f.write(b"\\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))
    return real(tensors, filename, metadata)
st.save_file = save_file
from moecl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_names_the_checkpoint_and_removes_the_staging_folder(world, tmp_path):
    run = tmp_path / "run"
    cmd = train_cmd(run, world, "train.iterations=2", "train.checkpoint_every=1", "ddas.iterations=5")
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, *cmd[3:]], env=cpu_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _no_traceback(proc)
    assert f"disk full while writing checkpoint {run / 'checkpoints' / 'task-000'} (" in proc.stderr
    assert " MB needed" in proc.stderr
    assert not (run / "checkpoints" / ".task-000.tmp").exists()
    assert latest_valid(run).name == "step-000-0000001"  # nothing lost
    assert not (run / ".lock").exists()


# ---- 15. --resume PATH that does not exist -------------------------------------------------------------------

def test_resume_from_a_missing_path_says_so_before_creating_the_run_folder(world, tmp_path):
    run = tmp_path / "never"
    proc = run_train(run, world, resume=str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2
    _no_traceback(proc)
    assert f"--resume {tmp_path / 'nope'}: does not exist" in proc.stderr and "MANIFEST" not in proc.stderr
    assert not run.exists()
