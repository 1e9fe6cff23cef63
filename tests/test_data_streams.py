"""moecl.data streams on a tiny synthetic world: exactly-once eval over ranks x workers, equal train
batches per rank, pretrain captions, sequence loading, URL forms."""
import collections
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from data_tools.synthetic import build_world
from data_tools.taskfile import write_task
from data_tools.writer import Item, WriteOptions, write_split
from moecl.data import (check_eval_count, eval_batches, expand_urls, load_sequence, make_transforms,
                        pretrain_batches, read_task, shipped_sequences, train_batches)
from moecl.errors import DataError

TF_TRAIN, TF_EVAL = make_transforms(32, (0.9, 1.0))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    return build_world(root, domains=["shapes", "digits", "flags"], train_per_class=4, test_per_class=3,
                       pretrain_per_class=2, shard_size=5, held_out=1)


def _truth(task, split):
    """key -> (label, classname) read straight from the shards' .cls/.json members."""
    out = {}
    for url in task.urls(split):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == "json":
                    meta = json.loads(tar.extractfile(m).read())
                    out[f"{Path(url).name}/{key}"] = (meta["label"], meta["classname"])
    return out


def test_sequence_lists_tasks_held_out_and_metadata(world):
    seq = load_sequence(world, "synthetic")
    assert seq.name == "synthetic" and seq.kind == "mtil"
    assert seq.task_names == ["shapes", "digits"] and [t.name for t in seq.held_out] == ["flags"]
    shapes = seq.tasks[0]
    assert shapes.classnames[0] == "red circle" and shapes.class_ids is None
    assert "{}" in shapes.train_template and len(shapes.eval_templates) >= 3
    assert shapes.counts == {"train": 32, "test": 24}
    assert len(shapes.urls("train")) == 7 and all(Path(u).is_file() for u in shapes.urls("train"))
    assert shapes.prompts("red circle", "train") == ["a drawing of a red circle."]
    with pytest.raises(DataError, match="no split 'val'"):
        shapes.urls("val")


@pytest.mark.parametrize("task_index", [0, 1])
def test_eval_sees_every_sample_once_over_2_ranks_x_2_workers(world, task_index):
    task = load_sequence(world, "synthetic").tasks[task_index]
    truth = _truth(task, "test")
    seen = collections.Counter()
    streams = []
    for rank in (0, 1):
        stream = eval_batches(task, batch_size=4, rank=rank, world_size=2, workers=2, preprocess=TF_EVAL)
        for images, labels, keys in stream:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
            assert labels.dtype == torch.long and len(keys) == len(labels)
            for y, k in zip(labels.tolist(), keys):
                assert truth[k][0] == y and task.classnames[y] == truth[k][1]
            seen.update(keys)
        assert stream.seen == stream.expected and stream.stats.bad_samples == 0
        streams.append(stream)
    assert set(seen) == set(truth) and set(seen.values()) == {1}
    assert sum(s.seen for s in streams) == task.counts["test"]
    assert check_eval_count(streams[0]) == streams[0].seen  # no process group: checks this rank


def test_fewer_shards_than_slots_split_by_sample_and_equal_batches(tmp_path, caplog):
    items = [Item(label=i % 2, source=f"s{i}", data=_png(i)) for i in range(7)]
    res = write_split(tmp_path / "tiny", "test", items, ["cat", "dog"], WriteOptions(shard_size=100, progress=False))
    write_task(tmp_path / "tiny", name="tiny", classnames=["cat", "dog"], train_template="a {}.",
               eval_templates=["a {}."], splits={"test": res})
    task = read_task(tmp_path / "tiny")
    seen = collections.Counter()
    batch_counts = []
    for rank in range(3):
        stream = eval_batches(task, batch_size=2, rank=rank, world_size=3, workers=2, preprocess=TF_EVAL,
                              equal_batches=True)
        n = 0
        for _, labels, keys in stream:
            n += 1
            seen.update(k for k in keys if k)
            assert all((y == -1) == (k == "") for y, k in zip(labels.tolist(), keys))
        batch_counts.append(n)
    assert "every loader reads every shard" in caplog.text
    assert len(seen) == 7 and set(seen.values()) == {1}
    assert len(set(batch_counts)) == 1  # padded to the same number of batches on every rank


def test_eval_max_samples_caps_globally(world):
    task = load_sequence(world, "synthetic").tasks[0]
    keys = []
    for rank in (0, 1):
        for _, _, k in eval_batches(task, batch_size=3, rank=rank, world_size=2, workers=1, preprocess=TF_EVAL,
                                    max_samples=10):
            keys.extend(k)
    assert len(keys) == len(set(keys)) == 10


@pytest.mark.parametrize("resampled", [True, False])
def test_train_streams_give_equal_batches_per_rank(world, resampled):
    task = load_sequence(world, "synthetic").tasks[1]
    steps, got = 6, []
    for rank in (0, 1):
        stream = train_batches(task, batch_size=4, rank=rank, world_size=2, workers=2, seed=3, preprocess=TF_TRAIN,
                               shuffle_buffer=8, resampled=resampled)
        batches = [b for _, b in zip(range(steps), stream)]
        assert len(batches) == steps
        for images, labels in batches:
            assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
            assert 0 <= int(labels.min()) and int(labels.max()) < task.num_classes
        got.append(torch.cat([y for _, y in batches]))
    assert not torch.equal(got[0], got[1])  # ranks read different data


def test_train_stream_is_deterministic_given_seed(world):
    task = load_sequence(world, "synthetic").tasks[0]

    def labels():
        s = train_batches(task, batch_size=4, workers=0, seed=5, preprocess=TF_EVAL, shuffle_buffer=8)
        return torch.cat([y for _, (_, y) in zip(range(5), s)])

    assert torch.equal(labels(), labels())


def test_pretrain_batches_yield_images_and_captions(world):
    stream = pretrain_batches(world, batch_size=5, workers=1, seed=0, preprocess=TF_TRAIN, shuffle_buffer=4)
    images, captions = next(iter(stream))
    assert images.shape == (5, 3, 32, 32)
    assert len(captions) == 5 and all(isinstance(c, str) and c for c in captions)
    pretrain = read_task(world / "pretrain")
    assert pretrain.kind == "pretrain" and "french flag" in pretrain.classnames  # held-out domain included


def test_missing_task_names_task_folder_and_builder(world, tmp_path):
    seq = tmp_path / "seq.yaml"
    seq.write_text("name: mine\nkind: mtil\ntasks: [shapes, nowhere]\n")
    with pytest.raises(DataError) as e:
        load_sequence(world, seq)
    msg = str(e.value)
    assert "'nowhere'" in msg and str(world / "nowhere") in msg and "data_tools" in msg
    with pytest.raises(DataError, match="mtil_order1"):
        load_sequence(tmp_path, "mtil_order1")  # shipped sequence, data not built: says how to build
    with pytest.raises(DataError, match="did you mean 'mtil_order1'"):
        load_sequence(world, "mtil_ordr1")


def test_shipped_sequences_match_shipped_configs(repo_root):
    import yaml
    names = set(shipped_sequences())
    for cfg in (repo_root / "moecl" / "configs").glob("*.yaml"):
        seq = yaml.safe_load(cfg.read_text()).get("data", {}).get("sequence")
        assert seq is None or seq in names, f"{cfg.name} names sequence {seq}"


def test_brace_pattern_and_pipe_urls(world):
    task = load_sequence(world, "synthetic").tasks[0]
    urls = task.urls("test")
    pattern = str(world / "shapes" / ("test-{000000..%06d}.tar" % (len(urls) - 1)))
    assert expand_urls(pattern) == urls
    piped = load_sequence(world, "synthetic", url_template="pipe:cat {root}/{task}/{shard}").tasks[0]
    assert piped.urls("test")[0].startswith("pipe:cat ")
    task.shards["test"] = [pattern]  # a single brace pattern in place of the list
    keys = []
    for tk in (task, piped):
        stream = eval_batches(tk, batch_size=8, workers=0, preprocess=TF_EVAL)
        keys.append(sorted(k for _, _, ks in stream for k in ks))
    assert keys[0] == keys[1] and len(keys[0]) == task.counts["test"]


def test_make_transforms_train_and_eval_sizes():
    from PIL import Image
    train_tf, eval_tf = make_transforms(224, (0.9, 1.0))
    img = Image.new("RGB", (300, 200), (200, 10, 10))
    assert train_tf(img).shape == eval_tf(img).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="train_crop_scale"):
        make_transforms(32, (0.0, 1.0))


def _png(i: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 30 % 255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_sequence_by_path_folder_and_errors(world, tmp_path):
    assert load_sequence(world, world / "sequence.yaml").name == "synthetic"
    assert load_sequence(world, str(world) + "/").task_names == ["shapes", "digits"]  # a folder holding one
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: something\ntasks: [shapes]\n")
    with pytest.raises(DataError, match="kind 'something'"):
        load_sequence(world, bad)
    with pytest.raises(DataError, match="does not exist"):
        load_sequence(world, tmp_path / "absent.yaml")


def test_slot_assignment_arithmetic_matches_brute_force():
    import random
    from moecl.data.streams import _Assignment
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 7))]
        slots = rng.randint(1, 9)
        cap = rng.choice([None, rng.randint(1, 40)])
        a = _Assignment(counts, len(counts), slots, cap)
        owners = collections.Counter()
        for slot in range(slots):
            kept = [(i, j) for i in a.shards_for(slot) for j in range(counts[i]) if a.keeps(slot, i, j)]
            owners.update(kept)
            assert a.expected(slot) == len(kept)
            for i in range(len(counts)):
                start = rng.randint(0, counts[i])
                assert a.kept_between(slot, i, start, counts[i]) == sum(
                    1 for (s, j) in kept if s == i and j >= start)
        total = sum(counts) if cap is None else min(sum(counts), cap)
        assert len(owners) == total and set(owners.values()) <= {1}
