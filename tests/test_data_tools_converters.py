"""The mtil and cil converters on small fake dataset folders laid out like torchvision's."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cil import convert_cil, step_classes, task_names
from data_tools.common import benchmark, random_split
from data_tools.mtil import convert_mtil
from data_tools.writer import WriteOptions
from moecl.data import eval_batches, load_sequence, make_transforms, read_task
from moecl.errors import DataError

QUIET = WriteOptions(shard_size=50, progress=False)


def _img(path: Path, seed: int = 0, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path, format=fmt)


def _idx(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Nine of the eleven MTIL datasets in their torchvision on-disk layouts, a few images each."""
    src = tmp_path_factory.mktemp("raw")
    eurosat = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
               "PermanentCrop", "Residential", "River", "SeaLake"]
    for c, name in enumerate(eurosat):
        for i in range(5):
            _img(src / "eurosat" / "2750" / name / f"{name}_{i}.jpg", c * 10 + i)
    dtd = src / "dtd" / "dtd"
    lines = {"train": [], "test": []}
    for c, name in enumerate(["banded", "blotchy", "zigzagged"]):
        for i in range(4):
            _img(dtd / "images" / name / f"{name}_{i:04d}.jpg", i)
            lines["train" if i < 3 else "test"].append(f"{name}/{name}_{i:04d}.jpg")
    for split, ls in lines.items():
        (dtd / "labels").mkdir(parents=True, exist_ok=True)
        (dtd / "labels" / f"{split}1.txt").write_text("\n".join(ls) + "\n")
    pet = src / "oxford-iiit-pet"
    ann = {"trainval": [], "test": []}
    for k, (breed, label) in enumerate([("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 3)]):
        for i in range(3):
            _img(pet / "images" / f"{breed}_{i}.jpg", k + i)
            ann["test" if i == 2 else "trainval"].append(f"{breed}_{i} {label} {1 + k % 2} 1")
    (pet / "annotations").mkdir(parents=True)
    for split, ls in ann.items():
        (pet / "annotations" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    food = src / "food-101"
    meta = {"train": {}, "test": {}}
    for name in ("apple_pie", "baby_back_ribs"):
        for i in range(3):
            _img(food / "images" / name / f"{i}.jpg", i)
            meta["test" if i == 2 else "train"].setdefault(name, []).append(f"{name}/{i}")
    (food / "meta").mkdir(parents=True)
    for split, m in meta.items():
        (food / "meta" / f"{split}.json").write_text(json.dumps(m))
    air = src / "fgvc-aircraft-2013b" / "data"
    air.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\nBoeing 717\n")
    for split, ids in (("train", range(0, 6)), ("test", range(6, 9))):
        (air / f"images_variant_{split}.txt").write_text(
            "".join(f"{1000 + i} {['707-320', 'A300B4', 'Boeing 717'][i % 3]}\n" for i in ids))
        for i in ids:
            _img(air / "images" / f"{1000 + i}.jpg", i)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _idx(src / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(src / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    for c, name in enumerate(["Faces", "Faces_easy", "Leopards", "BACKGROUND_Google"]):
        for i in range(1, 6):
            _img(src / "caltech101" / "101_ObjectCategories" / name / f"image_{i:04d}.jpg", c + i)
    sun = src / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    for i in range(5):
        _img(sun / "a" / "abbey" / f"sun_a{i}.jpg", i)
        _img(sun / "b" / "bakery" / "shop" / f"sun_b{i}.jpg", i)
    for split, n in (("train", 3), ("test", 1)):
        for name in ("apple", "aquarium_fish"):
            for i in range(n):
                _img(src / "cifar100" / split / name / f"{i}.png", i, fmt="PNG")
    return src


@pytest.fixture(scope="module")
def mtil_root(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mtil")
    convert_mtil(raw, out, datasets=["EuroSAT", "DTD", "OxfordPet", "Food", "Aircraft", "MNIST", "Caltech101",
                                     "SUN397", "CIFAR100"], opts=QUIET)
    return out


def test_mtil_class_names_templates_and_splits(mtil_root):
    spec = benchmark("mtil")["datasets"]
    euro = read_task(mtil_root / "EuroSAT")
    assert euro.classnames[0] == "annual crop land" and euro.counts == {"train": 40, "test": 10}
    assert euro.train_template == "a centered satellite photo of {}." and len(euro.eval_templates) == 3
    dtd = read_task(mtil_root / "DTD")
    assert dtd.classnames == ["banded", "blotchy", "zigzagged"] and dtd.counts == {"train": 9, "test": 3}
    assert dtd.eval_templates == spec["DTD"]["templates"]
    pet = read_task(mtil_root / "OxfordPet")
    assert pet.classnames == ["Abyssinian", "American Bulldog", "Bengal"] and pet.counts == {"train": 6, "test": 3}
    food = read_task(mtil_root / "Food")
    assert food.classnames == ["apple pie", "baby back ribs"] and food.train_template.endswith("a type of food.")
    air = read_task(mtil_root / "Aircraft")
    assert air.classnames == ["707-320", "A300B4", "Boeing 717"] and air.counts == {"train": 6, "test": 3}
    mnist = read_task(mtil_root / "MNIST")
    assert mnist.classnames[3] == "3 - three" and mnist.counts == {"train": 12, "test": 5}
    cal = read_task(mtil_root / "Caltech101")
    assert len(cal.classnames) == 101 and cal.classnames[:2] == ["off-center face", "centered face"]
    assert cal.counts == {"train": 12, "test": 3}  # 15 images (BACKGROUND_Google dropped), 80/20
    sun = read_task(mtil_root / "SUN397")
    assert sun.classnames == ["abbey", "bakery/shop"] and sun.counts == {"train": 8, "test": 2}
    cifar = read_task(mtil_root / "CIFAR100")
    assert len(cifar.classnames) == 100 and cifar.classnames[1] == "aquarium fish"
    assert cifar.counts == {"train": 6, "test": 2}


def test_mtil_random_split_is_torch_random_split_seed_42(mtil_root, raw):
    import torch
    from torch.utils.data import random_split as torch_split
    train_idx, test_idx = random_split(50, 0.8, 42)
    ref = torch_split(range(50), [40, 10], generator=torch.Generator().manual_seed(42))
    assert train_idx == list(ref[0].indices) and test_idx == list(ref[1].indices)
    euro = read_task(mtil_root / "EuroSAT")
    _, eval_tf = make_transforms(8)
    labels = [y for split in ("train", "test") for _, ys, _ in eval_batches(euro, split, batch_size=64,
                                                                            preprocess=eval_tf) for y in ys.tolist()]
    assert sorted(labels) == sorted(list(range(10)) * 5)


def test_mtil_few_shot_is_seeded(raw, tmp_path):
    a = convert_mtil(raw, tmp_path / "a", datasets=["DTD", "EuroSAT"], shots=2, seed=1, opts=QUIET)
    b = convert_mtil(raw, tmp_path / "b", datasets=["DTD", "EuroSAT"], shots=2, seed=1, opts=QUIET)
    for x, y in zip(a, b):
        tx, ty = read_task(x), read_task(y)
        assert tx.counts["train"] == 2 * len(set(tx.classnames) if tx.name == "DTD" else tx.classnames)
        assert tx.sha256 == ty.sha256
    assert read_task(a[1]).counts["test"] == 10  # test sets stay whole


def test_mtil_missing_folders_and_cifar_pickles(raw, tmp_path):
    with pytest.raises(DataError, match="stanford_cars"):
        convert_mtil(raw, tmp_path / "o", datasets=["StanfordCars"], opts=QUIET)
    assert convert_mtil(raw, tmp_path / "o", datasets=["StanfordCars"], skip_missing=True, opts=QUIET) == []
    (tmp_path / "pickled" / "cifar100").mkdir(parents=True)  # no image-folder export inside
    with pytest.raises(DataError, match="--trust-pickle"):
        convert_mtil(tmp_path / "pickled", tmp_path / "o2", datasets=["CIFAR100"], opts=QUIET)


def test_cil_cifar100_steps_follow_the_published_order(tmp_path):
    src = tmp_path / "raw"
    for split in ("train", "test"):
        for name in benchmark("cil")["cifar100"]["folder_names"]:
            _img(src / "cifar100" / split / name / "0.png", 1, fmt="PNG")
    out = tmp_path / "cil"
    convert_cil("cifar100", src, out, steps=[10], opts=QUIET)
    seq = load_sequence(out, "cifar100_10")  # the shipped sequence finds every step
    assert seq.kind == "cil" and len(seq.tasks) == 10
    order = benchmark("cil")["cifar100"]["order"]
    published = json.loads((Path(__file__).parent / "data" / "published_cil_orders.json").read_text())["cifar100"]
    assert order == published  # the implementation's JSON against the order vendored from the published code
    first, last = seq.tasks[0], seq.tasks[-1]
    assert first.class_ids == order[:10] and first.classnames[:2] == ["television", "apple"]  # ids 87, 0
    assert first.train_template == "a bad photo of a {}." and first.counts == {"train": 10, "test": 10}
    assert last.cil["seen_class_ids"] == order and last.cil["step"] == 9
    assert len(last.cil["seen_classnames"]) == 100


def test_cil_tinyimagenet_base_plus_steps(tmp_path):
    spec = benchmark("cil")["tinyimagenet"]
    published = json.loads((Path(__file__).parent / "data" / "published_cil_orders.json").read_text())
    # the implementation's JSON against the order and class table vendored from the published CIL code
    assert spec["order"] == published["tinyimagenet"] and spec["wnids"] == published["tinyimagenet_wnids"]
    base = tmp_path / "raw" / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(spec["wnids"]) + "\n")
    ann = []
    for k, w in enumerate(spec["wnids"]):
        _img(base / "train" / w / "images" / f"{w}_0.JPEG", k)
        _img(base / "val" / "images" / f"val_{k}.JPEG", k)
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t6\t6")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    assert [len(c) for c in step_classes("tinyimagenet", 5)] == [100] + [20] * 5
    convert_cil("tinyimagenet", tmp_path / "raw", tmp_path / "cil", steps=[5], opts=QUIET)
    seq = load_sequence(tmp_path / "cil", "tinyimagenet_100_5")
    assert [t.name for t in seq.tasks] == task_names("tinyimagenet", 5)
    assert seq.tasks[0].counts == {"train": 100, "test": 100} and seq.tasks[1].num_classes == 20
    assert seq.tasks[0].class_ids[0] == 131 and seq.tasks[0].classnames[0] == "Persian cat"


def test_flowers_and_cars_readers_with_stubbed_mat_files(tmp_path, monkeypatch):
    """Their annotations are MATLAB files (scipy reads them, as in torchvision): the layout logic is
    checked here with the parsed contents stubbed in."""
    import data_tools.mtil as mtil
    flowers, cars = tmp_path / "flowers-102", tmp_path / "stanford_cars"
    for i in range(1, 7):
        _img(flowers / "jpg" / f"image_{i:05d}.jpg", i)
    for split in ("train", "test"):
        for i in range(3):
            _img(cars / f"cars_{split}" / f"{i:05d}.jpg", i)
    mats = {
        "setid.mat": {"trnid": np.array([1, 2, 3]), "valid": np.array([4]), "tstid": np.array([5, 6])},
        "imagelabels.mat": {"labels": np.array([1, 2, 1, 2, 102, 1])},
        "cars_meta.mat": {"class_names": np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"])},
        "cars_train_annos.mat": {"annotations": [{"fname": f"{i:05d}.jpg", "class": 1 + i % 2} for i in range(3)]},
        "cars_test_annos_withlabels.mat": {"annotations": [{"fname": f"{i:05d}.jpg", "class": 2} for i in range(3)]},
    }
    for name in mats:
        (tmp_path / name).touch()
    monkeypatch.setattr(mtil, "_loadmat", lambda path: mats[Path(path).name])
    out = convert_mtil(tmp_path, tmp_path / "out", datasets=["Flowers", "StanfordCars"], opts=QUIET)
    fl, car = read_task(out[0]), read_task(out[1])
    assert fl.counts == {"train": 3, "test": 2} and fl.classnames[101] == "blackberry lily"
    assert fl.train_template == "a photo of a {}, a type of flower."
    assert car.classnames == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert car.counts == {"train": 3, "test": 3} and len(car.eval_templates) == 9
