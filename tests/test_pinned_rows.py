"""Accuracy matrices (CIL: accuracies) and routing confusions of small runs, pinned as the code before issue 14's
restructuring made them (tests/data/pinned_matrices.json): moving evaluation, run state and method behaviour into
one place each changed no number. Recorded on CPU; a torch or CPU change that moves float results may need a new
recording (run the commands below with the code you trust and copy their report.json's figures)."""
import json

import pytest

from helpers import ROOT, run_train

PINNED = json.loads((ROOT / "tests" / "data" / "pinned_matrices.json").read_text())
KEYS = ("matrix", "accuracies", "routing_confusion")
RUNS = {  # from the demo's pretrained moecl-tiny: the adapters (or the backbone) change the numbers
    "moe_mtil": ["train.iterations=30", "train.lr=2e-2", "eval.reference_ddas=true"],
    "full_ft": ["train.method=full-ft", "train.iterations=10", "train.lr=1e-3"],
    "moe_cil": ["eval.cil=true", "ddas.decision=batch", "train.iterations=30", "train.lr=2e-2"],
}


def figures(run) -> dict:
    report = json.loads((run / "report.json").read_text())
    return {m: {mode: {k: e[k] for k in KEYS if k in e} for mode, e in modes.items()}
            for m, modes in report["methods"].items()}


def test_tiny_run_unchanged(tiny_run):
    """`moecl train --config tiny` on the tiny world (conftest's tiny_run)."""
    assert figures(tiny_run[1]) == PINNED["tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_pretrained_tiny_runs_unchanged(name, world, pretrained_tiny, tmp_path):
    run = tmp_path / "run"
    run_train(run, world, f"model.init_checkpoint={pretrained_tiny}", *RUNS[name])
    assert figures(run) == PINNED[name]
