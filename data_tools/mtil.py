"""The 11 MTIL datasets from the torchvision-format folders a user already has, into one task each.

Each reader follows the on-disk layout of the torchvision dataset class of the same name (the files
``torchvision.datasets.X(root, download=False)`` reads) and reproduces its sample order and labels, but
reads the annotation files itself: that needs no network, no scipy for most sets, and never unpickles
anything. Splits, class names and prompt templates come from ``benchmarks/mtil.json`` (the benchmark of
ZSCL / MoE-Adapters). CIFAR100's official files are pickles: give an image-folder export
(``cifar100/{train,test}/<class>/*.png``) or pass ``--trust-pickle`` to let torchvision read them.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from moecl.errors import DataError

from .common import benchmark, build_task, few_shot, list_images, random_split
from .writer import Item, WriteOptions

log = logging.getLogger("data_tools")

Loaded = tuple[list[str], dict[str, list[Item]]]  # (class names, {split or "all": items})


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path} not found: expected {what} (the layout torchvision's dataset class reads)")
    return path


def _lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in _need(path, "an annotation file").read_text(encoding="utf-8").splitlines()]


def _spaces(names: list[str]) -> list[str]:
    return [n.replace("_", " ") for n in names]


def _item(path: Path, label: int, base: Path) -> Item:
    return Item(label=label, source=str(path.relative_to(base.parent)), path=str(path))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# One reader per torchvision layout

def read_aircraft(base: Path, spec: dict, **_) -> Loaded:
    """FGVCAircraft: ``fgvc-aircraft-2013b/data/{variants.txt, images_variant_<split>.txt, images/}``."""
    data = base / "data"
    classes = [c.strip() for c in _lines(data / "variants.txt") if c.strip()]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in (spec["train"], spec["test"]):
        items = []
        for line in _lines(data / f"images_variant_{split}.txt"):
            if line.strip():
                image, label = line.strip().split(" ", 1)
                items.append(_item(data / "images" / f"{image}.jpg", index[label], base))
        splits[split] = items
    return _spaces(classes), splits


def read_caltech101(base: Path, spec: dict, **_) -> Loaded:
    """Caltech101: ``caltech101/101_ObjectCategories/<category>/image_NNNN.jpg`` (BACKGROUND_Google dropped)."""
    cats_dir = _need(base / "101_ObjectCategories", "the 101_ObjectCategories folder")
    cats = sorted(p.name for p in cats_dir.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    items = []
    for i, c in enumerate(cats):
        n = len([p for p in (cats_dir / c).iterdir()])
        items.extend(_item(cats_dir / c / f"image_{k:04d}.jpg", i, base) for k in range(1, n + 1))
    return cats, {"all": items}


def read_cifar100(base: Path, spec: dict, *, trust_pickle: bool = False, **_) -> Loaded:
    """CIFAR100 as an image-folder export ``cifar100/{train,test}/<class>/*``, or (``--trust-pickle``) the
    official python files read by torchvision.datasets.CIFAR100."""
    names = benchmark("cil")["cifar100"]["folder_names"]
    index = {n: i for i, n in enumerate(names)}
    index.update({n.replace("_", " "): i for i, n in enumerate(names)})
    if (base / "train").is_dir() and (base / "test").is_dir():
        splits = {}
        for split in ("train", "test"):
            items = []
            for cdir in sorted(p for p in (base / split).iterdir() if p.is_dir()):
                if cdir.name not in index:
                    raise DataError(f"{cdir}: '{cdir.name}' is not a CIFAR100 class name (e.g. apple, "
                                    "aquarium_fish, ...)")
                items.extend(_item(p, index[cdir.name], base) for p in list_images(cdir))
            splits[split] = items
        return names, splits
    if not trust_pickle:
        raise DataError(f"{base}/train and {base}/test (an image-folder export of CIFAR100) not found. The "
                        "official CIFAR100 files are Python pickles, which can run code when loaded: moecl does "
                        "not open them unless you pass --trust-pickle (only for files you trust), with the "
                        f"official 'cifar-100-python' folder inside {base.parent}")
    import torchvision

    splits = {}
    for split in ("train", "test"):
        ds = torchvision.datasets.CIFAR100(str(base.parent), train=split == "train", download=False)
        splits[split] = [Item(label=int(y), source=f"cifar-100-python/{split}#{k}", data=_png(x))
                         for k, (x, y) in enumerate(zip(ds.data, ds.targets))]
    return names, splits


def read_dtd(base: Path, spec: dict, partition: int = 1, **_) -> Loaded:
    """DTD: ``dtd/dtd/{images/<class>/*.jpg, labels/<split><partition>.txt}``."""
    data = base / "dtd"
    splits, classes_all = {}, set()
    raw = {}
    for split in (spec["train"], spec["test"]):
        pairs = []
        for line in _lines(data / "labels" / f"{split}{partition}.txt"):
            if line.strip():
                cls, name = line.strip().split("/")
                pairs.append((cls, name))
                classes_all.add(cls)
        raw[split] = pairs
    classes = sorted(classes_all)
    index = {c: i for i, c in enumerate(classes)}
    for split, pairs in raw.items():
        splits[split] = [_item(data / "images" / c / n, index[c], base) for c, n in pairs]
    return _spaces(classes), splits


def read_eurosat(base: Path, spec: dict, **_) -> Loaded:
    """EuroSAT: ``eurosat/2750/<class>/*.jpg`` (an ImageFolder: sorted classes, sorted files)."""
    root = _need(base / "2750", "the 2750 folder of EuroSAT RGB")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [_item(p, i, base) for i, c in enumerate(classes) for p in list_images(root / c)]
    return classes, {"all": items}


def _loadmat(path: Path) -> dict:
    _need(path, "a MATLAB annotation file")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"reading {path} needs scipy (as torchvision does for this dataset): pip install scipy") \
            from None
    return loadmat(str(path), squeeze_me=True)


def read_flowers(base: Path, spec: dict, **_) -> Loaded:
    """Flowers102: ``flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}``."""
    setid = _loadmat(base / "setid.mat")
    labels = _loadmat(base / "imagelabels.mat")["labels"]
    keys = {"train": "trnid", "val": "valid", "test": "tstid"}
    splits = {}
    for split in (spec["train"], spec["test"]):
        ids = np.atleast_1d(setid[keys[split]]).tolist()
        splits[split] = [_item(base / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1, base) for i in ids]
    return [], splits


def read_food(base: Path, spec: dict, **_) -> Loaded:
    """Food101: ``food-101/{meta/<split>.json, images/<class>/<id>.jpg}``."""
    splits, classes = {}, None
    for split in (spec["train"], spec["test"]):
        meta = json.loads(_need(base / "meta" / f"{split}.json", "Food101's meta json").read_text())
        classes = sorted(meta)
        index = {c: i for i, c in enumerate(classes)}
        splits[split] = [_item(base / "images" / f"{rel}.jpg", index[c], base)
                         for c, rels in meta.items() for rel in rels]
    return _spaces(classes or []), splits


def _read_idx(path: Path) -> np.ndarray:
    """An MNIST idx file (plain or .gz): a header of dimensions, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_mnist(base: Path, spec: dict, **_) -> Loaded:
    """MNIST: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (never the pickled .pt)."""
    raw = base / "raw"
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            path = raw / name if (raw / name).exists() else raw / f"{name}.gz"
            found.append(_need(path, f"MNIST's {name} file"))
        images, labels = _read_idx(found[0]), _read_idx(found[1])
        splits[split] = [Item(label=int(y), source=f"MNIST/raw/{prefix}#{k}", data=_png(x))
                         for k, (x, y) in enumerate(zip(images, labels))]
    return [], splits


def read_pets(base: Path, spec: dict, **_) -> Loaded:
    """OxfordIIITPet: ``oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}``."""
    splits, names = {}, {}
    for split in (spec["train"], spec["test"]):
        items = []
        for line in _lines(base / "annotations" / f"{split}.txt"):
            if line.strip():
                image_id, label = line.split()[:2]
                y = int(label) - 1
                names[y] = " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))
                items.append(_item(base / "images" / f"{image_id}.jpg", y, base))
        splits[split] = items
    return [names[i] for i in sorted(names)], splits


def read_cars(base: Path, spec: dict, **_) -> Loaded:
    """StanfordCars: ``stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/,
    cars_test_annos_withlabels.mat, cars_test/}``."""
    classes = [str(c) for c in _loadmat(base / "devkit" / "cars_meta.mat")["class_names"].tolist()]
    splits = {}
    for split, annos, folder in (("train", base / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 ("test", base / "cars_test_annos_withlabels.mat", "cars_test")):
        items = [_item(base / folder / str(a["fname"]), int(a["class"]) - 1, base)
                 for a in np.atleast_1d(_loadmat(annos)["annotations"])]
        splits[split] = items
    return _spaces(classes), splits


def read_sun397(base: Path, spec: dict, **_) -> Loaded:
    """SUN397: ``SUN397/{ClassName.txt, <letter>/<class>[/<sub>]/sun_*.jpg}``. torchvision lists files with
    rglob (file-system order); we sort them so the seeded split is the same on every machine."""
    classes = [c[3:].strip() for c in _lines(base / "ClassName.txt") if c.strip()]
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for p in sorted(base.rglob("sun_*.jpg")):
        cls = "/".join(p.relative_to(base).parts[1:-1])
        if cls not in index:
            raise DataError(f"{p}: folder '{cls}' is not listed in {base / 'ClassName.txt'}")
        items.append(_item(p, index[cls], base))
    return _spaces(classes), {"all": items}


READERS: dict[str, Callable[..., Loaded]] = {
    "Aircraft": read_aircraft, "Caltech101": read_caltech101, "CIFAR100": read_cifar100, "DTD": read_dtd,
    "EuroSAT": read_eurosat, "Flowers": read_flowers, "Food": read_food, "MNIST": read_mnist,
    "OxfordPet": read_pets, "StanfordCars": read_cars, "SUN397": read_sun397,
}


def load_dataset(name: str, src: Path, *, trust_pickle: bool = False, shots: Optional[int] = None,
                 seed: int = 1) -> tuple[list[str], dict[str, list[Item]], dict]:
    """Class names and ``{"train": items, "test": items}`` of one MTIL dataset (few-shot if ``shots``)."""
    spec = benchmark("mtil")["datasets"][name]
    base = Path(src) / spec["folder"]
    if not base.exists():
        raise DataError(f"{name}: {base} not found; put the torchvision-format '{spec['folder']}' folder of "
                        f"{spec['torchvision']} under {src}, or leave {name} out with --datasets")
    disk_names, raw = READERS[name](base, spec, trust_pickle=trust_pickle)
    classnames = disk_names if spec["classnames"] == "disk" else list(spec["classnames"])
    if "all" in raw:
        items = raw["all"]
        train_idx, test_idx = random_split(len(items), 0.8, 42)
        splits = {"train": [items[i] for i in train_idx], "test": [items[i] for i in test_idx]}
    else:
        splits = {"train": raw[spec["train"]], "test": raw[spec["test"]]}
    labels = {it.label for its in splits.values() for it in its}
    if labels and max(labels) >= len(classnames):
        raise DataError(f"{name}: labels reach {max(labels)} but there are {len(classnames)} class names; "
                        f"is {base} complete?")
    if shots is not None:
        keep = few_shot([it.label for it in splits["train"]], shots, seed)
        splits["train"] = [splits["train"][i] for i in keep]
    return classnames, splits, spec


def convert_mtil(src: str | Path, out_root: str | Path, *, datasets: Optional[list[str]] = None,
                 trust_pickle: bool = False, shots: Optional[int] = None, seed: int = 1,
                 skip_missing: bool = False, opts: Optional[WriteOptions] = None) -> list[Path]:
    """Convert the MTIL datasets found under ``src`` into ``out_root/<Dataset>/``; returns task folders."""
    bench = benchmark("mtil")
    names = datasets or list(bench["order1"])
    unknown = [n for n in names if n not in READERS]
    if unknown:
        raise DataError(f"unknown MTIL dataset(s) {', '.join(unknown)}; choose from {', '.join(READERS)}")
    if shots is not None and shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    done = []
    for name in names:
        try:
            classnames, splits, spec = load_dataset(name, Path(src), trust_pickle=trust_pickle, shots=shots, seed=seed)
        except DataError as e:
            if skip_missing and "not found" in str(e):
                log.warning("skipping %s: %s", name, e)
                continue
            raise
        templates = spec["templates"]
        done.append(build_task(out_root, name, classnames=classnames, train_template=templates[0],
                               eval_templates=templates, splits=splits, opts=opts or WriteOptions(),
                               source={"builder": "data_tools mtil", "src": str(src), "dataset": name,
                                       "torchvision": spec["torchvision"], "shots": shots,
                                       "few_shot_seed": seed if shots else None,
                                       "split": "random80 seed 42" if spec["train"] == "random80" else
                                       f"{spec['train']}/{spec['test']}"}))
    return done
