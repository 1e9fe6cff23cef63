"""`moecl eval` / `moecl report` and load_run on a real tiny run: re-evaluation reproduces the trainer's rows."""
import json
import shutil

import pytest
import torch
import yaml

from moecl.cli import main
from moecl.errors import CheckpointError
from moecl.evaluation.cli import evaluate_run
from moecl.evaluation.loading import load_run


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run


def _report(run):
    return json.loads((run / "report.json").read_text())


def test_load_run_is_single_process_and_eval_mode(tiny):
    _, run = tiny
    before = torch.distributed.is_initialized()  # (an in-process demo test may have made a world of one)
    loaded = load_run(run, device="cpu")
    assert torch.distributed.is_initialized() == before, "load_run must not start torch.distributed"
    assert loaded.checkpoint.name == "task-001" and loaded.num_trained_tasks == 2
    assert not loaded.model.training and loaded.model.num_tasks == 2
    assert loaded.selector is not None and loaded.selector.num_tasks == 2
    assert loaded.sequence.task_names == ["shapes", "digits"] and loaded.trained_task_names == ["shapes", "digits"]
    assert [m.name for m in loaded.eval_modes()] == ["oracle", "agnostic"]
    assert loaded.route_of("digits") == 1 and loaded.route_of("colors", held_out=True) == -1
    # an older checkpoint by name: one trained task, the other task's column is zero-shot
    first = load_run(run, "task-000", device="cpu")
    assert first.num_trained_tasks == 1 and first.route_of("digits") == -1 and first.selector.num_tasks == 1


def test_eval_reproduces_the_trainers_last_row(tiny):
    _, run = tiny
    results, written = evaluate_run(run, device="cpu")
    report = _report(run)
    for mode in ("oracle", "agnostic"):
        entry = report["methods"]["moecl"][mode]
        assert results["modes"][mode]["row"] == entry["matrix"][-1], mode
        assert results["modes"][mode]["routing_confusion"] == entry["routing_confusion"], mode
    doc = json.loads(written["results"].read_text())
    assert written["results"] == run / "eval" / "task-001" / "results.json"
    assert doc["columns"] == ["shapes", "digits", "colors"] and doc["held_out"] == ["colors"]
    assert doc["num_trained_tasks"] == 2 and doc["method"] == "moecl"
    bench = sorted(p.name for p in (run / "eval" / "task-001" / "clip_benchmark").glob("*.json"))
    assert bench == sorted(f"moecl__{m}__{d}.json" for m in ("oracle", "agnostic") for d in ("shapes", "digits", "colors"))
    rec = json.loads((run / "eval" / "task-001" / "clip_benchmark" / "moecl__oracle__digits.json").read_text())
    assert rec["task"] == "zeroshot_classification" and rec["dataset"] == "digits"
    assert rec["metrics"]["acc1"] == pytest.approx(results["modes"]["oracle"]["accuracy"]["digits"] / 100)


def test_eval_of_an_older_checkpoint_reproduces_its_row(tiny):
    _, run = tiny
    results, _ = evaluate_run(run, checkpoint="task-000", device="cpu", overrides=["eval.modes=[oracle]"])
    assert list(results["modes"]) == ["oracle"]
    assert results["modes"]["oracle"]["row"] == _report(run)["methods"]["moecl"]["oracle"]["matrix"][0]


def test_eval_on_another_sequence_routes_by_task_name(tiny, tmp_path):
    world, run = tiny
    seq = tmp_path / "other.yaml"  # digits only, shapes as a held-out set: digits keeps router 1
    seq.write_text(yaml.safe_dump({"name": "other", "kind": "mtil", "tasks": ["digits"], "held_out": ["shapes"]}))
    results, written = evaluate_run(run, data_root=str(world), sequence=str(seq), device="cpu",
                                    overrides=["eval.modes=[oracle]"])
    last = _report(run)["methods"]["moecl"]["oracle"]["matrix"][-1]
    assert results["columns"] == ["digits", "shapes"]
    assert results["modes"]["oracle"]["accuracy"]["digits"] == last[1]
    assert results["modes"]["oracle"]["routing"] == {"digits": {"digits": 80}, "shapes": {"zero-shot": 64}}
    assert written["results"].parent.name == f"task-001__other__{world.name}"


def test_eval_with_ep_size_2_config_loads_at_ep_size_1(tiny, tmp_path):
    _, run = tiny
    copy = tmp_path / "run-ep2"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "tb"))
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["moe"]["ep_size"] = 2  # as if trained on 2 expert-parallel ranks: adapter state is ep-size independent
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_run(copy, device="cpu")
    assert all(site.ep_size == 1 for site in loaded.model.moe_sites())
    results, _ = evaluate_run(copy, device="cpu", overrides=["eval.modes=[oracle]"])
    assert results["modes"]["oracle"]["row"] == _report(run)["methods"]["moecl"]["oracle"]["matrix"][-1]


def test_broken_checkpoints_are_named(tiny, tmp_path):
    _, run = tiny
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "tb"))
    bad = copy / "checkpoints" / "task-001" / "adapters" / "adapters.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert load_run(copy, device="cpu").checkpoint.name == "task-000"  # the latest VALID one
    with pytest.raises(CheckpointError, match="task-001.*checksum"):
        load_run(copy, "task-001", device="cpu")
    shutil.rmtree(copy / "checkpoints" / "task-000")
    with pytest.raises(CheckpointError, match="checkpoints"):
        load_run(copy, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(copy, "task-009", device="cpu")


def test_cli_eval_report_and_override_errors(tiny, capsys):
    _, run = tiny
    assert main(["eval", str(run), "eval.modes=[agnostic]", "ddas.decision=batch", "--checkpoint", "task-001"]) == 0
    out = capsys.readouterr().out
    assert "agnostic" in out and "routing [agnostic]" in out and "results.json" in out
    doc = json.loads((run / "eval" / "task-001" / "results.json").read_text())
    assert doc["modes"]["agnostic"]["decision"] == "batch" and doc["overrides"][-1] == "ddas.decision=batch"
    bench = run / "eval" / "task-001" / "clip_benchmark"
    assert {p.name.split("__")[1] for p in bench.glob("*.json")} == {"agnostic"}  # no stale files of other modes
    assert main(["eval", str(run), "model.name=ViT-B-16"]) == 2
    assert "only eval.* and ddas.*" in capsys.readouterr().err
    assert main(["eval", str(run), "eval.bogus=1"]) == 2
    assert "eval.bogus" in capsys.readouterr().err
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "moecl (oracle)" in out and str(run / "report.md") in out and (run / "report.md").is_file()
    assert main(["report", str(run / "nope")]) == 2
