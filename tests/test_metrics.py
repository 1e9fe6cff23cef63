"""Metrics on hand-built matrices (answers worked out by hand) and on ZSCL's published matrices."""
from pathlib import Path

import numpy as np
import pytest

from moecl.evaluation.metrics import (backward_transfer, cil_metrics, forgetting, mtil_metrics,
                                      routing_confusion)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "zscl_mtil"

# ZSCL Table 3 (MTIL order I), as published: file -> (Transfer, Avg, Last)
ZSCL_TABLE = {
    "zscl_t3_1.npy": (44.6, 55.9, 77.3),  # Continual-FT
    "zscl_t3_2.npy": (56.9, 64.7, 74.6),  # LwF
    "zscl_t3_3.npy": (50.4, 65.7, 80.1),  # iCaRL
    "zscl_t3_4.npy": (57.2, 65.1, 76.6),  # LwF-VR
    "zscl_t3_5.npy": (52.3, 60.7, 77.7),  # WiSE-FT
    "zscl_t3_6.npy": (62.2, 72.6, 84.5),  # ZSCL*
    "zscl_t3_7.npy": (68.1, 75.4, 83.6),  # ZSCL
}

A3 = [[80, 50, 30],
      [70, 90, 40],
      [60, 85, 95]]

A4 = [[10, 20, 30, 40],
      [11, 50, 32, 44],
      [12, 48, 60, 46],
      [13, 47, 58, 70]]


def test_mtil_3x3_by_hand():
    m = mtil_metrics(A3)
    # Transfer: j=1 -> A[0][1] = 50; j=2 -> (A[0][2] + A[1][2]) / 2 = (30 + 40) / 2 = 35; (50 + 35) / 2 = 42.5
    assert m["transfer"] == pytest.approx(42.5)
    # Avg: (80+50+30 + 70+90+40 + 60+85+95) / 9 = 600 / 9
    assert m["avg"] == pytest.approx(600 / 9)
    # Last: (60 + 85 + 95) / 3 = 80
    assert m["last"] == pytest.approx(80.0)
    # BWT: ((60 - 80) + (85 - 90)) / 2 = -12.5; forgetting: (max(80,70) - 60 + max(50,90) - 85) / 2 = 12.5
    assert m["bwt"] == pytest.approx(-12.5)
    assert m["forgetting"] == pytest.approx(12.5)
    assert m["complete"] is True
    # per dataset: col 0 (None, 70, 60); col 1 (50, 75, 85); col 2 (35, 55, 95)
    pd = m["per_dataset"]
    assert [d["transfer"] for d in pd] == [None, pytest.approx(50.0), pytest.approx(35.0)]
    assert [d["avg"] for d in pd] == [pytest.approx(70.0), pytest.approx(75.0), pytest.approx(55.0)]
    assert [d["last"] for d in pd] == [60.0, 85.0, 95.0]


def test_mtil_4x4_by_hand():
    m = mtil_metrics(np.array(A4))
    # Transfer: j=1: 20; j=2: (30+32)/2 = 31; j=3: (40+44+46)/3 = 130/3; mean = (20 + 31 + 130/3) / 3
    assert m["transfer"] == pytest.approx((20 + 31 + 130 / 3) / 3)  # 31.444...
    # Avg: row sums 100 + 137 + 166 + 188 = 591 over 16 entries
    assert m["avg"] == pytest.approx(591 / 16)
    # Last: 188 / 4 = 47
    assert m["last"] == pytest.approx(47.0)
    # BWT: ((13-10) + (47-50) + (58-60)) / 3 = -2/3
    assert backward_transfer(A4) == pytest.approx(-2 / 3)
    # Forgetting: (max(10,11,12)-13 = -1) + (max(20,50,48)-47 = 3) + (max(30,32,60)-58 = 2) = 4, / 3
    assert forgetting(A4) == pytest.approx(4 / 3)


def test_held_out_columns_leave_task_metrics_alone():
    a = np.hstack([np.array(A3, dtype=float), [[65], [64], [63]]])
    m = mtil_metrics(a, num_tasks=3)
    assert (m["transfer"], m["avg"], m["last"]) == pytest.approx((42.5, 600 / 9, 80.0))
    assert m["held_out_avg"] == pytest.approx(64.0) and m["held_out_last"] == pytest.approx(63.0)
    # a held-out column was never trained on: every row counts for its transfer
    assert m["per_dataset"][3] == {"transfer": pytest.approx(64.0), "avg": pytest.approx(64.0),
                                   "last": 63.0, "held_out": True}


def test_partial_run():
    m = mtil_metrics(A3[:2], num_tasks=3)
    # Transfer still (50 + 35) / 2; Avg = (80+50+30+70+90+40) / 6 = 60; Last = (70+90+40)/3
    assert m["transfer"] == pytest.approx(42.5)
    assert m["avg"] == pytest.approx(60.0)
    assert m["last"] == pytest.approx(200 / 3)
    assert m["complete"] is False and m["bwt"] is None and m["forgetting"] is None


def test_single_task():
    m = mtil_metrics([[70.0]])
    assert m["transfer"] is None and m["avg"] == 70.0 and m["last"] == 70.0 and m["bwt"] is None


@pytest.mark.parametrize("bad", [[[1, 2], [3, 4], [5, 6]], [[np.nan, 1], [1, 1]], [1, 2, 3]])
def test_bad_matrices_raise(bad):
    with pytest.raises(ValueError):
        mtil_metrics(bad)


def test_cil_by_hand():
    m = cil_metrics([90.0, 80.0, 70.0, 64.0])
    assert m["avg"] == pytest.approx(76.0)  # (90 + 80 + 70 + 64) / 4 = 304 / 4
    assert m["last"] == 64.0
    assert m["per_step"] == [90.0, 80.0, 70.0, 64.0]
    with pytest.raises(ValueError):
        cil_metrics([])


def test_routing_confusion_by_hand():
    true = [0, 0, 0, 1, 1, 2, 2, 2, 3]          # test set 3 is held out
    route = [0, 0, -1, 1, 0, 2, 2, -1, -1]
    c = routing_confusion(true, route, num_tasks=3)
    assert c.tolist() == [[2, 0, 0, 1],
                          [1, 1, 0, 0],
                          [0, 0, 2, 1],
                          [0, 0, 0, 1]]
    f = routing_confusion(true, route, num_tasks=3, normalize=True)
    np.testing.assert_allclose(f[0], [2 / 3, 0, 0, 1 / 3])
    np.testing.assert_allclose(f.sum(axis=1), 1.0)
    empty_row = routing_confusion([0], [0], num_tasks=2, normalize=True)
    assert empty_row.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        routing_confusion([0], [3], num_tasks=3)


def _zscl_dirs():
    dirs = [DATA]
    for shared in (ROOT.parent / "shared", ROOT / "shared"):
        if (shared / "external" / "zscl_mtil").is_dir():
            dirs.append(shared / "external" / "zscl_mtil")
            break
    return dirs


@pytest.mark.parametrize("folder", _zscl_dirs(), ids=lambda p: str(p.parent.name))
@pytest.mark.parametrize("name", sorted(ZSCL_TABLE))
def test_zscl_published_matrices(folder, name):
    raw = np.load(folder / name, allow_pickle=False)
    matrix = np.delete(raw.reshape(11, -1), 2, axis=1)  # drop CIFAR10, as ZSCL's notebook does
    assert matrix.shape == (11, 11)
    m = mtil_metrics(matrix)
    assert tuple(round(m[k], 1) for k in ("transfer", "avg", "last")) == ZSCL_TABLE[name]


def test_repo_copy_matches_shared():
    dirs = _zscl_dirs()
    if len(dirs) < 2:
        pytest.skip("shared/ not beside the repo")
    for name in ZSCL_TABLE:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes()
