"""The performance harness is a package that runs the library as it is: ``python -m benchmarks.NAME`` from the
repository root, no ``sys.path`` edits, no copy of model code."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_is_a_package_without_path_edits_or_model_copies():
    files = sorted((ROOT / "benchmarks").glob("*.py"))
    assert (ROOT / "benchmarks" / "__init__.py") in files
    for f in files:
        text = f.read_text()
        assert "sys.path" not in text, f"{f.name} edits sys.path"
        assert "class GatheredExperts" not in text and "def _trimmed_encode_text" not in text, f.name
    assert not (ROOT / "benchmarks" / "prototypes.py").exists()
    for script in ("run_cpu.sh", "run_gpu.sh"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert not re.search(r"benchmarks/\w+\.py", text), f"{script} runs a file, not a module"
        assert "-m benchmarks.train_step" in text


@pytest.mark.slow  # one subprocess building two small models
def test_step_ops_runs_as_a_module_and_finds_no_host_sync_in_moecls_step(tmp_path):
    out = tmp_path / "ops.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_ops", "--threads", "1", "--device", "cpu",
                           "--model", "moecl-tiny", "--batch", "4", "--classes", "3", "--steps", "1",
                           "--variants", "moecl,floor,reference", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    res = record["results"]
    assert res["moecl"]["syncs"] == 0 and res["floor"]["syncs"] == 0
    assert res["reference"]["syncs"] > 0  # the published path reads part sizes on the host: the counter sees it
    assert res["moecl"]["kernel_ops"] > res["floor"]["kernel_ops"] > 0


def test_checkpointing_variants_train_the_same_gradients():
    """The memory comparison's variants compute what moecl computes: torch's checkpointing (the model's own)
    and fairscale's wrapper give the gradients of no checkpointing, gate noise included."""
    import torch
    import torch.nn.functional as F
    from benchmarks import common, train_step
    p = common.base_parser("test", batch=4, classes=3)
    train_step.add_flags(p)
    args = p.parse_args(["--device", "cpu", "--model", "moecl-tiny", "--experts", "4"])
    existed = torch.distributed.is_initialized()
    try:
        _checkpointing_variants(args, common, train_step, common.setup(args))
    finally:  # common.setup makes a world of one: end it, or later in-process tests see a process group
        if not existed:
            from moecl.runtime import close_distributed
            close_distributed()
        assert not torch.distributed.is_initialized() or existed


def _checkpointing_variants(args, common, train_step, ctx):
    import torch
    import torch.nn.functional as F
    grads = {}
    for name in ("moecl", "moecl+ckpt", "moecl+fsckpt"):
        torch.manual_seed(0)
        model, params, _ = train_step.make_variant(name, args, ctx)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        images, tokens, labels = common.make_inputs(args, ctx, model)
        common.nonzero_adapters(model, 0)
        model.train()
        torch.manual_seed(1)
        F.cross_entropy(model(images, train_step.prompts_for(model, tokens), 0), labels).backward()
        grads[name] = [q.grad.clone() for q in params]
        assert all(g is not None for g in grads[name])
    assert any(float(g.abs().max()) > 0 for g in grads["moecl"])
    for name in ("moecl+ckpt", "moecl+fsckpt"):
        for a, b in zip(grads["moecl"], grads[name]):
            assert torch.allclose(a, b, atol=1e-7, rtol=0), name


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script,part", [("run_gpu.sh", "all"), ("run_gpu.sh", "quick"), ("run_cpu.sh", "all")])
def test_every_command_of_the_run_scripts_parses(script, part, monkeypatch):
    """The GPU script cannot run here: each of its commands (and the CPU script's) is printed with ``DRY=1`` and
    parsed by its own module's argument parser, so a renamed or mistyped flag fails here and not on a GPU lease."""
    import argparse
    import importlib
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / script), part], env={**os.environ, "DRY": "1"},
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line[2:].split() for line in out.stderr.splitlines() if line.startswith("+ ")]
    assert len(commands) >= 5
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed()

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    for argv in commands:
        module = argv[argv.index("-m") + 1]
        assert module.startswith("benchmarks."), argv
        monkeypatch.setattr(sys, "argv", [module] + argv[argv.index("-m") + 2:])
        try:
            importlib.import_module(module).main()
        except _Parsed:
            continue
        except SystemExit as e:
            pytest.fail(f"{script}: `{' '.join(argv)}` does not parse (exit {e.code})")
        pytest.fail(f"{script}: `{' '.join(argv)}` ran without parsing its arguments")
