"""Evaluation that sees each image once (issue 16): the frozen backbone's features are computed once per run and
reused, every mode of a set is scored in one pass, the adapted forward runs only where an image is routed, and the
numbers are those of scoring each mode on its own. Counted on the one-hot stub (tests/evaluator_stub.py), where
every forward is visible."""
import logging

import pytest
import torch

from evaluator_stub import EXPECTED, EvenToTaskSelector, OneHotCLIP, TASKS, build_tasks, preprocess, tokenizer
from moecl.data import read_task
from moecl.evaluation.evaluator import Evaluator, RouteMode, confusion_row, label_set
from moecl.evaluation.frozen import FrozenCache

IDENTITY = {"name": "one-hot stub", "init_seed": 0}


class CountingCLIP(OneHotCLIP):
    """The stub, counting images per forward kind (plain: every route -1; routed: anything else)."""

    def __init__(self):
        self.plain = self.routed = 0

    def encode_image(self, images, task_ids=-1, normalize=False):
        ids = torch.as_tensor(task_ids)
        if bool((ids == -1).all()):
            self.plain += images.shape[0]
        else:
            self.routed += images.shape[0]
        return super().encode_image(images, task_ids, normalize)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    data = build_tasks(tmp_path_factory.mktemp("onehot"))
    return [read_task(data / name) for name in TASKS]


def modes_for(j: int) -> list[RouteMode]:
    return [RouteMode("oracle", j), RouteMode("agnostic", j, EvenToTaskSelector())]


def score(model, tasks, frozen, batch_size=3, trained=2, oracle=None):
    """oracle + agnostic for every task; the same cases as EXPECTED (names oracle/X, agnostic/X)."""
    ev = Evaluator(model, tokenizer, preprocess, device=torch.device("cpu"), batch_size=batch_size, frozen=frozen)
    out = {}
    for j, task in enumerate(tasks):
        route = j if oracle is None else oracle(j)
        modes = [RouteMode("oracle", route), RouteMode("agnostic", route, EvenToTaskSelector())]
        r_or, r_ag = ev.evaluate_set(task, label_set(task), modes, trained=trained, zero_shot=True)
        out[f"oracle/{task.name}"] = [r_or.correct, r_or.total, confusion_row(r_or, 2)]
        out[f"agnostic/{task.name}"] = [r_ag.correct, r_ag.total, confusion_row(r_ag, 2)]
        out[f"zs/{task.name}"] = r_or.zero_shot_correct
    return out, ev.work


@pytest.mark.parametrize("batch_size", [3, 64])
def test_one_pass_equals_each_mode_on_its_own_and_the_hand_counts(tasks, batch_size):
    once, _ = score(CountingCLIP(), tasks, FrozenCache(IDENTITY), batch_size)
    apart, _ = score(CountingCLIP(), tasks, None, batch_size)
    assert once == apart
    assert {k: v for k, v in once.items() if not k.startswith("zs/")} == \
        {k: v for k, v in EXPECTED.items() if k.split("/")[0] in ("oracle", "agnostic")}
    assert once["zs/a"] == once["zs/b"] == 0  # the stub's zero-shot head always picks the wrong class


def test_frozen_features_once_per_run_and_routed_work_only_where_routed(tasks):
    model, frozen = CountingCLIP(), FrozenCache(IDENTITY)
    _, first = score(model, tasks, frozen)
    n = 8 + 7
    # first row: one plain pass per set; the oracle routes every image, DDAS routes the even classes to their own
    # task (the oracle's route: shared), so the adapted forward runs once per image
    assert (model.plain, model.routed) == (n, n) and first.as_dict() == {"plain": n, "routed": n, "decoded": n}
    model.plain = model.routed = 0
    _, second = score(model, tasks, frozen)
    assert (model.plain, model.routed) == (0, n) and second.plain == 0 and second.decoded == n
    # the published cost: every mode reads and encodes every set, and re-encodes whole batches when any is routed
    model.plain = model.routed = 0
    _, apart = score(model, tasks, None)
    assert apart.as_dict() == {"plain": 2 * n, "routed": 2 * n, "decoded": 2 * n}


def test_a_set_nobody_routes_is_scored_from_the_cache_without_reading_it(tasks):
    class NoRoute(EvenToTaskSelector):
        def select(self, features, decision="sample"):
            return torch.full((features.shape[0],), -1, dtype=torch.long)

    model, frozen = CountingCLIP(), FrozenCache(IDENTITY)
    ev = Evaluator(model, tokenizer, preprocess, device=torch.device("cpu"), batch_size=3, frozen=frozen)
    task = tasks[1]
    modes = [RouteMode("oracle", -1), RouteMode("agnostic", -1, NoRoute())]  # a held-out set, DDAS says zero-shot
    first = ev.evaluate_set(task, label_set(task), modes, trained=1, zero_shot=True)
    assert ev.work.decoded == 7 and model.plain == 7 and model.routed == 0
    ev2 = Evaluator(model, tokenizer, preprocess, device=torch.device("cpu"), batch_size=3, frozen=frozen)
    again = ev2.evaluate_set(task, label_set(task), modes, trained=1, zero_shot=True)
    assert ev2.work.as_dict() == {"plain": 0, "routed": 0, "decoded": 0} and model.plain == 7
    assert [(r.correct, r.total, r.routes) for r in again] == [(r.correct, r.total, r.routes) for r in first]
    assert ev2.read == ev.read  # the shards the cached entry was read from are still reported per row


def test_only_routed_images_are_decoded_once_the_features_are_cached(tasks):
    """A held-out set (oracle: zero-shot) where DDAS routes the even classes (5 of task b's 7 images): from the
    second row on only those 5 are decoded and encoded; the rest keep their place undecoded and score from the
    cache. The numbers equal those of scoring without the cache."""
    task = tasks[1]
    modes = [RouteMode("oracle", -1), RouteMode("agnostic", -1, EvenToTaskSelector())]

    def row(model, frozen):
        ev = Evaluator(model, tokenizer, preprocess, device=torch.device("cpu"), batch_size=3, frozen=frozen)
        res = ev.evaluate_set(task, label_set(task), modes, trained=2, zero_shot=True)
        return [(r.correct, r.total, r.routes, r.zero_shot_correct) for r in res], ev.work

    model, frozen = CountingCLIP(), FrozenCache(IDENTITY)
    first, _ = row(model, frozen)
    model.plain = model.routed = 0
    second, work = row(model, frozen)
    assert work.as_dict() == {"plain": 0, "routed": 5, "decoded": 5} and (model.plain, model.routed) == (0, 5)
    apart, _ = row(CountingCLIP(), None)
    assert first == second == apart
    assert apart[1][:2] == (5, 7)  # the routed even classes are right, the zero-shot odd ones wrong (stub)


def test_disk_cache_is_reused_checked_and_keyed_by_backbone_and_data(tasks, tmp_path, caplog):
    folder = tmp_path / "frozen"
    model = CountingCLIP()
    ref, _ = score(model, tasks, FrozenCache(IDENTITY, folder))
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 2 and model.plain == 15
    model.plain = 0
    again, work = score(model, tasks, FrozenCache(IDENTITY, folder))  # a new process: resume or moecl eval
    assert again == ref and model.plain == 0 and work.plain == 0
    # another backbone identity: other entries, computed anew
    score(model, tasks, FrozenCache({**IDENTITY, "init_seed": 1}, folder))
    assert model.plain == 15 and len(list(folder.glob("*.safetensors"))) == 4
    # a damaged file is recomputed, never trusted
    blob = bytearray(files[0].read_bytes())
    blob[-3] ^= 0xFF
    files[0].write_bytes(bytes(blob))
    model.plain = 0
    with caplog.at_level(logging.WARNING, logger="moecl"):
        damaged, _ = score(model, tasks, FrozenCache(IDENTITY, folder))
    assert damaged == ref and model.plain in (7, 8) and "unusable" in caplog.text


def test_changed_shard_content_changes_the_key(tasks, tmp_path):
    """The key follows the shard files' content, not only what task.json claims: a shard damaged or replaced on
    disk under an unchanged task.json is read again, never scored from the old features."""
    import dataclasses
    import shutil
    cache = FrozenCache(IDENTITY)
    task = tasks[0]
    name = task.urls("test")[0].rsplit("/", 1)[-1]
    other = dataclasses.replace(task, sha256={**task.sha256, name: "0" * 64})
    assert cache.key(task, "test", {}) != cache.key(other, "test", {})
    assert cache.key(task, "test", {}) == FrozenCache(dict(IDENTITY)).key(task, "test", {})
    copy = tmp_path / "copy"
    shutil.copytree(task.root, copy)
    moved = read_task(copy)
    assert cache.key(moved, "test", {}) == cache.key(task, "test", {})  # same content elsewhere: same entry
    shard = copy / name
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert read_task(copy).sha256 == task.sha256  # task.json still claims the old content
    assert cache.key(read_task(copy), "test", {}) != cache.key(task, "test", {})


# ---- a real run ------------------------------------------------------------------------------------------------

def test_a_run_with_the_cache_has_the_accuracy_matrices_of_one_without_it(tiny_run, tmp_path):
    """The session's tiny run (eval.frozen_cache=disk, the default) against the same run re-encoding everything
    (off): identical accuracy matrices and routing, bit for bit; fewer image forwards per row."""
    import json

    from helpers import run_train
    world, run = tiny_run
    off = tmp_path / "off"
    run_train(off, world, "eval.frozen_cache=none")
    a, b = (json.loads((r / "report.json").read_text()) for r in (run, off))
    assert a["methods"] == b["methods"]  # matrices, metrics and routing confusion of every mode
    rows = len(a["eval_work"])
    assert rows == len(b["eval_work"]) == 2
    for cached, full in zip(a["eval_work"], b["eval_work"]):
        assert sum(cached.values()) < sum(full.values())
    assert a["eval_work"][1]["plain"] == 0  # row 2 reads the frozen features of row 1
    assert sorted(p.name for p in (run / "cache" / "frozen").iterdir())  # kept for resume and moecl eval


def test_moecl_eval_reuses_the_runs_frozen_features(tiny_run, tmp_path):
    import json
    import shutil

    from moecl.cli import main
    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "tb"))
    assert main(["eval", str(copy)]) == 0
    doc = json.loads(next((copy / "eval").glob("*/results.json")).read_text())
    assert doc["work"]["plain"] == 0 and doc["work"]["routed"] > 0
    report = json.loads((run / "report.json").read_text())
    method = next(m for m in report["methods"] if m != "zero-shot")
    for mode, entry in doc["modes"].items():
        assert entry["row"] == report["methods"][method][mode]["matrix"][-1], mode


@pytest.mark.slow
def test_two_ranks_score_every_mode_in_one_pass_to_the_hand_counts(tasks, tmp_path):
    """2 gloo ranks, padded equal batches with collective forwards (expert parallel) and without: every row gives
    the hand-derived counts; the second row reads the cache on both ranks (no plain forward)."""
    import json

    from evaluator_stub import EXPECTED
    from helpers import torchrun
    out = tmp_path / "ranks.json"
    torchrun("tests/dist/eval_once_ranks.py", str(tasks[0].root.parent), str(out), nproc=2)
    got = json.loads(out.read_text())
    for collective in ("True", "False"):
        for row in ("0", "1"):
            for case in ("oracle/a", "oracle/b", "agnostic/a", "agnostic/b"):
                assert got[f"{collective}/{row}/{case}"] == EXPECTED[case], (collective, row, case)
        # padding rows of equal batches run the forward too (collective): 15 images and the padding
        assert got[f"{collective}/0/work"]["plain"] >= 15 and got[f"{collective}/1/work"]["plain"] == 0
    assert got["False/0/work"]["plain"] == 15
    assert got["False/1/work"]["routed"] == 15  # one adapted forward per image (oracle and DDAS agree or zero-shot)
