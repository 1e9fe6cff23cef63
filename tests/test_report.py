"""Reports: files written, numbers in report.md, regenerate() reproduces, PNGs are images, TensorBoard."""
import json

import numpy as np
import pytest
from PIL import Image

from moecl.evaluation.metrics import routing_confusion
from moecl.evaluation.report import (build_method_entry, format_table, load_report, log_to_tensorboard,
                                     new_report, regenerate, summary_table, versions, write_report)

TASKS = ["Aircraft", "Caltech101", "DTD"]
HELD_OUT = ["Pets"]

# columns: the 3 tasks, then the held-out set
ORACLE = [[80.0, 50.0, 30.0, 65.0],
          [70.0, 90.0, 40.0, 64.0],
          [60.0, 85.0, 95.0, 63.0]]
# Transfer (50 + (30+40)/2) / 2 = 42.5; Avg 600/9 = 66.7; Last 80.0
AGNOSTIC = [[78.0, 50.0, 30.0, 65.0],
            [69.0, 88.0, 40.0, 64.0],
            [60.0, 84.0, 93.0, 63.0]]
# Transfer 42.5; Avg (78+50+30+69+88+40+60+84+93)/9 = 592/9 = 65.8; Last (60+84+93)/3 = 79.0
FT = [[81.0, 40.0, 20.0, 50.0],
      [30.0, 92.0, 25.0, 40.0],
      [20.0, 35.0, 96.0, 30.0]]
# Transfer (40 + (20+25)/2) / 2 = 31.25 (prints 31.2: exact binary half, round-half-even);
# Avg (81+40+20+30+92+25+20+35+96)/9 = 439/9 = 48.8; Last (20+35+96)/3 = 151/3 = 50.3;
# BWT ((20-81) + (35-92)) / 2 = -59.0; forgetting 59.0


def _report():
    rc = routing_confusion([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, -1, 2, 2, -1, -1], num_tasks=3)
    report = new_report(TASKS, HELD_OUT, config={"model": {"name": "moecl-tiny", "pretrained": None}},
                        wall_time_s=12.5, gpu_hours=0.0, peak_memory_bytes=123456,
                        trainable_parameters={"experts": 1000, "routers": 30})
    names = TASKS + HELD_OUT
    report["methods"]["moe-adapters"] = {
        "oracle": build_method_entry(ORACLE, "mtil", names=names, num_tasks=3),
        "agnostic": build_method_entry(np.array(AGNOSTIC), "mtil", routing_confusion=rc, names=names, num_tasks=3),
    }
    report["methods"]["full-ft"] = {"oracle": build_method_entry(FT, "mtil", names=names, num_tasks=3)}
    return report


def test_entry_metrics():
    e = build_method_entry(ORACLE, "mtil", names=TASKS + HELD_OUT, num_tasks=3)
    assert e["metrics"]["transfer"] == pytest.approx(42.5)
    assert e["metrics"]["held_out_last"] == pytest.approx(63.0)
    assert e["per_dataset"]["Caltech101"] == {"transfer": 50.0, "avg": 75.0, "last": 85.0, "held_out": False}
    c = build_method_entry([90.0, 80.0, 70.0], "cil")
    assert c["kind"] == "cil" and c["metrics"]["avg"] == pytest.approx(80.0) and c["metrics"]["last"] == 70.0
    with pytest.raises(ValueError):
        build_method_entry(ORACLE, "mtil", names=["a", "b"])
    with pytest.raises(ValueError):
        build_method_entry(ORACLE, "dil")


def test_write_report_files_and_numbers(tmp_path):
    written = write_report(tmp_path, _report())
    for name in ("report.json", "report.md", "plots/accuracy__moe-adapters__oracle.png",
                 "plots/accuracy__moe-adapters__agnostic.png", "plots/routing__moe-adapters__agnostic.png",
                 "plots/accuracy__full-ft__oracle.png", "clip_benchmark/moe-adapters__agnostic__Pets.json"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.rglob("*.tmp"))
    assert all(p.is_file() for p in written.values())

    md = (tmp_path / "report.md").read_text()
    summary = [line for line in md.splitlines() if line.startswith("| moe-adapters (oracle)")][0]
    assert "| 42.5 | 66.7 | 80.0 |" in summary
    agnostic = [line for line in md.splitlines() if line.startswith("| moe-adapters (agnostic)")][0]
    assert "| 42.5 | 65.8 | 79.0 |" in agnostic
    ft = [line for line in md.splitlines() if line.startswith("| full-ft (oracle)")][0]
    assert "| 31.2 | 48.8 | 50.3 | -59.0 | 59.0 | 40.0 | 30.0 |" in ft  # held-out (50+40+30)/3, 30
    # paper layout: per-dataset Transfer row then the Average column
    assert "| Transfer | — | 50.0 | 35.0 | 64.0 | 42.5 |" in md
    assert "| after 3: DTD | 60.0 | 85.0 | 95.0 | 63.0 |" in md
    assert "Pets*" in md and "zero-shot" in md
    # routing of the held-out set: 100% zero-shot
    assert "| Pets | 0.0 | 0.0 | 0.0 | 100.0 |" in md

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"methods", "tasks", "held_out", "trainable_parameters", "wall_time_s", "gpu_hours",
                           "peak_memory_bytes", "versions", "config"}
    assert report["methods"]["moe-adapters"]["agnostic"]["routing_confusion"][3] == [0, 0, 0, 2]

    bench = json.loads((tmp_path / "clip_benchmark/moe-adapters__oracle__DTD.json").read_text())
    assert bench["dataset"] == "DTD" and bench["task"] == "zeroshot_classification"
    assert bench["model"] == "moecl-tiny+moe-adapters-oracle" and bench["metrics"]["acc1"] == pytest.approx(0.95)
    agnostic = json.loads((tmp_path / "clip_benchmark/moe-adapters__agnostic__DTD.json").read_text())
    assert agnostic["model"] != bench["model"], "oracle and agnostic rows need distinct names in clip_benchmark build"
    assert isinstance(bench["pretrained"], str), "clip_benchmark build fails on a null pretrained"


def test_pngs_are_images(tmp_path):
    write_report(tmp_path, _report())
    for png in (tmp_path / "plots").glob("*.png"):
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
            assert len(set(np.asarray(im.convert("L")).reshape(-1).tolist())) > 10  # not blank


def test_regenerate_reproduces_and_repairs(tmp_path):
    write_report(tmp_path, _report())
    md_before = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    data["methods"]["moe-adapters"]["oracle"]["metrics"] = {"transfer": 0.0, "avg": 0.0, "last": 0.0}
    data["methods"]["full-ft"]["oracle"]["per_dataset"] = {}
    (tmp_path / "report.json").write_text(json.dumps(data))
    (tmp_path / "report.md").unlink()
    (tmp_path / "plots" / "accuracy__full-ft__oracle.png").unlink()
    regenerated = regenerate(tmp_path)
    assert (tmp_path / "report.md").read_text() == md_before
    assert (tmp_path / "plots" / "accuracy__full-ft__oracle.png").is_file()
    assert regenerated == load_report(tmp_path)
    assert regenerated["methods"] == json.loads(json.dumps(_report()["methods"]))


def test_cil_report(tmp_path):
    report = new_report([f"split{k}" for k in range(4)])
    report["methods"]["moe-adapters"] = {"oracle": build_method_entry([90.0, 80.0, 70.0, 64.0], "cil")}
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "| accuracy | 90.0 | 80.0 | 70.0 | 64.0 | 76.0 | 64.0 |" in md
    assert "| moe-adapters (oracle) | — | 76.0 | 64.0 |" in md
    assert (tmp_path / "plots" / "accuracy__moe-adapters__oracle.png").is_file()
    assert regenerate(tmp_path)["methods"] == json.loads(json.dumps(report["methods"]))


def test_bad_report_is_refused(tmp_path):
    with pytest.raises(ValueError):
        write_report(tmp_path, {"methods": {"x": {"oracle": {"matrix": [[1.0]]}}}})
    with pytest.raises(FileNotFoundError):
        regenerate(tmp_path / "nothing")


def test_format_table():
    text = format_table([[1.0, None], [12.345, 7]], ["a", "bb"], ["x", "y"])
    assert text.splitlines() == ["       x    y",
                                 "a    1.0    -",
                                 "bb  12.3  7.0"]
    md = format_table([[1.0]], ["r"], ["c"], markdown=True)
    assert md.splitlines() == ["|  | c |", "|---|---:|", "| r | 1.0 |"]
    assert "moe-adapters (oracle)" in summary_table(_report())


def test_versions_tolerates_absence():
    v = versions()
    assert v["python"] and v["torch"] and "deepspeed" in v and "open_clip" in v and "webdataset" in v


class _FakeWriter:
    def __init__(self):
        self.scalars, self.images, self.texts = {}, {}, {}

    def add_scalar(self, tag, value, step=None):
        self.scalars[tag] = value

    def add_image(self, tag, img, step=None, dataformats="CHW"):
        assert dataformats == "HWC" and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        self.images[tag] = img

    def add_text(self, tag, text, step=None):
        self.texts[tag] = text


def test_plots_summary_figure_no_trivial_routing_and_no_redraw(tmp_path):
    report = _report()
    report["methods"]["moe-adapters"]["oracle"]["routing_confusion"] = [[2, 0, 0, 0]] * 4  # identity by design
    write_report(tmp_path, report)
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert "summary.png" in pngs and "routing__moe-adapters__oracle.png" not in pngs
    assert "plots/summary.png" in (tmp_path / "report.md").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "plots").glob("*.png")}
    write_report(tmp_path, report)  # same numbers: nothing drawn again
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "plots").glob("*.png")}
    report["methods"]["full-ft"]["oracle"]["matrix"][0][0] -= 1.0
    write_report(tmp_path, report)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "plots").glob("*.png")}
    changed = {n for n in after if after[n] != stamps[n]}
    assert changed == {"accuracy__full-ft__oracle.png", "summary.png"}, changed  # only the figures of that entry


def test_log_to_tensorboard(tmp_path):
    w = _FakeWriter()
    log_to_tensorboard(w, _report(), step=2)
    assert w.scalars["metrics/moe-adapters/oracle/transfer"] == pytest.approx(42.5)
    assert w.scalars["metrics/full-ft/oracle/last"] == pytest.approx(151 / 3)
    assert set(w.images) == {"summary", "accuracy/moe-adapters/oracle", "accuracy/moe-adapters/agnostic",
                             "routing/moe-adapters/agnostic", "accuracy/full-ft/oracle"}
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_to_tensorboard(writer, _report(), step=2)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
