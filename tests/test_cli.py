"""The command line: --help everywhere, `moecl configs`, and the README/CI agreement."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moecl.cli import build_parser, main

SUBCOMMANDS = ["train", "eval", "report", "predict", "demo", "configs"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert f"usage: moecl {sub}" in capsys.readouterr().out


def test_configs_lists_shipped(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mtil_order1\s+MTIL order I", out, re.M)
    assert re.search(r"^tiny\s+", out, re.M)


def test_console_script_installed():
    """The `moecl` entry point pip installed (not `python -m moecl`), in a clean environment."""
    from helpers import cpu_env
    script = Path(sys.executable).parent / "moecl"
    env = {k: v for k, v in cpu_env().items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([str(script), "configs"], capture_output=True, text=True, check=True, env=env)
    assert "mtil_order2" in out.stdout


def test_console_script_trains_without_ds_accelerator_set(tiny_run):
    """conftest's tiny_run is `moecl train` through the console script with DS_ACCELERATOR removed from the
    environment: moecl set DeepSpeed's CPU accelerator itself, and the run finished on the CPU."""
    _, run = tiny_run
    log = (run / "train.log").read_text()
    assert "1 rank(s) on cpu" in log and "task 1 done" in log
    assert (run / "checkpoints" / "task-001" / "MANIFEST.json").is_file()


def test_bad_config_is_a_message_not_a_traceback(tmp_path, capsys):
    rc = main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "moe.num_expert=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "did you mean 'moe.num_experts'" in err and "Traceback" not in err


def test_parser_accepts_documented_forms():
    p = build_parser()
    a = p.parse_args(["train", "--config", "tiny", "--out", "r", "moe.num_experts=4", "--resume", "auto"])
    assert a.overrides == ["moe.num_experts=4"] and a.resume == "auto"
    a = p.parse_args(["predict", "r", "--images", "a.png", "b.png", "--labels", "cat,dog"])
    assert a.images == ["a.png", "b.png"]


def test_overrides_may_follow_options(tmp_path, capsys):
    rc = main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--resume", "auto", "moe.num_expert=3"])
    assert rc == 2 and "did you mean 'moe.num_experts'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "RUN", "--checkpoint", "x", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
