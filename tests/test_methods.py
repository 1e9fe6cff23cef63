"""The method table (moecl/methods.py): one record per train.method, the rules the trainer, eval and predict share."""
import pytest

from moecl.config import TrainConfig
from moecl.methods import METHODS, NAMES, get_method, report_name
from moecl.routes import ZERO_SHOT


def test_config_accepts_exactly_the_table():
    for name in NAMES:
        assert TrainConfig(method=name).method == name
    with pytest.raises(ValueError):
        TrainConfig(method="lora")
    with pytest.raises(ValueError, match="known: moe-adapters"):
        get_method("lora")


def test_oracle_routes():
    trained = ["shapes", "digits"]
    moe, dense, ft, zs = (METHODS[n] for n in ("moe-adapters", "dense-adapter", "full-ft", "zero-shot"))
    assert [moe.oracle_route(n, trained) for n in ("shapes", "digits", "colors")] == [0, 1, ZERO_SHOT]
    assert moe.oracle_route("shapes", trained, held_out=True) == ZERO_SHOT
    assert moe.oracle_route("shapes", []) == ZERO_SHOT
    assert [dense.oracle_route(n, trained) for n in ("shapes", "colors")] == [0, 0]
    assert dense.oracle_route("shapes", []) == ZERO_SHOT and dense.default_route(0) == ZERO_SHOT
    assert dense.default_route(2) == 0 and moe.default_route(2) == ZERO_SHOT
    assert ft.oracle_route("shapes", trained) == zs.oracle_route("shapes", trained) == ZERO_SHOT


def test_behaviour_records():
    moe, dense, ft, zs = (METHODS[n] for n in ("moe-adapters", "dense-adapter", "full-ft", "zero-shot"))
    assert [m.train_route(3) for m in (moe, dense, ft)] == [3, 0, ZERO_SHOT]
    assert [m.weights_file for m in (moe, dense, ft, zs)] == ["adapters", "adapters", "backbone", None]
    assert [m.ddas for m in (moe, dense, ft, zs)] == [True, False, False, False]
    assert not zs.trains_anything and not ft.zero_shot_is_frozen
    assert [report_name(n) for n in NAMES] == ["moecl", "dense-adapter", "continual-ft", "zero-shot"]
    assert report_name("someone-else") == "someone-else"
    assert ft.route_name(ZERO_SHOT, []) == "fine-tuned" and moe.route_name(ZERO_SHOT, []) == "zero-shot"
    assert moe.route_name(1, ["a", "b"]) == "b" and dense.route_name(0, ["a"]) == "adapter"
    assert ft.route_name(0, ["a"]) == "a" and moe.route_name(5, ["a"]) == "task 5"
