"""`moecl demo --quick` end to end: world, cached pretraining, every method through the real stack, report."""
import json
import logging
import math

import subprocess
import sys

import pytest

from helpers import ROOT, cpu_env


NAMES = ["zero-shot", "continual-ft", "moe-adapters-reference", "moecl"]


def _demo(out, cache) -> subprocess.CompletedProcess:
    """`moecl demo --quick` in its own process: it leaves no process group or environment in the test process."""
    proc = subprocess.run([sys.executable, "-m", "moecl", "demo", "--quick", "--out", str(out), "--cache", str(cache)],
                          env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "run", root / "cache"
    _demo(out, cache)
    return out, cache


def test_demo_restores_the_logging_it_quiets():
    """In process, the demo's console quieting is undone on exit (checked without running the demo)."""
    from moecl.demo import _quiet_console
    import torch
    logger, root, names = logging.getLogger("moecl"), logging.getLogger(), ("DeepSpeed", "deepspeed", "open_clip")
    before = (logger.propagate, list(root.filters), [logging.getLogger(n).level for n in names],
              torch.get_num_threads())
    with _quiet_console():
        assert not logger.propagate and root.filters != before[1]  # quieted inside
        torch.set_num_threads(before[3] + 1)
    assert (logger.propagate, list(root.filters), [logging.getLogger(n).level for n in names],
            torch.get_num_threads()) == before


@pytest.mark.slow  # the quick demo: world, pretraining and three runs
def test_report_has_every_method_with_matrices_and_finite_metrics(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    tasks, held = report["tasks"], report["held_out"]
    assert len(tasks) >= 5 and len(held) >= 1
    assert list(report["methods"]) == NAMES
    for name in NAMES:
        modes = report["methods"][name]
        assert modes, name
        for mode, entry in modes.items():
            matrix = entry["matrix"]
            assert len(matrix) == len(tasks), (name, mode)
            assert all(len(row) == len(tasks) + len(held) for row in matrix), (name, mode)
            assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
            for key in ("transfer", "avg", "last"):
                assert isinstance(entry["metrics"][key], float) and math.isfinite(entry["metrics"][key]), (name, key)
    assert set(report["methods"]["moecl"]) == {"oracle", "agnostic"}
    assert set(report["methods"]["moe-adapters-reference"]) == {"oracle", "agnostic"}
    # one trained model, two routings: the oracle rows are the same, the DDAS settings are recorded
    assert report["methods"]["moecl"]["oracle"]["matrix"] == report["methods"]["moe-adapters-reference"]["oracle"]["matrix"]
    demo = report["demo"]
    assert demo["quick"] is True and len(demo["claims"]) == 5
    assert set(demo["pretrain"]["zero_shot"]) == set(tasks + held)
    runs = report["runs"]
    assert set(runs) == {"zero-shot", "continual-ft", "moe-adapters"}
    assert len(runs["moe-adapters"]["ddas"]) == len(tasks)


@pytest.mark.slow  # the quick demo: world, pretraining and three runs
def test_heatmaps_tensorboard_and_sub_runs_exist(quick_demo):
    out, _ = quick_demo
    plots = {p.name for p in (out / "plots").glob("*.png")}
    for name in NAMES:
        assert any(p.startswith(f"accuracy__{name}__") for p in plots), (name, plots)
    assert "routing__moecl__agnostic.png" in plots
    assert list((out / "tb").glob("events.out.tfevents.*")), "merged TensorBoard log"
    for folder in ("zero-shot", "continual-ft", "moe-adapters"):
        sub = out / "runs" / folder
        assert (sub / "report.json").is_file() and (sub / "config.yaml").is_file()
        assert list((sub / "tb").glob("events.out.tfevents.*")), folder
    assert (out / "report.md").read_text().startswith("# moecl report")


@pytest.mark.slow  # the quick demo: world, pretraining and three runs
def test_second_run_reuses_the_cache_and_finished_sub_runs(quick_demo):
    out, cache = quick_demo
    worlds = list((cache / "worlds").iterdir())
    weights = list((cache / "pretrained").glob("*/model.safetensors"))
    assert len(worlds) == 1 and len(weights) == 1
    stamp = weights[0].stat().st_mtime_ns
    before = json.loads((out / "report.json").read_text())["methods"]
    printed = _demo(out, cache).stdout
    assert "(cached)" in printed and "Summary" in printed
    assert weights[0].stat().st_mtime_ns == stamp
    after = json.loads((out / "report.json").read_text())["methods"]
    assert {k: {m: e["matrix"] for m, e in v.items()} for k, v in after.items()} == \
           {k: {m: e["matrix"] for m, e in v.items()} for k, v in before.items()}


@pytest.mark.slow  # the quick demo: world, pretraining and three runs
def test_pretraining_is_cached_by_its_parameters(quick_demo):
    from moecl.demo import PRETRAIN_QUICK, WORLD_QUICK, _world_dir
    from moecl.pretrain import cache_key, cached_result
    out, cache = quick_demo
    world = _world_dir(cache, WORLD_QUICK)
    hit = cached_result(PRETRAIN_QUICK, world, cache / "pretrained")
    assert hit is not None and hit.weights.is_file() and hit.info["complete"]
    other = PRETRAIN_QUICK.__class__(**{**PRETRAIN_QUICK.__dict__, "steps": PRETRAIN_QUICK.steps + 1})
    assert cache_key(other, world) != cache_key(PRETRAIN_QUICK, world)
    assert cached_result(other, world, cache / "pretrained") is None
    info = json.loads((hit.weights.parent / "pretrain.json").read_text())
    assert info["params"] == PRETRAIN_QUICK.as_dict() and info["loss_curve"]
    assert all(math.isfinite(v) for v in info["zero_shot"].values())


def test_reference_setting_gets_the_fixed_threshold():
    """The reference selector carries the one fixed threshold on every task, the calibrated one is untouched."""
    import torch

    from moecl.ddas import DDASSelector
    from moecl.ddas.autoencoder import TaskAutoencoder
    from moecl.evaluation import loading
    sel = DDASSelector()
    for t in range(3):
        sel.add_task(TaskAutoencoder(4, 2, generator=torch.Generator().manual_seed(t)), 0.001 * (t + 1))
    fixed = loading.fixed_threshold(sel, 0.25)
    assert fixed.thresholds.tolist() == [0.25, 0.25, 0.25]
    assert sel.thresholds.tolist() == pytest.approx([0.001, 0.002, 0.003])


def test_demo_never_deletes_a_sub_run_another_process_is_writing(tmp_path):
    """A sub-run of another configuration is replaced, but not while a live process holds its lock."""
    import subprocess
    import sys

    from moecl.config import load_config
    from moecl.demo import _prepare_run_dir
    from moecl.folder_lock import FolderBusy, FolderLock
    cfg = load_config("tiny")
    run = tmp_path / "sub"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: other}\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(
            f'{{"pid": {holder.pid}, "host": "{__import__("socket").gethostname()}", "what": "moecl train"}}')
        with pytest.raises(FolderBusy, match=f"PID {holder.pid}"):
            _prepare_run_dir(run, cfg)
        assert (run / "config.yaml").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert FolderLock(run, "x").holder() is None  # its holder is gone: the stale lock no longer protects it
    assert _prepare_run_dir(run, cfg) is None and not run.exists()
