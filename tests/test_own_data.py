"""The README's "Your own data" path, end to end, on an image folder nobody prepared for moecl.

A class-per-folder tree with integer folder names (``0`` .. ``7``, named through a two-column file), cut into
two class-incremental tasks, trained from the demo's pretrained tiny CLIP (``model.init_checkpoint=demo``),
evaluated, and used to predict: the same commands the README gives, run through the real command-line entry
points in this process. The demo's pretraining is shrunk (a smaller world and fewer steps, in a private
cache) so the test takes a minute or two, not the demo's minutes.
"""
import contextlib
import io
import json
import re

import pytest

from data_tools.__main__ import main as data_tools_main
from data_tools.synthetic import COLOR_CLASSES, render
from moecl.cli import main as moecl_main
from moecl.pretrain import PretrainParams

PER_CLASS = {"train": 12, "test": 8}
pytestmark = pytest.mark.slow  # pretraining + a 2-task run + eval + predict: about 40 s of CPU


def _image_folder(root):
    """SRC/{train,test}/<k>/<i>.png: colour patches drawn with another seed than the demo's world."""
    for split, n in PER_CLASS.items():
        for k in range(len(COLOR_CLASSES)):
            folder = root / split / str(k)
            folder.mkdir(parents=True)
            for i in range(n):
                render("colors", k, 123, split, i, 32).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("own")
    mp.setenv("MOECL_CACHE", str(base / "cache"))
    import moecl.pretrained as demo  # a small demo foundation: what `demo` resolves to is the point, not its size
    mp.setattr(demo, "WORLD", dict(domains=["colors", "shapes"], image_size=32, train_per_class=2,
                                   test_per_class=4, pretrain_per_class=40, seed=0, held_out=0))
    mp.setattr(demo, "PRETRAIN", PretrainParams(model="moecl-tiny", steps=50, batch_size=64, lr=3e-3, warmup=5))
    src = _image_folder(base / "photos")
    names = base / "names.txt"
    names.write_text("".join(f"{k} {c}\n" for k, c in enumerate(COLOR_CLASSES)))
    data, run = base / "data", base / "run"
    # 1. one folder -> two class-incremental tasks + the sequence file
    assert data_tools_main(["folder", str(src), "--out", str(data), "--task", "patches", "--classnames", str(names),
                            "--tasks", "2", "--no-progress"]) == 0
    # 2. train from the demo's pretrained tiny CLIP (the console as a person sees it is kept)
    console = io.StringIO()
    with contextlib.redirect_stderr(console), contextlib.redirect_stdout(console):
        assert moecl_main(["train", "--config", "demo", "--out", str(run), f"data.root={data}",
                           f"data.sequence={data / 'patches.yaml'}", "model.init_checkpoint=demo",
                           "train.iterations=12", "train.warmup=2", "data.batch_size=16", "data.workers=0",
                           "data.shuffle_buffer=32", "ddas.iterations=30", "runtime.progress=false"]) == 0
    # 3. evaluate again from the checkpoint; 4. regenerate the report; 5. predict
    assert moecl_main(["eval", str(run)]) == 0
    assert moecl_main(["report", str(run)]) == 0
    assert moecl_main(["predict", str(run), "--images", str(src / "test"), "--labels", "all-seen",
                       "--json", str(base / "pred.json")]) == 0
    yield {"base": base, "src": src, "data": data, "run": run, "console": console.getvalue()}
    mp.undo()


def test_class_split_names_folders_through_the_mapping(own_data):
    seq = (own_data["data"] / "patches.yaml").read_text()
    assert "kind: cil" in seq and "patches-01" in seq and "patches-02" in seq
    first = json.loads((own_data["data"] / "patches-01" / "task.json").read_text())
    second = json.loads((own_data["data"] / "patches-02" / "task.json").read_text())
    assert first["classnames"] == list(COLOR_CLASSES[:4]) and second["classnames"] == list(COLOR_CLASSES[4:])
    assert first["counts"] == {"train": 4 * PER_CLASS["train"], "test": 4 * PER_CLASS["test"]}
    assert second["cil"]["seen_classnames"] == list(COLOR_CLASSES)


def test_training_from_the_demo_backbone_beats_chance(own_data):
    report = json.loads((own_data["run"] / "report.json").read_text())
    chance = 100.0 / 4  # four classes per task
    oracle = report["methods"]["moecl"]["oracle"]["metrics"]
    assert oracle["last"] > chance + 30, oracle
    zero_shot = report["methods"]["zero-shot"]["oracle"]["matrix"][-1]
    assert min(zero_shot) > chance + 20, f"the pretrained backbone was not loaded: zero-shot {zero_shot}"
    config = (own_data["run"] / "config.yaml").read_text()
    assert "init_checkpoint: demo" in config
    log = (own_data["run"] / "train.log").read_text()
    assert "weights from init checkpoint" in log and "No pretrained weights loaded" not in log


def test_eval_reproduces_and_predict_scores_all_seen_classes(own_data):
    run = own_data["run"]
    report = json.loads((run / "report.json").read_text())
    results = json.loads(next((run / "eval").glob("*/results.json")).read_text())
    assert results["modes"]["oracle"]["row"] == pytest.approx(report["methods"]["moecl"]["oracle"]["matrix"][-1])
    preds = json.loads((own_data["base"] / "pred.json").read_text())
    assert len(preds) == len(COLOR_CLASSES) * PER_CLASS["test"]
    assert {p["labels_from"] for p in preds} == {"all seen classes"}
    assert all(len(p["top"]) == 5 for p in preds)
    right = sum(p["top"][0]["label"] == COLOR_CLASSES[int(p["image"].split("/")[-2])] for p in preds)
    assert right / len(preds) > 2.5 / len(COLOR_CLASSES), f"{right}/{len(preds)} right over 8 classes"


def test_the_console_is_readable(own_data):
    text = own_data["console"]
    lines = [line for line in text.splitlines() if line.strip()]
    timed = [line for line in lines if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert any("task 1/2 patches-01:" in line for line in timed) and any("task 2/2 patches-02:" in line for line in timed)
    assert any(re.search(r"after task 2/2 \(patches-02\) \[oracle\]: patches-01 [\d.]+, patches-02 [\d.]+", line)
               for line in timed)
    for noise in ("No pretrained weights loaded", "No existing process group", "INFO:", "rss_bytes",
                  "randomly initialised", "task 0"):
        assert noise not in text, noise
    assert "Definitions: docs/metrics.md" in text and "zero-shot (oracle)" in text
    log = (own_data["run"] / "train.log").read_text()
    assert "rss_bytes" in log and "DEBUG" in log  # debug lines go to the log file only
