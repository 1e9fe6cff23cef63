"""A corrupt image and a truncated shard: skipped, counted, warned about with the shard's name; above
data.max_bad_fraction the stream stops with a DataError naming the shard."""
import hashlib
import io
import logging
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools.taskfile import write_task
from data_tools.writer import SplitResult
from moecl.data import eval_batches, make_transforms, read_task, train_batches
from moecl.errors import DataError

_, TF = make_transforms(16, (0.9, 1.0))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10 * i, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def damaged(tmp_path) -> Path:
    """Two shards of 10: shard 0 has one undecodable image, shard 1 is cut off after about 6 samples."""
    task_dir = tmp_path / "damaged"
    task_dir.mkdir()
    names = []
    for s in range(2):
        name = f"test-{s:06d}.tar"
        with open(task_dir / name, "wb") as f:
            w = wds.TarWriter(f, encoder=False)
            for i in range(10):
                img = _png(i)[:40] if (s, i) == (0, 3) else _png(i)
                w.write({"__key__": f"{s}{i:07d}", "png": img, "cls": str(i % 2).encode(), "json": b"{}"})
            w.close()
        names.append(name)
    data = (task_dir / names[1]).read_bytes()
    (task_dir / names[1]).write_bytes(data[: int(len(data) * 0.6)])
    shas = [hashlib.sha256((task_dir / n).read_bytes()).hexdigest() for n in names]
    write_task(task_dir, name="damaged", classnames=["even", "odd"], train_template="a {} thing.",
               eval_templates=["a {} thing."], splits={"test": SplitResult(names, [10, 10], shas, [])})
    return task_dir


def test_eval_skips_counts_and_names_bad_shards(damaged, caplog):
    task = read_task(damaged)
    caplog.set_level(logging.WARNING, logger="moecl.data")
    stream = eval_batches(task, batch_size=4, workers=0, preprocess=TF, max_bad_fraction=0.9)
    keys = [k for _, _, ks in stream for k in ks]
    st = stream.stats
    assert len(keys) == st.samples and st.samples + st.bad_samples == 20
    assert 5 <= st.samples <= 16 and st.bad_samples >= 4
    bad = {Path(s).name: n for s, n in st.bad_shards.items()}
    assert bad["test-000000.tar"] == 1 and bad["test-000001.tar"] == st.bad_samples - 1
    reasons = " ".join(e["reason"] for e in st.events)
    assert "cannot decode" in reasons and "shard" in reasons
    assert "test-000000.tar" in caplog.text and "test-000001.tar" in caplog.text


def test_eval_over_fraction_raises_naming_the_shard(damaged):
    task = read_task(damaged)
    with pytest.raises(DataError) as e:
        for _ in eval_batches(task, batch_size=4, workers=0, preprocess=TF, max_bad_fraction=0.01):
            pass
    msg = str(e.value)
    assert "max_bad_fraction=0.01" in msg and "test-000001.tar" in msg and "test-000000.tar" in msg


def test_train_skips_within_fraction_and_stops_above_it(damaged):
    task = read_task(damaged)
    stream = train_batches(task, "test", batch_size=4, workers=1, seed=0, preprocess=TF, shuffle_buffer=4,
                           max_bad_fraction=0.9)
    batches = [b for _, b in zip(range(12), stream)]
    assert len(batches) == 12 and all(x.shape == (4, 3, 16, 16) for x, _ in batches)
    assert stream.stats.bad_samples > 0 and stream.stats.samples >= 48
    strict = train_batches(task, "test", batch_size=4, workers=1, seed=0, preprocess=TF, shuffle_buffer=4,
                           max_bad_fraction=0.01)
    with pytest.raises(DataError, match=r"test-00000[01]\.tar"):
        for _ in zip(range(200), strict):
            pass
