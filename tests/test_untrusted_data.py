"""A data folder is untrusted input (issue 13, data side): it never runs a command, never exhausts memory,
never blocks, and every problem is an error (or a skipped, counted sample) that names its cause.

Security first: task.json ``url_template`` and ``::pipe:`` shard entries, sequence-file task names; then
bounded shard reads (a gzip bomb, a shard cap, a pax-header bomb); a FIFO in place of a shard; malformed
task.json fields, 16-bit and float images, image error messages; and ``moecl eval`` following the error's
advice to raise ``data.max_bad_fraction``.
"""
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, cpu_env
from data_tools.__main__ import main as data_tools_main
from data_tools.verify import verify
from moecl.cli import main as moecl_main
from moecl.config import DataConfig
from moecl.data import (ShardLimits, data_options, eval_batches, load_sequence, make_transforms, open_image,
                        read_task)
from moecl.data.decode import decode_image
from moecl.data.shards import ShardError, read_shard
from moecl.errors import DataError

_, TF = make_transforms(16, (0.9, 1.0))
CLASSES = ["even", "odd"]


# ---------------------------------------------------------------------------------------------------------
# Building small tasks by hand

def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10 * i, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as read (a big member is never held in memory by the test itself)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else _Zeros(size))


def _write_shard(path: Path, keys: list[str], *, gz: bool = False, huge: dict[str, int] | None = None) -> None:
    """One tar (gzip-compressed when ``gz``, whatever its name) of png/cls samples; ``huge[key]``: that sample's
    png is that many zero bytes instead."""
    huge = huge or {}
    with open(path, "wb") as f:
        out = gzip.GzipFile(fileobj=f, mode="wb", mtime=0) if gz else f
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for i, key in enumerate(keys):
                if key in huge:
                    _add(tar, f"{key}.png", size=huge[key])
                else:
                    _add(tar, f"{key}.png", _png(i))
                _add(tar, f"{key}.cls", str(i % 2).encode())
        if gz:
            out.close()


def _task(task_dir: Path, shards: dict[str, int], *, edit=None, **shard_kw) -> Path:
    """A task folder with one test shard per entry of ``shards`` (name -> samples) and a valid task.json,
    then ``edit(meta)`` applied to the task.json."""
    task_dir.mkdir(parents=True, exist_ok=True)
    names, counts = [], []
    for s, (name, n) in enumerate(shards.items()):
        _write_shard(task_dir / name, [f"{s}{i:07d}" for i in range(n)], **shard_kw.get(name, {}))
        names.append(name)
        counts.append(n)
    meta = {"format": "moecl-task/1", "name": task_dir.name, "kind": "classification", "classnames": CLASSES,
            "templates": {"train": "a {} thing.", "eval": ["a {} thing."]}, "counts": {"test": sum(counts)},
            "shards": {"test": names}, "shard_counts": {"test": counts}, "sha256": {}, "class_ids": None,
            "cil": None}
    if edit is not None:
        edit(meta)
    (task_dir / "task.json").write_text(json.dumps(meta))
    return task_dir


def _set(path: str, value):
    """An edit of task.json: set the dotted ``path`` (a '[i]' index allowed) to ``value``."""
    def edit(meta):
        node, parts = meta, path.replace("[", ".").replace("]", "").split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _eval_all(task, **kw):
    stream = eval_batches(task, batch_size=4, workers=0, preprocess=TF, **kw)
    keys = [k for _, _, ks in stream for k in ks]
    return stream, keys


@contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body blocks, e.g. on a FIFO."""
    def fire(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run  # the session's shared (world, run); tests copy before changing it


# ---------------------------------------------------------------------------------------------------------
# 1. Security: a data folder never runs anything

def _pipe(marker: Path) -> str:
    return f"pipe:touch {marker}; cat {{root}}/{{task}}/{{shard}}"


def test_task_json_url_template_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    task_dir = _task(tmp_path / "root" / "evil", {"test-000000.tar": 4}, edit=_set("url_template", _pipe(marker)))
    with pytest.raises(DataError) as e:
        read_task(task_dir)
    msg = str(e.value)
    assert str(task_dir / "task.json") in msg and "'url_template'" in msg and "MOECL_SHARD_URL_TEMPLATE" in msg
    problems = verify(tmp_path / "root")  # verify checks the same rule
    assert any(str(task_dir / "task.json") in p and "'url_template'" in p for p in problems)
    assert not marker.exists()


@pytest.mark.parametrize("entry", [
    "test-000000.tar::pipe:touch {marker}", "pipe:touch {marker}", "test-000000.tar; touch {marker}",
    "$(touch {marker}).tar", "../other/test-000000.tar", "/etc/passwd", "sub/test-000000.tar",
    "s3://bucket/test-000000.tar", "https://example.com/x.tar", "test-{000000..000001}.tar", "-rf.tar", "", 7])
def test_shard_entry_that_is_not_a_plain_name_is_refused(tmp_path, entry):
    marker = tmp_path / "PWNED"
    value = entry.replace("{marker}", str(marker)) if isinstance(entry, str) else entry
    task_dir = _task(tmp_path / "root" / "evil", {"test-000000.tar": 4}, edit=_set("shards.test[0]", value))
    with pytest.raises(DataError) as e:
        read_task(task_dir)
    msg = str(e.value)
    assert str(task_dir / "task.json") in msg and "'shards.test[0]'" in msg and "plain file" in msg
    problems = verify(tmp_path / "root")
    assert any("'shards.test[0]'" in p for p in problems), problems
    assert data_tools_main(["verify", str(tmp_path / "root")]) == 1
    assert not marker.exists()


def test_sequence_file_task_names_are_plain_and_aliases_refused(tmp_path):
    root = tmp_path / "root"
    _task(root / "ok", {"test-000000.tar": 2})
    marker = tmp_path / "PWNED"
    for bad, field in ((f"ok;touch {marker}", "tasks[1]"), ("../root/ok", "tasks[1]"), ("/tmp", "tasks[1]")):
        (root / "sequence.yaml").write_text(json.dumps({"name": "s", "kind": "mtil", "tasks": ["ok", bad]}))
        with pytest.raises(DataError) as e:
            load_sequence(root, "s")
        assert f"sequence file {root / 'sequence.yaml'}" in str(e.value) and field in str(e.value)
        assert any(field in p for p in verify(root))
    (root / "sequence.yaml").write_text("name: s\ntasks: &a [ok]\nheld_out: *a\n")
    with pytest.raises(DataError, match="aliases"):
        load_sequence(root, "s")
    assert not marker.exists()


def test_pipe_templates_come_from_the_user_only_and_are_checked(tmp_path, monkeypatch):
    root = tmp_path / "root"
    task_dir = _task(root / "ok", {"test-000000.tar": 3, "test-000001.tar": 3})
    (root / "sequence.yaml").write_text(json.dumps({"name": "s", "kind": "mtil", "tasks": ["ok"]}))
    marker = tmp_path / "RAN"  # the user's own pipe: runs (that is what it is for)
    cfg = DataConfig(root=str(root), sequence="s",
                     shard_url_template=f"pipe:touch {marker}; cat {{root}}/{{task}}/{{shard}}")
    task = load_sequence(root, "s", **data_options(cfg)).tasks[0]
    assert task.remote and task.urls("test")[0].startswith("pipe:touch")
    _, keys = _eval_all(task)
    assert len(keys) == 6 and marker.exists()
    monkeypatch.setenv("MOECL_SHARD_URL_TEMPLATE", "{root}/{task}/{shard}")
    assert len(_eval_all(read_task(task_dir))[1]) == 6
    monkeypatch.setenv("MOECL_SHARD_URL_TEMPLATE", "pipe:cat {root}/{dataset}/{shard}")
    with pytest.raises(DataError) as e:
        read_task(task_dir)
    assert "MOECL_SHARD_URL_TEMPLATE" in str(e.value) and "{dataset}" in str(e.value) and "{shard}" in str(e.value)


def _poisoned_world(world: Path, dest: Path, marker: Path) -> Path:
    shutil.copytree(world, dest)
    path = dest / "digits" / "task.json"
    meta = json.loads(path.read_text())
    meta["shards"]["test"][0] = meta["shards"]["test"][0] + f"::pipe:touch {marker}"
    meta["url_template"] = _pipe(marker)
    path.write_text(json.dumps(meta))
    return dest


def test_train_and_eval_on_a_poisoned_folder_refuse_without_traceback(tiny, tmp_path, capsys):
    world, run = tiny
    marker = tmp_path / "PWNED"
    bad = _poisoned_world(world, tmp_path / "bad", marker)
    proc = subprocess.run([sys.executable, "-m", "moecl", "train", "--config", "tiny", "--out", str(tmp_path / "r"),
                           f"data.root={bad}", f"data.sequence={bad / 'sequence.yaml'}"],
                          env=cpu_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(bad / "digits" / "task.json") in proc.stderr and "url_template" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert moecl_main(["eval", str(run), "--data-root", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad / "digits" / "task.json") in err and "'shards.test[0]'" in err and "Traceback" not in err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# 2. A shard cannot exhaust memory

def test_gzip_bomb_member_is_skipped_counted_and_never_read_whole(tmp_path):
    big = 32 << 20  # 32 MB of zeros: ~32 KB gzip-compressed, in a shard named .tar
    task_dir = _task(tmp_path / "bomb", {"test-000000.tar": 6, "test-000001.tar": 4},
                     **{"test-000000.tar": {"gz": True, "huge": {"00000002": big}}})
    assert (task_dir / "test-000000.tar").stat().st_size < 200_000
    limits = ShardLimits(max_member_bytes=1 << 20)
    tracemalloc.start()
    try:
        samples = list(read_shard(str(task_dir / "test-000000.tar"), limits))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes while reading a shard with a {big}-byte member"
    assert [s["__key__"] for s in samples] == [f"0{i:07d}" for i in range(6)]
    assert "png" not in samples[2] and "data.max_member_bytes=1048576" in samples[2]["__SKIP__"]
    # through a stream: skipped and counted with shard and key named, every other sample decoded
    task = read_task(task_dir, limits=limits)
    stream, keys = _eval_all(task, max_bad_fraction=0.5)
    assert len(keys) == 9 and stream.stats.bad_samples == 1 and stream.stats.samples + 1 == task.counts["test"]
    ev = stream.stats.events[0]
    assert ev["shard"].endswith("test-000000.tar") and ev["key"] == "test-000000.tar/00000002"
    assert "00000002.png" in ev["reason"] and str(big) in ev["reason"]
    with pytest.raises(DataError) as e:  # the default tolerance: stops, naming the shard and the cap
        _eval_all(task)
    assert "test-000000.tar" in str(e.value) and "max_member_bytes" in str(e.value)
    problems = verify(task_dir, limits=limits)
    assert any("test-000000.tar" in p and "max_member_bytes" in p for p in problems)


def test_shard_decompressing_past_the_cap_is_cut_off_and_counted(tmp_path):
    task_dir = _task(tmp_path / "long", {"test-000000.tar": 8, "test-000001.tar": 3},
                     **{"test-000000.tar": {"gz": True, "huge": {"00000003": 6 << 20}}})
    task = read_task(task_dir, limits=ShardLimits(max_shard_bytes=1 << 20))
    with pytest.raises(ShardError) as e:
        list(read_shard(task.urls("test")[0], task.limits))
    assert "data.max_shard_bytes" in e.value.reason and e.value.completed == 3
    stream, keys = _eval_all(task, max_bad_fraction=0.9)
    assert len(keys) == 3 + 3 and stream.stats.bad_samples == 5  # 3 read, 5 cut off, shard 1 whole
    assert "max_shard_bytes" in stream.stats.events[0]["reason"]


def test_oversized_pax_header_is_refused_not_read(tmp_path):
    path = tmp_path / "pax.tar"
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as gz:
        head = tarfile.TarInfo("././@PaxHeader")
        head.type, head.size = tarfile.XHDTYPE, 64 << 20
        gz.write(head.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(64):
            gz.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="extended header"):
            list(read_shard(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_image_over_the_pixel_limit_is_skipped_not_decoded(tmp_path, monkeypatch):
    task = read_task(_task(tmp_path / "px", {"test-000000.tar": 3}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16x16 = 256 pixels: PIL would only warn
    stream, keys = _eval_all(task, max_bad_fraction=1.0)
    assert keys == [] and stream.stats.bad_samples == 3
    reason = stream.stats.events[0]["reason"]
    assert "DecompressionBomb" in reason and "00000000.png" in reason


def test_config_defaults_are_the_loader_defaults():
    d, limits = DataConfig(), ShardLimits()
    assert (d.max_member_bytes, d.max_shard_bytes) == (limits.max_member_bytes, limits.max_shard_bytes)
    assert d.shard_url_template is None


# ---------------------------------------------------------------------------------------------------------
# 8. A FIFO where a shard should be is refused by name, never opened

def test_fifo_in_place_of_a_shard_is_refused_not_blocked_on(tmp_path):
    task_dir = _task(tmp_path / "root" / "fifo", {"test-000000.tar": 4, "test-000001.tar": 4})
    (task_dir / "test-000001.tar").unlink()
    os.mkfifo(task_dir / "test-000001.tar")
    task = read_task(task_dir)
    with _deadline(60):
        with pytest.raises(DataError) as e:
            _eval_all(task)
        stream, keys = _eval_all(task, max_bad_fraction=0.5)
        problems = verify(tmp_path / "root")
        with pytest.raises(DataError, match="FIFO"):
            open_image(task_dir / "test-000001.tar")
    assert "test-000001.tar" in str(e.value) and "FIFO" in str(e.value)
    assert len(keys) == 4 and stream.stats.bad_samples == 4
    assert any("test-000001.tar" in p and "FIFO" in p for p in problems)


# ---------------------------------------------------------------------------------------------------------
# 11. Malformed task.json fields, 16-bit / float images, image error messages

@pytest.mark.parametrize("field, value", [
    ("name", None), ("name", ""), ("classnames", []), ("classnames", "even,odd"), ("classnames", ["even", 3]),
    ("counts.test", -3), ("counts.test", "8"), ("counts.test", 2.5), ("counts", [8]), ("shards.test", "x.tar"),
    ("shards", {}), ("templates.eval", ["no placeholder"]), ("templates.eval", [3]), ("templates", None),
    ("shard_counts.test", [-1, 9]), ("class_ids", ["a", "b"]), ("class_ids", [1]), ("sha256", ["x"]),
    ("kind", 3), ("cil", "yes")])
def test_malformed_task_json_field_is_named_with_the_file(tmp_path, field, value):
    task_dir = _task(tmp_path / "root" / "t", {"test-000000.tar": 4, "test-000001.tar": 4},
                     edit=_set(field, value))
    with pytest.raises(DataError) as e:
        read_task(task_dir)
    top = field.split(".")[0]
    assert str(task_dir / "task.json") in str(e.value) and f"'{top}" in str(e.value), str(e.value)
    problems = verify(tmp_path / "root")
    assert any(str(task_dir / "task.json") in p and f"'{top}" in p for p in problems), problems


@pytest.mark.parametrize("mode, array, fmt", [
    ("I;16", np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1)), "PNG"),
    ("I", np.tile(np.linspace(-5000, 300000, 64).astype(np.int32), (8, 1)), "TIFF"),
    ("F", np.tile(np.linspace(0.0, 1.0, 64).astype(np.float32), (8, 1)), "TIFF"),
    ("F", np.tile(np.linspace(-3.0, 40.0, 64).astype(np.float32), (8, 1)), "TIFF")])
def test_16_bit_and_float_images_are_scaled_by_their_range(mode, array, fmt):
    img = Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    with Image.open(io.BytesIO(buf.getvalue())) as check:
        assert check.mode.startswith(mode.split(";")[0])  # the file really holds a high-depth image
    rgb = np.asarray(decode_image(buf.getvalue()))
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 64, 3)
    row = rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 100 < row.mean() < 155  # the ramp, not a white (or black) sheet
    assert np.all(np.diff(row) >= 0)
    assert (rgb == 255).mean() < 0.05


def test_bad_image_messages_name_the_file_and_the_sample(tmp_path):
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        open_image(garbage)
    assert str(garbage) in str(e.value) and "BytesIO" not in str(e.value)
    task_dir = tmp_path / "t"
    _task(task_dir, {"test-000000.tar": 3})
    with tarfile.open(task_dir / "test-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:  # sample 1 broken
        for i in range(3):
            _add(tar, f"0{i:07d}.png", b"not a png" if i == 1 else _png(i))
            _add(tar, f"0{i:07d}.cls", b"0")
    stream, keys = _eval_all(read_task(task_dir), max_bad_fraction=0.5)
    assert len(keys) == 2 and stream.stats.bad_samples == 1
    ev = stream.stats.events[0]
    assert ev["key"] == "test-000000.tar/00000001" and "00000001.png" in ev["reason"]
    assert "BytesIO" not in ev["reason"]


def test_data_tools_folder_scales_16_bit_names_bad_images_and_refuses_unsafe_task_names(tmp_path):
    from data_tools.folder import convert_folder
    from data_tools.writer import WriteOptions
    src = tmp_path / "src"
    for c, cls in enumerate(("dark", "light")):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.tile(np.linspace(0, 4000 * (c + 1), 32).astype(np.uint16), (8, 1))).save(
                src / cls / f"{i}.png")
    (src / "light" / "broken.png").write_bytes(b"\x89PNG not really")
    opts = WriteOptions(shard_size=8, progress=False, image_format="jpg")
    task = read_task(convert_folder(src, tmp_path / "out", task="ramps", opts=opts))
    bad = json.loads((task.root / "bad_images.json").read_text())["train"]
    assert len(bad) == 1 and "broken.png" in bad[0]["error"] and "BytesIO" not in bad[0]["error"]
    with tarfile.open(task.urls("train")[0]) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(jpgs) == 4
    for data in jpgs:  # stored 8-bit: the ramp, not white
        row = np.asarray(decode_image(data))[4, :, 0].astype(int)
        assert row[0] < 20 and row[-1] > 235 and 90 < row.mean() < 165
    with pytest.raises(DataError, match="task name"):
        convert_folder(src, tmp_path / "out", task="ramps; touch x", opts=opts)
    assert not (tmp_path / "out" / "ramps; touch x").exists()


# ---------------------------------------------------------------------------------------------------------
# 16. `moecl eval` can follow the advice to raise data.max_bad_fraction

def test_eval_accepts_data_max_bad_fraction(tiny, tmp_path, capsys):
    world, run = tiny
    damaged = tmp_path / "damaged"
    shutil.copytree(world, damaged)
    shard = damaged / "shapes" / json.loads((damaged / "shapes" / "task.json").read_text())["shards"]["test"][0]
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    first_png = next(n for n, _ in members if n.endswith((".png", ".jpg")))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, b"garbage" if name == first_png else data)
    assert moecl_main(["eval", str(run), "--data-root", str(damaged), "eval.modes=[oracle]"]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "Traceback" not in err
    advice = re.search(r"(data\.max_bad_fraction=[0-9.]+) argument to `moecl train` or `moecl eval`", err)
    assert advice, err
    assert moecl_main(["eval", str(run), "--data-root", str(damaged), "eval.modes=[oracle]", advice.group(1)]) == 0
    out = capsys.readouterr().out
    assert "oracle" in out
    doc = json.loads(next((run / "eval").glob(f"*__{damaged.name}/results.json")).read_text())
    total = json.loads((damaged / "shapes" / "task.json").read_text())["counts"]["test"]
    assert doc["modes"]["oracle"]["samples"]["shapes"] == total - 1  # one skipped, the rest all scored
    assert advice.group(1) in doc["overrides"]
