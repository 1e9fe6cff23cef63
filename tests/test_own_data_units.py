"""The pieces of the own-data path, one by one: class-name mappings, the class split, sequence-file errors,
the report's legend, zero-shot row and weak-routing note, fast imports, a failed train leaving no folder."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from data_tools.__main__ import main as data_tools_main
from data_tools.folder import class_order, read_classnames_arg, read_source, task_groups
from helpers import ROOT, cpu_env
from moecl.data.sequence import load_sequence
from moecl.errors import DataError
from moecl.evaluation.report import (LEGEND, build_method_entry, new_report, render_markdown, routing_accuracy,
                                     summary_text)


def _tree(root, labels=("4", "5", "6"), per_class=2):
    for lab in labels:
        (root / lab).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * i, 10, 200)).save(root / lab / f"{i}.png")
    return root


def test_integer_folders_are_named_by_a_mapping_or_a_two_column_file(tmp_path):
    src = _tree(tmp_path / "digits")
    with pytest.raises(DataError, match=r"integers.*4=NAME,5=NAME,6=NAME.*by position"):
        read_source(src)
    with pytest.raises(DataError, match=r"read by position \(integer label i = the i-th name, 0\.\.2 here\).*4=NAME"):
        read_source(src, classnames=["four", "five", "six"])  # positions 0..2, folders 4..6
    names, pairs = read_source(src, classnames=read_classnames_arg("4=four,5=five,6=six"))
    assert names == ["four", "five", "six"]
    assert sorted({lab for _, lab in pairs["train"]}) == [0, 1, 2]
    assert all(names[lab] == {"4": "four", "5": "five", "6": "six"}[p.split("/")[-2]] for p, lab in pairs["train"])
    table = tmp_path / "names.txt"
    table.write_text("6 six\n4 four\n5 five\n")
    assert read_classnames_arg(str(table)) == {"6": "six", "4": "four", "5": "five"}
    assert read_source(src, classnames=read_classnames_arg(str(table)))[0] == ["four", "five", "six"]
    table.write_text("4,four\n5,five\n")
    with pytest.raises(DataError, match="label\\(s\\) 6 have no name"):
        read_source(src, classnames=read_classnames_arg(str(table)))
    plain = tmp_path / "plain.txt"
    plain.write_text("maple tree\noak tree\n")
    assert read_classnames_arg(str(plain)) == ["maple tree", "oak tree"]  # one name per line, spaces kept
    with pytest.raises(DataError, match="'4four' is not LABEL=NAME"):
        read_classnames_arg("4four,5=five")


def test_class_order_fixed_seeded_and_cut_into_tasks():
    names = [f"c{i}" for i in range(7)]
    assert class_order(names) == list(range(7))
    assert class_order(names, order=["c6", "c5", "c4", "c3", "c2", "c1", "c0"]) == list(range(6, -1, -1))
    seeded = class_order(names, seed=3)
    assert sorted(seeded) == list(range(7)) and seeded == class_order(names, seed=3) != class_order(names, seed=4)
    with pytest.raises(DataError, match="missing: c6"):
        class_order(names, order=names[:6])
    with pytest.raises(DataError, match="not classes"):
        class_order(names, order=names[:6] + ["nope"])
    assert task_groups(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(DataError, match="--tasks 8"):
        task_groups(list(range(7)), 8)


def test_folder_tasks_writes_cil_tasks_and_a_sequence_that_loads(tmp_path, capsys):
    src = _tree(tmp_path / "digits", labels=("4", "5", "6", "7"))
    out = tmp_path / "data"
    assert data_tools_main(["folder", str(src), "--out", str(out), "--classnames", "4=four,5=five,6=six,7=seven",
                            "--tasks", "2", "--class-order", "seven,six,five,four", "--no-progress"]) == 0
    assert "data.sequence=" in capsys.readouterr().out
    seq = load_sequence(out, out / "digits.yaml")
    assert seq.kind == "cil" and seq.task_names == ["digits-01", "digits-02"]
    assert [t.classnames for t in seq.tasks] == [["seven", "six"], ["five", "four"]]
    meta = json.loads((out / "digits-02" / "task.json").read_text())
    assert meta["cil"]["seen_classnames"] == ["seven", "six", "five", "four"] and meta["counts"] == {"train": 4}
    assert data_tools_main(["folder", str(src), "--out", str(out), "--class-seed", "1"]) == 2
    assert "--class-order / --class-seed need --tasks N" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("name: x\ntask: [a]\n", "unknown field 'task'; did you mean 'tasks'"),
    ("name: x\n", "lacks field 'tasks'"),
    ("name: x\ntasks: a\n", "field 'tasks' is 'a'; it must be task folder names"),
    ("name: x\ntasks: [a]\nheld_out: b\n", "field 'held_out' is 'b'"),
    ("name: x\nkind: mtl\ntasks: [a]\n", "field 'kind': kind 'mtl' is not one of mtil, cil"),
    ("name: x\ntasks: [a, a]\n", "lists task\\(s\\) more than once: a"),
    ("tasks: [a]\nname: [1]\n", "field 'name' is \\[1\\]"),
])
def test_sequence_file_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "seq.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_sequence(tmp_path, path)


def _report(weak: bool):
    report = new_report(["a", "b"], [])
    matrix = [[80.0, 50.0], [78.0, 90.0]]
    own = [[40, 0, 0], [0, 40, 0]] if not weak else [[25, 15, 0], [15, 25, 0]]
    report["methods"]["zero-shot"] = {"oracle": build_method_entry([[50.0, 50.0]] * 2, names=["a", "b"])}
    report["methods"]["moecl"] = {"oracle": build_method_entry(matrix, names=["a", "b"]),
                                  "agnostic": build_method_entry(matrix, routing_confusion=own, names=["a", "b"])}
    return report


def test_report_has_a_legend_a_zero_shot_row_first_and_flags_weak_routing():
    assert routing_accuracy([[25, 15, 0], [15, 25, 0], [1, 0, 3]], 2) == pytest.approx(100 * 53 / 84)
    assert routing_accuracy([[5, 0, 0], [0, 1, 4]], 2, trained=1) == 90.0  # untrained task b: zero-shot is right
    good, weak = _report(False), _report(True)
    for text in (summary_text(good), render_markdown(good)):
        assert LEGEND in text and "Forgetting: best-ever minus last" in text and "docs/metrics.md" in text
        assert "zero-shot (oracle)" in text and "Weak routing" not in text and "WARNING" not in text
    md = render_markdown(weak)
    assert "**Weak routing.** moecl (agnostic): only 62.5% of test images took their own route" in md
    assert "WARNING moecl (agnostic): only 62.5%" in summary_text(weak)
    summary = md.split("## Run")[0]
    assert summary.index("zero-shot (oracle)") < summary.index("moecl (oracle)")


def test_cli_imports_nothing_heavy():
    code = ("import sys, moecl.cli, moecl.evaluation.cli, moecl.evaluation.report, data_tools.__main__; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'open_clip', 'pydantic', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_train_that_cannot_start_leaves_no_run_folder(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moecl", "train", "--config", "tiny", "--out", str(run),
                           f"data.root={tmp_path / 'nowhere'}"], env=cpu_env(), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "moecl train: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists(), sorted(p.name for p in run.iterdir())
    proc = subprocess.run([sys.executable, "-m", "moecl", "train", "--config", "tiny", "--out", str(run),
                           "moe.num_expert=3"], env=cpu_env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "did you mean 'moe.num_experts'" in proc.stderr and not run.exists()
