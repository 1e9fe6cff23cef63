"""Issue 13, items 10, 13, 14: configs and CLI output a user can act on.

Bad numbers and bad config files are refused with the key or file named, before the run folder exists; YAML
alias bombs and duplicate keys are refused cheaply; read-only runs are evaluated and reported elsewhere with
``--out``; ``moecl predict`` skips and lists unreadable images, validates ``--top`` and escapes CSV cells.
"""
import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import typing
from pathlib import Path

import pytest

from helpers import ROOT, build_world, cpu_env, train_cmd
from moecl.cli import main
from moecl.config import Config, ConfigError, load_config, valid_keys
from moecl.errors import DataError


def _refused(capsys, argv, *expected):
    """``moecl ARGV`` (in process) exits 2 with a one-line-per-cause message holding every ``expected``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


# ---------------------------------------------------------------------------------------------------------
# Item 10: config values

@pytest.mark.parametrize("override, expected", [
    ("train.lr=.nan", "train.lr: got nan, expected a finite number"),
    ("train.lr=[1e-3, -1]", "train.lr[1]: got -1, expected a value > 0"),
    ("train.betas=[2,5]", "train.betas[0]: got 2, expected a value < 1"),
    ("train.iterations=0", "train.iterations: got 0, expected a value >= 1"),
    ("train.iterations=-3", "train.iterations: got -3, expected a value >= 1"),
    ("train.iterations=[]", "train.iterations: got [], expected at least 1 item"),
    ("moe.freeze_top=5", "moe.freeze_top=5 exceeds moe.num_experts=4"),
    ("train.grad_clip=.inf", "train.grad_clip: got inf, expected a finite number"),
    ("eval.modes=[]", "eval.modes: got [], expected at least 1 item"),
    ("eval.modes=[oracle, oracle]", "eval.modes=['oracle', 'oracle'] names a mode twice"),
    ("train.seed=-1", "train.seed: got -1, expected a value >= 0"),
    ("train.epochs=0", "train.epochs: got 0, expected a value > 0"),
    ("data.train_crop_scale=[1.0, 0.5]", "data.train_crop_scale=[1.0, 0.5]: the first value"),
    ("moe.scale=-.inf", "moe.scale: got -inf, expected a finite number"),
    ("train.lr=true", "train.lr: got true, expected a number"),  # pydantic alone would train at lr 1.0
])
def test_bad_numbers_are_refused_by_key_before_the_run_folder(tmp_path, capsys, override, expected):
    run = tmp_path / "run"
    _refused(capsys, ["train", "--config", "tiny", "--out", str(run), override], expected)
    assert not run.exists(), "the run folder must not be created for a refused config"


def _numeric_leaves(annotation) -> set:
    """The scalar types (int / float) a field annotation can hold, through Optional, Union, list, tuple."""
    if annotation in (int, float):
        return {annotation}
    found = set()
    for arg in typing.get_args(annotation):
        found |= _numeric_leaves(arg)
    return found


def _numeric_fields():
    for section, sfield in Config.model_fields.items():
        for name, field in sfield.annotation.model_fields.items():
            kinds = _numeric_leaves(field.annotation)
            if kinds:
                yield f"{section}.{name}", field, kinds


def test_every_numeric_field_refuses_nan_and_negatives():
    """Walk every numeric config field: nan/inf is refused for every float, -1 for every number (no field of
    moecl means anything below zero) and a boolean for every number, each error naming the key."""
    fields = list(_numeric_fields())
    assert len(fields) > 30  # the walk really found the config's numbers
    for key, field, kinds in fields:
        default = field.get_default(call_default_factory=True)
        bad = ([".nan", ".inf", "-.inf"] if float in kinds else []) + ["-1", "true"]
        for value in bad:
            raw = f"[{value}, {value}]" if isinstance(default, tuple) else value
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"{key}={raw}"])
            leaf = key.rsplit(".", 1)[-1]
            assert leaf in str(e.value), (key, value, str(e.value))


def test_valid_configs_still_load():
    """The bounds refuse nothing a real config uses: every shipped config and the documented forms load."""
    cfg = load_config("tiny", ["train.lr=[1e-3, 5e-4]", "train.iterations=[3, 1]", "train.betas=[0.0, 0.999]",
                               "moe.freeze_top=4", "eval.modes=[agnostic]", "train.grad_clip=1.0",
                               "data.train_crop_scale=[1.0, 1.0]", "train.epochs=0.5"])
    assert cfg.train.iterations == [3, 1] and cfg.moe.freeze_top == 4 and cfg.eval.modes == ["agnostic"]
    assert set(valid_keys()) >= {"train.lr", "moe.freeze_top"}


# ---------------------------------------------------------------------------------------------------------
# Item 10: config files

def _alias_bomb(levels: int = 8, fan: int = 9) -> str:
    """The billion-laughs document: each level lists the previous one ``fan`` times (fan**levels values)."""
    lines = ["l0: &l0 [" + ", ".join(['"lol"'] * fan) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())  # 9**8 = 43 million values once expanded
    tic = time.perf_counter()
    _refused(capsys, ["train", "--config", str(bomb), "--out", str(tmp_path / "run")],
             f"config file {bomb} refused", "aliases", "expand to more than")
    assert time.perf_counter() - tic < 2.0, "the refusal must come from counting, not from expanding"
    assert not (tmp_path / "run").exists()
    # on the command line too
    tic = time.perf_counter()
    with pytest.raises(ConfigError, match=r"override 'train\.lr=.*' refused: .*aliases"):
        load_config("tiny", ["train.lr=" + _alias_bomb().replace("\n", ", ").join("{}")])
    assert time.perf_counter() - tic < 2.0


def test_small_aliases_are_still_fine(tmp_path):
    p = tmp_path / "anchors.yaml"
    p.write_text("train: {lr: &lr 0.01, iterations: 3}\nddas: {lr: *lr}\n")
    assert load_config(p).ddas.lr == 0.01


@pytest.mark.parametrize("name, content, expected", [
    ("dup.yaml", "train:\n  lr: 0.1\n  iterations: 3\n  lr: 0.2\n", "duplicate key 'lr' at line 4 (first at line 2)"),
    ("dup-section.yaml", "moe: {width: 4}\ntrain: {lr: 0.1}\nmoe: {width: 8}\n", "duplicate key 'moe' at line 3"),
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is binary, not YAML text"),
    ("empty.yaml", "", "is empty"),
    ("comments.yaml", "# only a comment\n", "is empty"),
    ("recursive.yaml", "a: &a [*a]\n", "recursive alias at line 1"),
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping of sections"),
])
def test_bad_config_files_are_named(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _refused(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "run")], str(path), expected)
    assert not (tmp_path / "run").exists()


def test_directory_and_fifo_as_config_are_named(tmp_path, capsys):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    _refused(capsys, ["train", "--config", str(folder), "--out", str(tmp_path / "run")],
             f"config path {folder} is a directory")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    _refused(capsys, ["train", "--config", str(fifo), "--out", str(tmp_path / "run")],
             f"config path {fifo} is not a regular file")
    assert not (tmp_path / "run").exists()


def test_shard_url_template_placeholders_are_checked(tmp_path, monkeypatch):
    from moecl.data.task import URL_TEMPLATE_ENV, read_task
    task = tmp_path / "t"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({
        "name": "t", "classnames": ["a", "b"], "templates": {"train": "a {}.", "eval": ["a {}."]},
        "counts": {"train": 2}, "shards": {"train": ["train-000000.tar"]}}))
    monkeypatch.setenv(URL_TEMPLATE_ENV, "s3://bucket/{dataset}/{shard}")
    with pytest.raises(DataError) as e:
        read_task(task)
    msg = str(e.value)
    assert "MOECL_SHARD_URL_TEMPLATE='s3://bucket/{dataset}/{shard}'" in msg and "{dataset}" in msg
    assert all(p in msg.split("placeholders")[-1] for p in ("{task}", "{split}", "{shard}", "{root}"))
    monkeypatch.setenv(URL_TEMPLATE_ENV, "s3://bucket/{task}/{shard")
    with pytest.raises(DataError, match="MOECL_SHARD_URL_TEMPLATE=.*not a valid template"):
        read_task(task)
    monkeypatch.setenv(URL_TEMPLATE_ENV, "s3://bucket/{task}/{split}/{shard}")
    assert read_task(task).urls("train") == ["s3://bucket/t/train/train-000000.tar"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """Two tasks of 4 images per class (32 and 40 train images)."""
    return build_world(tmp_path_factory.mktemp("untrusted") / "w", domains="shapes,digits", held_out=0,
                       train=4, test=2)


def _train(run: Path, world: Path, *overrides: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(run, world, *overrides), env=cpu_env(**env), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_batch_larger_than_a_task_is_refused_before_training(small_world, tmp_path):
    run = tmp_path / "run"
    proc = _train(run, small_world, "data.batch_size=36")  # shapes has 32 train images, digits 40
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "data.batch_size=36 is larger than the train split of task 'shapes' (32 images" in proc.stderr
    assert str(small_world / "shapes" / "task.json") in proc.stderr
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@pytest.mark.slow
def test_bad_url_template_from_the_environment_is_named_by_the_cli(small_world, tmp_path):
    proc = _train(tmp_path / "run", small_world, MOECL_SHARD_URL_TEMPLATE="{root}/{task}/{sahrd}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "MOECL_SHARD_URL_TEMPLATE='{root}/{task}/{sahrd}' has unknown placeholder(s) {sahrd}" in proc.stderr
    assert "{root}, {task}, {split}, {shard}" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Item 13: read-only and archived runs

def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: nothing for a normal user; for root, setpriv
    dropping the capabilities that bypass them (root would otherwise write into a read-only folder)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    if shutil.which("setpriv") is None or subprocess.run(prefix + ["true"], capture_output=True).returncode:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return prefix


def _read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def _moecl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_unprivileged() + [sys.executable, "-m", "moecl", *args], env=cpu_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run  # the session's shared (world, run); tests copy before changing it


@pytest.fixture
def archived_run(tiny, tmp_path):
    """A copy of the tiny run, read-only (an archived or shared run folder)."""
    run = tmp_path / "archived"
    shutil.copytree(tiny[1], run)
    _read_only(run)
    yield run
    _writable(run)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_eval_of_a_read_only_run_prints_the_table_and_writes_to_out(archived_run, tmp_path, capsys):
    before = _tree(archived_run)
    proc = _moecl("eval", str(archived_run))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "mode \\ test set" in proc.stdout and "oracle" in proc.stdout, "the table comes before the write"
    assert f"cannot write to {archived_run / 'eval' / 'task-001'}" in proc.stderr
    assert "is read-only" in proc.stderr and "--out DIR" in proc.stderr
    out = tmp_path / "elsewhere"  # (in process: writing elsewhere needs no dropped privileges)
    assert main(["eval", str(archived_run), "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["run"] == str(archived_run) and set(doc["modes"]) == {"oracle", "agnostic"}
    assert list((out / "clip_benchmark").glob("*.json"))
    assert f"wrote {out / 'results.json'}" in capsys.readouterr().out
    assert _tree(archived_run) == before, "the archived run folder must not change"


@pytest.mark.slow
def test_report_of_a_read_only_run_says_so(archived_run, tmp_path, capsys):
    before = _tree(archived_run)
    proc = _moecl("report", str(archived_run))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "During handling" not in proc.stderr
    assert f"cannot write to {archived_run}" in proc.stderr and "is read-only" in proc.stderr
    assert "Transfer" in proc.stdout  # the summary is printed before the write
    out = tmp_path / "report-copy"
    assert main(["report", str(archived_run), "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    assert (out / "report.md").is_file() and list((out / "plots").glob("*.png"))
    assert json.loads((out / "report.json").read_text())["tasks"] == ["shapes", "digits"]
    assert _tree(archived_run) == before


# ---------------------------------------------------------------------------------------------------------
# Item 14: moecl predict

@pytest.fixture(scope="module")
def test_images(tiny, tmp_path_factory):
    world, _ = tiny
    folder = tmp_path_factory.mktemp("predict-images")
    with tarfile.open(world / "shapes" / "test-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".png")][:3]
        tar.extractall(folder, members=members, filter="data")
    return sorted(folder.rglob("*.png"))


@pytest.mark.slow
def test_predict_skips_and_lists_unreadable_images(test_images, tiny, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, p in enumerate(test_images):
        shutil.copy(p, folder / f"good-{i}.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "zz-truncated.png").write_bytes(test_images[0].read_bytes()[:40])  # the last file is bad
    out_json = tmp_path / "p.json"
    assert main(["predict", str(tiny[1]), "--images", str(folder), "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "2 unreadable image(s) skipped" in captured.err
    assert str(folder / "notes.png") in captured.err and str(folder / "zz-truncated.png") in captured.err
    assert "Traceback" not in captured.err
    rows = json.loads(out_json.read_text())
    assert [Path(r["image"]).name for r in rows] == [f"good-{i}.png" for i in range(len(test_images))]
    # nothing readable at all is an error naming the count
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("x")
    _refused(capsys, ["predict", str(tiny[1]), "--images", str(bad)], "none of the 1 image(s) could be read")


@pytest.mark.parametrize("top", ["0", "-2", "100000"])
def test_predict_top_is_validated(tmp_path, capsys, top):
    """Checked first, before the run is loaded (the run and image need not exist to be told)."""
    _refused(capsys, ["predict", str(tmp_path / "run"), "--images", str(tmp_path / "x.png"), "--top", top],
             "--top must be between 1 and 1000", f"got {top}")


@pytest.mark.slow
def test_predict_csv_cells_cannot_be_formulas(test_images, tiny, tmp_path, capsys):
    labels = ["=HYPERLINK(\"http://x\")", "+1+1", "-2", "@SUM(A1)", "plain"]
    folder = tmp_path / "=cmd"
    folder.mkdir()
    image = shutil.copy(test_images[0], folder / "-x.png")
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(tiny[1]), "--images", str(image), "--labels", ",".join(labels), "--top", "5",
                 "--csv", str(out_csv)]) == 0
    capsys.readouterr()
    rows = list(csv.reader(out_csv.open(encoding="utf-8")))
    assert rows[0][:3] == ["image", "route", "labels_from"] and len(rows) == 2
    cells = dict(zip(rows[0], rows[1]))
    shown = [cells[f"label_{i}"] for i in range(1, 6)]
    assert sorted(shown) == sorted(("'" + l if l[0] in "=+-@" else l) for l in labels)
    for name, cell in cells.items():
        assert not cell.startswith(("=", "+", "-", "@")), f"{name}: {cell!r} would run as a formula"
    assert all(float(cells[f"probability_{i}"]) >= 0 for i in range(1, 6))
    assert cells["image"] == str(image)  # a path starting with '/' is left as it is
