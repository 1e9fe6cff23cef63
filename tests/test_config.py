"""Config loading, overrides, and every error message the foundation promises."""
import pytest

from moecl.config import Config, ConfigError, load_config, parse_overrides, shipped_configs


def test_every_shipped_config_loads():
    names = shipped_configs()
    assert {"tiny", "demo", "mtil_order1", "mtil_order2", "mtil_fewshot", "cil_cifar100_10"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)


def test_published_hyperparameters_in_mtil_order1():
    cfg = load_config("mtil_order1")
    assert cfg.moe.num_experts == 22 and cfg.moe.top_k == 2 and cfg.moe.width == 64
    order_i = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
               "StanfordCars", "SUN397"]
    assert [cfg.per_task("lr", t, order_i) for t in range(11)] == \
        [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]
    assert cfg.train.iterations == 1000 and cfg.train.warmup == 100 and cfg.train.label_smoothing == 0.2
    assert cfg.data.batch_size == 64 and cfg.moe.aux_loss_weight == 0.0 and not cfg.moe.drop_tokens


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["moe.num_experts=6", "train.lr=[1e-3, 2e-3]", "runtime.device=cpu",
                               "model.pretrained=/tmp/w.pt", "data.train_crop_scale=[0.5, 1.0]"])
    assert cfg.moe.num_experts == 6
    assert cfg.train.lr == [1e-3, 2e-3]
    assert cfg.runtime.device == "cpu"
    assert cfg.model.pretrained == "/tmp/w.pt"
    assert cfg.data.train_crop_scale == (0.5, 1.0)
    assert cfg.per_task("lr", 1, 2) == 2e-3


def test_config_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("moe: {num_experts: 3, top_k: 1}\n")
    assert load_config(p).moe.num_experts == 3


@pytest.mark.parametrize("override, expected", [
    ("moe.num_expert=3", "unknown key 'moe.num_expert' in override 'moe.num_expert=3'; did you mean 'moe.num_experts'?"),
    ("trian.lr=1", "did you mean 'train.lr'?"),
    ("moe.num_experts=abc", "moe.num_experts: got 'abc', expected an integer"),
    ("runtime.device=tpu", "runtime.device: got 'tpu', expected one of 'auto', 'cpu' or 'cuda'"),
    ("moe.top_k=30", "moe.top_k=30 exceeds moe.num_experts=22"),
    ("moe.ep_size=5", "moe.ep_size=5 does not divide moe.num_experts=22"),
    ("ddas.enabled=maybe", "ddas.enabled: got 'maybe', expected true or false"),
    ("noequals", "is not of the form section.field=value"),
])
def test_override_errors_name_the_problem(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("tiny" if "top_k" not in override and "ep_size" not in override else None, [override])
    assert expected in str(e.value)


def test_unknown_key_in_yaml_names_file_and_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("moe:\n  num_experst: 4\ntrain:\n  lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "unknown key 'moe.num_experst'; did you mean 'moe.num_experts'?" in msg
    assert "train.lr: got 'fast', expected a number" in msg


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="no shipped config named 'mtil_order3'; did you mean 'mtil_order"):
        load_config("mtil_order3")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_per_task_list_too_short():
    cfg = load_config("tiny", ["train.lr=[1e-3]"])
    with pytest.raises(ConfigError, match="train.lr lists 1 values but the sequence has 3 tasks"):
        cfg.per_task("lr", 2, 3)


def test_per_task_mapping_by_task_name():
    from moecl.config import check_per_task
    cfg = load_config("tiny", ["train.lr={digits: 2e-3, shapes: 1e-3}"])
    assert [cfg.per_task("lr", t, ["shapes", "digits"]) for t in (0, 1)] == [1e-3, 2e-3]
    check_per_task(cfg, ["shapes", "digits"])
    with pytest.raises(ConfigError, match="train.lr has no value for task 'colors'"):
        check_per_task(cfg, ["shapes", "digits", "colors"])
    with pytest.raises(ConfigError, match="train.lr names 'digits', not a training task of the sequence"):
        check_per_task(cfg, ["shapes"])


def test_yaml_round_trip():
    cfg = load_config("mtil_order2", ["moe.ep_size=2"])
    import yaml
    again = Config.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_parse_overrides_yaml_values():
    assert parse_overrides(["train.deterministic=true", "eval.max_samples=null"]) == {
        "train": {"deterministic": True}, "eval": {"max_samples": None}}
