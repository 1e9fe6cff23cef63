"""data_tools: folder/manifest conversion, resumable writing, verify, the synthetic world's cache, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_tools.__main__ import main
from data_tools.folder import convert_folder
from data_tools.synthetic import build_world
from data_tools.verify import verify
from data_tools.writer import WriteOptions, parse_bytes
from moecl.data import load_sequence, read_task
from moecl.errors import DataError

QUIET = WriteOptions(shard_size=3, progress=False)


def _img(path: Path, color=(200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _tree(root: Path, classes=("aquarium_fish", "maple_tree"), per_class=4) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _img(root / name / f"{i}.png", (40 * c, 10 * i, 90))
    return root


def test_folder_tree_with_a_corrupt_image(tmp_path):
    src = _tree(tmp_path / "src")
    (src / "maple_tree" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    task_dir = convert_folder(src, tmp_path / "out", task="trees", opts=QUIET)
    task = read_task(task_dir)
    assert task.classnames == ["aquarium fish", "maple tree"]
    assert task.counts == {"train": 8} and task.train_template == "a photo of a {}."
    bad = json.loads((task_dir / "bad_images.json").read_text())
    assert len(bad["train"]) == 1 and "broken.jpg" in bad["train"][0]["source"]
    sizes = json.loads((task_dir / "sizes.json").read_text())
    assert sizes == dict(zip(task.meta["shards"]["train"], task.shard_counts["train"])) and sum(sizes.values()) == 8


def test_folder_with_split_folders_is_an_image_folder_export(tmp_path):
    src = tmp_path / "export"
    _tree(src / "train", per_class=3)
    _tree(src / "test", per_class=2)
    task = read_task(convert_folder(src, tmp_path / "out", task="exp", opts=QUIET))
    assert task.counts == {"train": 6, "test": 4}


def test_manifests_csv_and_jsonl(tmp_path):
    for i in range(6):
        _img(tmp_path / "imgs" / f"{i}.png", (i * 40, 0, 0))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,split\n" + "".join(
        f"imgs/{i}.png,{'cat' if i % 2 else 'dog'},{'test' if i > 3 else 'train'}\n" for i in range(6)))
    task = read_task(convert_folder(csv, tmp_path / "out", opts=QUIET))
    assert task.name == "list" and task.classnames == ["cat", "dog"] and task.counts == {"train": 4, "test": 2}
    jsonl = tmp_path / "list2.jsonl"
    jsonl.write_text("".join(json.dumps({"path": str(tmp_path / "imgs" / f"{i}.png"), "label": i % 3}) + "\n"
                             for i in range(6)))
    with pytest.raises(DataError, match="--classnames"):
        convert_folder(jsonl, tmp_path / "out", opts=QUIET)
    task = read_task(convert_folder(jsonl, tmp_path / "out", classnames=["a", "b", "c"], test_fraction=0.5,
                                    opts=QUIET))
    assert task.classnames == ["a", "b", "c"] and task.counts == {"train": 3, "test": 3}


def test_writing_resumes_and_is_reproducible(tmp_path):
    src = _tree(tmp_path / "src", per_class=5)
    task_dir = convert_folder(src, tmp_path / "out", task="t", opts=QUIET)
    shards = sorted(task_dir.glob("train-*.tar"))
    assert len(shards) == 4
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    convert_folder(src, tmp_path / "out", task="t", opts=QUIET)  # complete shards are skipped
    assert {p.name: p.stat().st_mtime_ns for p in shards} == {k: v[0] for k, v in before.items()}
    shards[1].unlink()
    convert_folder(src, tmp_path / "out", task="t", opts=QUIET)  # only the missing one is written again
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(task_dir.glob("train-*.tar"))}
    assert [n for n in after if after[n][0] != before[n][0]] == [shards[1].name]
    assert all(after[n][1] == before[n][1] for n in after)  # the same bytes: fixed order and mtime
    assert not list(task_dir.glob(".*.tmp-*"))


def test_shard_size_by_bytes_and_parallel_workers(tmp_path):
    src = _tree(tmp_path / "src", per_class=6)
    opts = WriteOptions(shard_size=1000, shard_bytes=parse_bytes("3kB"), workers=2, progress=False)
    task = read_task(convert_folder(src, tmp_path / "out", task="b", opts=opts))
    assert len(task.urls("train")) > 1 and task.counts["train"] == 12
    assert parse_bytes("1GiB") == 2 ** 30 and parse_bytes("500MB") == 500_000_000


def test_verify_catches_a_changed_byte(tmp_path, capsys):
    task_dir = convert_folder(_tree(tmp_path / "src"), tmp_path / "out", task="v", opts=QUIET)
    assert verify(tmp_path / "out") == []
    assert main(["verify", str(tmp_path / "out")]) == 0
    shard = sorted(task_dir.glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(tmp_path / "out")
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert shard.name in capsys.readouterr().err


def test_synthetic_world_is_cached_and_deterministic(tmp_path):
    kw = dict(domains=["arrows", "clocks"], train_per_class=2, test_per_class=1, pretrain_per_class=1,
              shard_size=4)
    a = build_world(tmp_path / "a", **kw)
    stamp = (a / "arrows" / "task.json").stat().st_mtime_ns
    build_world(tmp_path / "a", **kw)  # same parameters: nothing is written
    assert (a / "arrows" / "task.json").stat().st_mtime_ns == stamp
    b = build_world(tmp_path / "b", **kw)
    assert read_task(a / "clocks").sha256 == read_task(b / "clocks").sha256
    seq = load_sequence(a, "synthetic")  # the world's own sequence.yaml wins over the shipped one
    assert seq.task_names == ["arrows"] and [t.name for t in seq.held_out] == ["clocks"]
    build_world(tmp_path / "a", **{**kw, "train_per_class": 3})  # other parameters: rebuilt
    assert read_task(a / "arrows").counts["train"] == 3 * 8
    params = json.loads((a / "world.json").read_text())
    assert params["complete"] and params["params"]["train_per_class"] == 3


@pytest.mark.parametrize("sub", ["folder", "mtil", "cil", "synthetic", "verify", "export"])
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(tmp_path)], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and "no task.json" in r.stderr


def test_cli_folder_and_errors(tmp_path, capsys):
    src = _tree(tmp_path / "src")
    rc = main(["folder", str(src), "--out", str(tmp_path / "out"), "--task", "cli", "--shard-size", "2",
               "--template", "a {} leaf.", "--eval-template", "a {} leaf.", "--eval-template", "the {} tree.",
               "--no-progress", "--workers", "2"])
    assert rc == 0
    task = read_task(tmp_path / "out" / "cli")
    assert task.eval_templates == ["a {} leaf.", "the {} tree."] and len(task.urls("train")) == 4
    assert main(["cil", "cifar100", "--src", str(tmp_path), "--out", str(tmp_path / "c"), "--steps", "7"]) == 2
    assert "7 equal steps" in capsys.readouterr().err
    assert main(["folder", str(src), "--out", str(tmp_path / "o"), "--template", "no placeholder"]) == 2


def test_resize_and_image_format(tmp_path):
    import io
    import tarfile
    src = _tree(tmp_path / "src", per_class=2)
    opts = WriteOptions(shard_size=10, progress=False, image_format="jpg", resize=8)
    task = read_task(convert_folder(src, tmp_path / "out", task="r", opts=opts))
    with tarfile.open(task.urls("train")[0]) as tar:
        names = tar.getnames()
        img = Image.open(io.BytesIO(tar.extractfile(next(n for n in names if n.endswith(".jpg"))).read()))
    assert not any(n.endswith(".png") for n in names) and img.format == "JPEG" and min(img.size) == 8
