"""Checkpoints hold no pickles: only safetensors and JSON, and a hostile JSON skeleton is refused, never executed."""
import json

import pytest
import torch

from moecl.errors import CheckpointError
from moecl.runstate.files import load_nested, save_nested


def test_run_checkpoints_are_only_safetensors_and_json(tiny_run):
    _, run = tiny_run
    files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}, sorted({p.suffix for p in files})


def test_nested_state_round_trips(tmp_path):
    state = {"step": 3, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}], "dtype": torch.bfloat16,
             "exp_avg": torch.arange(4.0)}
    save_nested(state, tmp_path, "opt")
    back = load_nested(tmp_path, "opt")
    assert back["dtype"] is torch.bfloat16 and back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["exp_avg"], state["exp_avg"])


@pytest.mark.parametrize("hostile,message", [
    ({"__object__": "os.system", "state": {"__dict__": []}}, "outside the allowlist: os.system"),
    ({"__object__": "builtins.eval", "state": {"__dict__": []}}, "outside the allowlist"),
    ({"__dtype__": "load"}, "unknown dtype: 'load'"),  # torch.load is a function, not a dtype
    ({"__dtype__": "__class__"}, "unknown dtype"),
])
def test_hostile_skeleton_raises_the_checkpoint_error(tmp_path, hostile, message):
    save_nested({"x": torch.zeros(1)}, tmp_path, "opt")
    (tmp_path / "opt.json").write_text(json.dumps({"__dict__": [["x", hostile]]}))
    with pytest.raises(CheckpointError, match=message):
        load_nested(tmp_path, "opt")


def test_pruning_keeps_the_newest_mid_task_checkpoints_and_every_task_end(tmp_path):
    """train.keep_checkpoints: mid-task checkpoints beyond the newest K go (ordered by task then step, not by
    name length), task-end checkpoints stay; 0 (what a task end passes) removes every mid-task one."""
    from moecl.runstate.files import list_checkpoints, prune_steps, step_dir_name, task_dir_name
    names = [step_dir_name(0, 2), step_dir_name(0, 10), task_dir_name(0), step_dir_name(1, 3), step_dir_name(1, 12)]
    for name in names:
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == names
    prune_steps(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [task_dir_name(0), step_dir_name(1, 3), step_dir_name(1, 12)]
    prune_steps(tmp_path, 0)
    assert [p.name for p in list_checkpoints(tmp_path)] == [task_dir_name(0)]
