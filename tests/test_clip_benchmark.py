"""CLIP_benchmark interoperability: moecl's result JSON goes through ``clip_benchmark build`` and a moecl task
exported with ``data_tools export clip-benchmark`` loads as CLIP_benchmark's ``wds/`` dataset.

The two checks that run CLIP_benchmark's own code skip when ``clip_benchmark`` cannot be imported (it is not
a moecl dependency: ``pip install clip-benchmark``, which also pulls scikit-learn, pycocoevalcap and
transformers); the layout and record checks below them run everywhere.
"""
import argparse
import csv
import json

import pytest
from PIL import Image

from data_tools.__main__ import main as data_tools_main
from data_tools.folder import convert_folder
from data_tools.writer import WriteOptions
from moecl.evaluation.report import build_method_entry, new_report, write_report


def _clip_benchmark():
    try:
        import clip_benchmark.cli as cli
        from clip_benchmark.datasets.builder import build_wds_dataset
    except Exception as e:  # noqa: BLE001 - any import failure means the tool is not usable here
        pytest.skip(f"clip_benchmark is not importable here ({type(e).__name__}: {e}); pip install clip-benchmark")
    return cli, build_wds_dataset


def _run_with_report(tmp_path):
    report = new_report(["a", "b"], ["c"], config={"model": {"name": "moecl-tiny", "pretrained": None,
                                                             "init_checkpoint": "demo"}})
    matrix = [[80.0, 40.0, 30.0], [75.0, 90.0, 30.0]]
    report["methods"]["zero-shot"] = {"oracle": build_method_entry([[40.0, 40.0, 30.0]] * 2, names=["a", "b", "c"],
                                                                   num_tasks=2)}
    report["methods"]["moecl"] = {mode: build_method_entry(matrix, names=["a", "b", "c"], num_tasks=2)
                                  for mode in ("oracle", "agnostic")}
    write_report(tmp_path, report)
    return tmp_path / "clip_benchmark"


def test_records_have_a_string_pretrained_and_one_model_name_per_method_and_mode(tmp_path):
    records = [json.loads(p.read_text()) for p in sorted(_run_with_report(tmp_path).glob("*.json"))]
    assert len(records) == 3 * 3  # (zero-shot, moecl oracle, moecl agnostic) x 3 test sets
    assert all(isinstance(r["pretrained"], str) and r["pretrained"] == "demo" for r in records)
    keys = {(r["model"], r["pretrained"], r["dataset"]) for r in records}
    assert len(keys) == len(records), "two rows would share a model/pretrained/dataset key"
    assert {r["model"] for r in records} == {"moecl-tiny+zero-shot", "moecl-tiny+moecl-oracle",
                                             "moecl-tiny+moecl-agnostic"}


def test_clip_benchmark_build_reads_the_records(tmp_path):
    cli, _ = _clip_benchmark()
    bench = _run_with_report(tmp_path / "run")
    out = tmp_path / "benchmark.csv"
    cli.main_build(argparse.Namespace(files=[str(bench)], output=str(out)))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9
    full = {(r["model_fullname"], r["dataset"]) for r in rows}
    assert len(full) == 9 and ("moecl-tiny+moecl-agnostic demo", "b") in full
    assert {float(r["acc1"]) for r in rows if r["model"] == "moecl-tiny+moecl-oracle" and r["dataset"] == "b"} \
        == {0.9}


def _task(tmp_path):
    src = tmp_path / "src"
    for k, name in enumerate(("red", "blue")):
        (src / "test" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (200 * (k == 0), 20 * i, 200 * (k == 1))).save(src / "test" / name / f"{i}.png")
    return convert_folder(src, tmp_path / "data", task="patches", eval_templates=["a photo of a {}.", "{} paint."],
                          opts=WriteOptions(shard_size=2, progress=False))


def test_export_writes_clip_benchmarks_layout(tmp_path, capsys):
    import webdataset as wds
    task_dir = _task(tmp_path)
    out = tmp_path / "wds"
    assert data_tools_main(["export", "clip-benchmark", str(task_dir), "--out", str(out)]) == 0
    assert "wds/patches" in capsys.readouterr().out
    assert (out / "test" / "nshards.txt").read_text().strip() == "3"  # 6 images, 2 per shard
    assert (out / "classnames.txt").read_text().splitlines() == ["blue", "red"]
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a photo of a {c}.",
                                                                                      "{c} paint."]
    ds = (wds.WebDataset(str(out / "test" / "{0..2}.tar"), shardshuffle=False)
          .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
          .to_tuple(["webp", "png", "jpg", "jpeg"], "cls"))
    samples = list(ds)
    assert len(samples) == 6 and sorted(y for _, y in samples) == [0, 0, 0, 1, 1, 1]
    assert all(img.getpixel((0, 0))[2 if y == 0 else 0] == 200 for img, y in samples)  # label 0 = blue
    assert data_tools_main(["export", "clip-benchmark", str(tmp_path / "data"), "--out", str(out)]) == 2


def test_clip_benchmark_loads_the_export(tmp_path):
    _, build_wds_dataset = _clip_benchmark()
    out = tmp_path / "wds"
    data_tools_main(["export", "clip-benchmark", str(_task(tmp_path)), "--out", str(out)])
    ds = build_wds_dataset("wds/patches", transform=lambda img: img.size, split="test", data_dir=str(out))
    assert ds.classes == ["blue", "red"] and ds.templates == ["a photo of a {c}.", "{c} paint."]
    assert sorted(y for _, y in ds) == [0, 0, 0, 1, 1, 1]
