"""The Evaluator's counts against a one-hot stub CLIP (tests/evaluator_stub.py): oracle routes, mixed DDAS routes,
the CIL label offset, padded batches and the cross-rank reduce give exactly the hand-derived numbers."""
import json

import pytest

from evaluator_stub import EXPECTED, TEST_COUNTS, build_tasks, evaluate_all
from helpers import torchrun


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tasks(tmp_path_factory.mktemp("onehot"))


def test_expected_counts_follow_from_the_test_sets():
    """The hand-derived table agrees with the test-set sizes (every confusion row sums to its set's size)."""
    size = {"a": sum(TEST_COUNTS[c] for c in ("c0", "c1", "c2", "c3")), "b": sum(TEST_COUNTS[c] for c in ("c4", "c5", "c6"))}
    for case, (correct, total, confusion) in EXPECTED.items():
        assert total == size[case.split("/")[1]] == sum(confusion) and 0 <= correct <= total, case


@pytest.mark.parametrize("batch_size", [3, 64])
def test_one_process_counts(data, batch_size):
    assert evaluate_all(data, batch_size=batch_size) == EXPECTED


@pytest.mark.slow
def test_two_ranks_with_padded_batches_reduce_to_the_same_counts(data, tmp_path):
    """Task a's 8 test images sit in shards of 5 and 3: with batch 3 rank 1 gets a padding batch (label -1)."""
    assert json.loads((data / "a" / "task.json").read_text())["shard_counts"]["test"] == [5, 3]
    out = tmp_path / "ranks.json"
    torchrun("tests/dist/evaluator_ranks.py", str(data), str(out), nproc=2)
    assert json.loads(out.read_text()) == EXPECTED


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reduce_with_routes_beyond_64_tasks_on_one_rank_only(tmp_path):
    """Route ids are not bounded by 64 (a sequence of more tasks): ranks that saw different route sets must
    still all-reduce vectors of one length (this used to fail or hang on mismatched sizes)."""
    out = tmp_path / "reduced.json"
    torchrun("tests/dist/reduce_routes.py", str(out), nproc=2, timeout=240)
    assert json.loads(out.read_text()) == {"correct": 7, "total": 15, "zero_shot_correct": 5,
                                           "routes": {"-1": 3, "3": 4, "5": 5, "70": 3}}
