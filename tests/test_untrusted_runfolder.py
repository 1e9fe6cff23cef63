"""A run folder handed over by someone else chooses nothing that could run a command."""
import pytest
import yaml

from moecl.config import load_config


def _run_folder(tmp_path, template):
    cfg = load_config("tiny", [f"data.shard_url_template={template}"] if template else [])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_url_template_in_a_run_folder_config_is_ignored(tmp_path, caplog):
    from moecl.evaluation.loading import run_config
    run = _run_folder(tmp_path, "pipe:touch {root}/PWNED; cat {root}/{task}/{shard}")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["shard_url_template"].startswith("pipe:")
    with caplog.at_level("WARNING", logger="moecl"):
        cfg = run_config(run)
    assert cfg.data.shard_url_template is None
    assert "data.shard_url_template" in caplog.text and "ignored" in caplog.text


def test_url_template_on_the_command_line_is_honoured(tmp_path):
    from moecl.evaluation.loading import run_config
    run = _run_folder(tmp_path, None)
    cfg = run_config(run, ["data.shard_url_template=/mnt/{task}/{split}-{shard}"])
    assert cfg.data.shard_url_template == "/mnt/{task}/{split}-{shard}"
