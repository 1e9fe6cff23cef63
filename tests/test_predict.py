"""Predictor / `moecl predict`: per-sample routes and labels, the same alone and in a mixed batch."""
import csv
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from moecl.cli import main
from moecl.errors import DataError
from moecl.evaluation.loading import load_run
from moecl.evaluation.predict import Predictor, find_images


@pytest.fixture(scope="module")
def tiny(tiny_run, tmp_path_factory):
    world, run = tiny_run
    images = tmp_path_factory.mktemp("images")
    for domain in ("shapes", "digits", "colors"):  # test images as files: 64, 80 and 64
        with tarfile.open(world / domain / "test-000000.tar") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".png")]
            tar.extractall(images / domain, members=members, filter="data")
    return world, run, images


@pytest.fixture(scope="module")
def predictor(tiny):
    return Predictor(tiny[1], device="cpu")


def _mixed(images, n=64):
    """n test images interleaved from the three domains (two trained, one held out)."""
    per = {d: sorted((images / d).rglob("*.png")) for d in ("shapes", "digits", "colors")}
    out = []
    for i in range(n):
        d = ("shapes", "digits", "colors")[i % 3]
        out.append(per[d][i // 3])
    return out


def test_mixed_batch_equals_one_by_one(tiny, predictor):
    _, _, images = tiny
    paths = _mixed(images)
    batch = predictor.predict(paths)
    single = [predictor.predict([p])[0] for p in paths]
    chunked = Predictor(tiny[1], device="cpu", batch_size=7, loaded=predictor.run).predict(paths)
    routes = [r["route"] for r in batch]
    print("routes in the mixed batch:", {r: routes.count(r) for r in set(routes)})
    assert len(set(routes)) >= 2, "the batch should mix routes (tasks and zero-shot)"
    for other in (single, chunked):
        assert [r["route"] for r in other] == routes
        assert [r["top"][0]["label"] for r in other] == [r["top"][0]["label"] for r in batch]
        for a, b in zip(batch, other):
            assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
            torch.testing.assert_close(torch.tensor([t["probability"] for t in a["top"]]),
                                       torch.tensor([t["probability"] for t in b["top"]]), atol=1e-5, rtol=1e-4)


def test_routes_and_default_labels(tiny, predictor):
    world, _, images = tiny
    paths = _mixed(images, 30)
    res = predictor.predict(paths, top=5)
    seq = predictor.sequence
    all_classes = {c for t in seq.all_tasks() for c in t.classnames}
    for r in res:
        assert len(r["top"]) == 5
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert set(r["ddas_error"]) == {"shapes", "digits"}
        if r["route"] == "zero-shot":
            assert r["route_id"] == -1 and r["labels_from"] == "all classes"
            assert {t["label"] for t in r["top"]} <= all_classes
        else:
            task = seq.task(r["route"])
            assert r["labels_from"] == f"task {task.name}" and {t["label"] for t in r["top"]} <= set(task.classnames)
    # routes follow DDAS: held-out colors images never go to a task that the selector rejects
    loaded = predictor.run
    x = torch.stack([loaded.eval_tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expect = loaded.selector.select(loaded.model.encode_image(x, -1, normalize=True))
    assert [r["route_id"] for r in res] == expect.tolist()


def test_probabilities_are_softmax_of_scaled_cosine(tiny, predictor):
    _, _, images = tiny
    path = sorted((images / "digits").rglob("*.png"))[0]
    r = predictor.predict([path], task="digits", top=10)[0]
    loaded = predictor.run
    x = loaded.eval_tf(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        f = loaded.model.encode_image(x, 1, normalize=True)
        w = predictor._ev.head(predictor._task_labels("digits"), 1)
        p = (loaded.model.logit_scale.exp() * f @ w).softmax(-1)[0]
    names = predictor.sequence.task("digits").classnames
    got = {t["label"]: t["probability"] for t in r["top"]}
    assert len(got) == 10 and sum(got.values()) == pytest.approx(1.0, abs=1e-5)
    for name, prob in got.items():
        assert prob == pytest.approx(float(p[names.index(name)]), abs=1e-6)


def test_forced_task_and_open_vocabulary(tiny, predictor):
    _, _, images = tiny
    paths = _mixed(images, 6)
    forced = predictor.predict(paths, task="shapes", top=3)
    assert all(r["route"] == "shapes" and r["route_id"] == 0 for r in forced)
    assert all("ddas_error" not in r for r in forced)
    held = predictor.predict(paths, task="colors", top=3)  # a held-out task: zero-shot, its class names
    colors = set(predictor.sequence.task("colors").classnames)
    assert all(r["route"] == "zero-shot" and {t["label"] for t in r["top"]} <= colors for r in held)
    open_vocab = predictor.predict(paths, labels=["a cat", "a dog", "a number"], top=5)
    assert all(len(r["top"]) == 3 and r["labels_from"] == "open vocabulary" for r in open_vocab)
    assert all({t["label"] for t in r["top"]} == {"a cat", "a dog", "a number"} for r in open_vocab)
    assert [r["route"] for r in open_vocab] == [r["route"] for r in predictor.predict(paths)]
    pil = [Image.open(p) for p in paths[:2]]
    assert [r["top"] for r in predictor.predict(pil)] == [r["top"] for r in predictor.predict(paths[:2])]
    with pytest.raises(DataError, match="no task 'nope'"):
        predictor.predict(paths, task="nope")


def test_cli_predict_folder_json_csv(tiny, tmp_path, capsys):
    _, run, images = tiny
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(_mixed(images, 5)):
        shutil.copy(p, (folder / "sub" if i % 2 else folder) / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert [p.name for p in find_images([folder])] == ["0.png", "2.png", "4.png", "1.png", "3.png"]
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    assert main(["predict", str(run), "--images", str(folder), "--top", "3", "--json", str(out_json),
                 "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "route" in printed and "#3" in printed and str(out_json) in printed
    data = json.loads(out_json.read_text())
    assert len(data) == 5 and all(len(r["top"]) == 3 for r in data)
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["route"] for r in rows] == [r["route"] for r in data]
    assert rows[0]["label_1"] == data[0]["top"][0]["label"]
    assert main(["predict", str(run), "--images", str(folder), "--labels", "red, blue ,", "--task", "digits"]) == 0
    assert "digits" in capsys.readouterr().out
    assert main(["predict", str(run), "--images", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_streams_a_folder_as_json_lines_with_loader_processes(tiny, predictor, tmp_path):
    """A folder streams through in batches decoded by loader processes; --jsonl holds one line per image, equal
    to the in-memory results; more images than the terminal table lists print only the counts."""
    from moecl.evaluation import predict as P
    _, run, images = tiny
    paths = _mixed(images, 40)
    ref = predictor.predict(paths)
    streamed = [r for b in Predictor(run, device="cpu", batch_size=6, loaded=predictor.run)
                .iter_predict(paths, workers=2) for r in b]
    assert [(r["image"], r["route"], r["top"][0]["label"]) for r in streamed] == \
        [(r["image"], r["route"], r["top"][0]["label"]) for r in ref]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(paths):
        shutil.copy(p, folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out" / "pred.jsonl"
    old, P.MAX_SHOWN = P.MAX_SHOWN, 10
    try:
        assert main(["predict", str(run), "--images", str(folder), "--jsonl", str(out), "--workers", "2",
                     "--batch-size", "8"]) == 0
    finally:
        P.MAX_SHOWN = old
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 40 and not (tmp_path / "out" / "pred.jsonl.partial").exists()
    by_name = {Path(r["image"]).name: r for r in lines}
    for i, r in enumerate(ref):
        got = by_name[f"{i:03d}.png"]
        assert got["route"] == r["route"] and [t["label"] for t in got["top"]] == [t["label"] for t in r["top"]]


def test_predictions_are_deterministic_when_the_run_evaluates_on_training_crops(tiny):
    """eval.transform=train (the published CIL evaluation's random crops) must not make predict random."""
    _, run, images = tiny
    pred = Predictor(run, device="cpu", loaded=load_run(run, device="cpu", overrides=["eval.transform=train"]))
    paths = _mixed(images, 6)
    a, b = pred.predict(paths), pred.predict(paths)
    assert [[t["probability"] for t in r["top"]] for r in a] == [[t["probability"] for t in r["top"]] for r in b]
    assert pred.run.eval_tf is not pred.tf  # the evaluation itself still scores training crops
def test_iter_predict_streams_with_bounded_memory(tiny, predictor):
    """A generator of images is read one batch ahead at most; the batches' rows are predict()'s rows."""
    _, _, images = tiny
    paths = _mixed(images, 23)
    chunked = Predictor(tiny[1], device="cpu", batch_size=5, loaded=predictor.run)
    taken = []

    def source():
        for p in paths:
            taken.append(p)
            yield p

    batches = []
    for rows in chunked.iter_predict(source()):
        assert len(taken) <= 5 * (len(batches) + 1), "more images read than one batch ahead"
        batches.append(rows)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    streamed = [r for b in batches for r in b]
    assert [(r["image"], r["route"], r["top"][0]["label"]) for r in streamed] == \
        [(r["image"], r["route"], r["top"][0]["label"]) for r in predictor.predict(paths)]


def test_cli_predict_jsonl_batches(tiny, tmp_path, capsys):
    _, run, images = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(_mixed(images, 9)):
        shutil.copy(p, folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"not a png")  # unreadable: listed, skipped, the rest still predicted
    out_jsonl, out_json = tmp_path / "p.jsonl", tmp_path / "p.json"
    assert main(["predict", str(run), "--images", str(folder), "--batch-size", "4", "--top", "2", "--no-progress",
                 "--jsonl", str(out_jsonl), "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "1 unreadable image(s) skipped" in captured.err and str(out_jsonl) in captured.out
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert len(lines) == 9 and lines == json.loads(out_json.read_text())
    assert main(["predict", str(run), "--images", str(folder), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
