"""A deterministic, procedurally drawn world of visually distinct domains, for tests and the demo.

Each domain is a task with real-word class names ("red circle", "french flag", "three o'clock"), its own
background and colour statistics (so a tiny ViT can tell domains apart) and its own prompt templates. A
``pretrain`` image-caption set covers every domain, including those held out of the task sequence, so a
tiny CLIP pretrained on it has zero-shot ability to keep. Every image is a pure function of
(world seed, domain, split, class, index): the same flags give the same world on any machine.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .taskfile import write_sequence, write_task
from .writer import Item, WriteOptions, write_split

WORLD_VERSION = 1
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Domain:
    name: str
    classnames: tuple[str, ...]
    train_template: str
    eval_templates: tuple[str, ...]
    paint: Callable[[int, np.random.Generator, int], Image.Image]


# ---------------------------------------------------------------------------------------------------------
# Painters: (class index, rng, canvas size S) -> RGB image of S x S (drawn large, downsampled later)

def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _rotate_points(points, angle_deg: float, cx: float, cy: float):
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def _paint_shapes(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    colors = {"red": (215, 45, 40), "blue": (40, 75, 215)}
    color_name, shape = SHAPES_CLASSES[label].split()
    bg = int(rng.integers(195, 236))
    img = Image.new("RGB", (S, S), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    fill = _jitter(rng, colors[color_name], 30)
    r = S * rng.uniform(0.2, 0.3)
    cx, cy = S / 2 + rng.uniform(-0.12, 0.12) * S, S / 2 + rng.uniform(-0.12, 0.12) * S
    angle = rng.uniform(-15, 15)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        d.polygon(_rotate_points(pts, angle, cx, cy), fill=fill)
    elif shape == "triangle":
        pts = [(cx, cy - 1.15 * r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
        d.polygon(_rotate_points(pts, angle, cx, cy), fill=fill)
    else:  # cross
        w = r * 0.38
        for pts in ([(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
                    [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]):
            d.polygon(_rotate_points(pts, angle, cx, cy), fill=fill)
    return img


def _paint_textures(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    kind = TEXTURE_CLASSES[label]
    dark = tuple(int(v) for v in rng.integers(25, 90, 3))
    light = tuple(int(v) for v in rng.integers(150, 250, 3))
    img = Image.new("RGB", (S, S), dark)
    d = ImageDraw.Draw(img)
    p = S / rng.uniform(4.0, 6.0)  # period
    off = rng.uniform(0, p)
    t = max(2, int(p * 0.45))
    if kind == "horizontal stripes":
        for k in range(-1, int(S / p) + 2):
            y = k * p + off
            d.rectangle([0, y, S, y + t], fill=light)
    elif kind == "vertical stripes":
        for k in range(-1, int(S / p) + 2):
            x = k * p + off
            d.rectangle([x, 0, x + t, S], fill=light)
    elif kind == "diagonal stripes":
        for k in range(-int(S / p) - 2, int(2 * S / p) + 2):
            x = k * p + off
            d.polygon([(x, 0), (x + t, 0), (x + t + S, S), (x + S, S)], fill=light)
    elif kind == "checkerboard":
        for i in range(-1, int(S / p) + 2):
            for j in range(-1, int(S / p) + 2):
                if (i + j) % 2 == 0:
                    d.rectangle([i * p + off, j * p + off, (i + 1) * p + off, (j + 1) * p + off], fill=light)
    elif kind == "polka dots":
        r = p * 0.28
        for i in range(-1, int(S / p) + 2):
            for j in range(-1, int(S / p) + 2):
                cx, cy = i * p + off + (p / 2 if j % 2 else 0), j * p + off
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=light)
    elif kind == "grid":
        w = max(2, int(p * 0.18))
        for k in range(-1, int(S / p) + 2):
            d.rectangle([k * p + off, 0, k * p + off + w, S], fill=light)
            d.rectangle([0, k * p + off, S, k * p + off + w], fill=light)
    elif kind == "zigzag":
        for k in range(-1, int(S / p) + 2):
            y0 = k * p + off
            pts = [(x, y0 + (p * 0.35 if (x // (p / 1.0)) % 2 else 0)) for x in np.arange(0, S + p, p)]
            d.line(pts, fill=light, width=t)
    else:  # concentric circles
        cx, cy = S / 2 + rng.uniform(-0.2, 0.2) * S, S / 2 + rng.uniform(-0.2, 0.2) * S
        for k in range(int(1.5 * S / p), 0, -1):
            r = k * p
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=light if k % 2 else dark)
    return img


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _paint_digits(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    bg = int(rng.integers(0, 35))
    glyph = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(glyph)
    size = int(S * rng.uniform(0.6, 0.8))
    cx, cy = S / 2 + rng.uniform(-0.1, 0.1) * S, S / 2 + rng.uniform(-0.1, 0.1) * S
    d.text((cx, cy), str(label), font=_font(size), fill=255, anchor="mm",
           stroke_width=int(rng.integers(1, 4)) * S // 64, stroke_fill=255)
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, center=(cx, cy))
    ink = _jitter(rng, (245, 240, 200), 12)
    img = Image.new("RGB", (S, S), (bg, bg, bg + 5))
    img.paste(Image.new("RGB", (S, S), ink), mask=glyph)
    return img


def _paint_arrows(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    img = Image.new("RGB", (S, S), _jitter(rng, (235, 185, 35), 18))
    d = ImageDraw.Draw(img)
    cx, cy = S / 2 + rng.uniform(-0.08, 0.08) * S, S / 2 + rng.uniform(-0.08, 0.08) * S
    L, w, h = S * rng.uniform(0.34, 0.42), S * rng.uniform(0.06, 0.09), S * rng.uniform(0.16, 0.2)
    pts = [(cx - L, cy - w), (cx + L - h, cy - w), (cx + L - h, cy - h), (cx + L, cy),
           (cx + L - h, cy + h), (cx + L - h, cy + w), (cx - L, cy + w)]
    angle = -45 * label + rng.uniform(-8, 8)  # image y points down: negative angle turns counter-clockwise
    d.polygon(_rotate_points(pts, angle, cx, cy), fill=_jitter(rng, (20, 20, 20), 15))
    return img


_FLAG_COLORS = {"blue": (0, 60, 160), "white": (245, 245, 245), "red": (210, 30, 45), "green": (0, 140, 70),
                "orange": (245, 130, 40), "black": (15, 15, 15), "yellow": (250, 215, 30), "gold": (255, 200, 0)}
_FLAGS = {"french flag": ("v", "blue", "white", "red"), "italian flag": ("v", "green", "white", "red"),
          "irish flag": ("v", "green", "white", "orange"), "belgian flag": ("v", "black", "yellow", "red"),
          "german flag": ("h", "black", "red", "gold"), "dutch flag": ("h", "red", "white", "blue"),
          "russian flag": ("h", "white", "blue", "red"), "austrian flag": ("h", "red", "white", "red")}


def _paint_flags(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    orient, *bands = _FLAGS[FLAG_CLASSES[label]]
    img = Image.new("RGB", (S, S), _jitter(rng, (140, 195, 235), 15))
    d = ImageDraw.Draw(img)
    x0, y0 = S * rng.uniform(0.1, 0.16), S * rng.uniform(0.12, 0.25)
    fw, fh = S * rng.uniform(0.74, 0.84), S * rng.uniform(0.5, 0.62)
    d.rectangle([x0 - S * 0.05, y0 - S * 0.04, x0 - S * 0.02, S], fill=(110, 110, 110))  # pole
    flag = Image.new("RGB", (int(fw), int(fh)))
    fd = ImageDraw.Draw(flag)
    for k, band in enumerate(bands):
        color = _jitter(rng, _FLAG_COLORS[band], 12)
        if orient == "v":
            fd.rectangle([k * fw / 3, 0, (k + 1) * fw / 3, fh], fill=color)
        else:
            fd.rectangle([0, k * fh / 3, fw, (k + 1) * fh / 3], fill=color)
    arr = np.asarray(flag)
    amp, phase = rng.uniform(0.0, 0.05) * S, rng.uniform(0, 2 * math.pi)
    shifts = (amp * np.sin(np.linspace(0, 2 * math.pi, arr.shape[1]) + phase)).astype(int)
    canvas = np.asarray(img).copy()
    for x in range(arr.shape[1]):
        ys = int(y0) + shifts[x]
        top, bottom = max(0, ys), min(S, ys + arr.shape[0])
        if bottom > top and 0 <= int(x0) + x < S:
            canvas[top:bottom, int(x0) + x] = arr[top - ys:bottom - ys, x]
    return Image.fromarray(canvas)


_COLORS = {"red": (210, 35, 35), "orange": (240, 135, 25), "yellow": (240, 220, 40), "green": (45, 160, 55),
           "blue": (35, 80, 210), "purple": (130, 50, 170), "pink": (245, 140, 185), "brown": (120, 75, 35)}


def _paint_colors(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    base = np.array(_jitter(rng, _COLORS[COLOR_CLASSES[label]], 18), dtype=np.float32)
    field = rng.uniform(0.75, 1.15, (5, 5)).astype(np.float32)
    smooth = np.asarray(Image.fromarray((field * 100).astype(np.uint8)).resize((S, S), Image.BICUBIC),
                        dtype=np.float32) / 100.0
    arr = np.clip(base[None, None, :] * smooth[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


_CLOCK_HOURS = {"twelve o'clock": 12, "two o'clock": 2, "four o'clock": 4, "six o'clock": 6,
                "eight o'clock": 8, "ten o'clock": 10}


def _paint_clocks(label: int, rng: np.random.Generator, S: int) -> Image.Image:
    img = Image.new("RGB", (S, S), _jitter(rng, (25, 80, 45), 15))
    d = ImageDraw.Draw(img)
    cx, cy = S / 2 + rng.uniform(-0.06, 0.06) * S, S / 2 + rng.uniform(-0.06, 0.06) * S
    r = S * rng.uniform(0.36, 0.44)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (240, 240, 230), 10), outline=(20, 20, 20),
              width=max(2, S // 32))
    hour = _CLOCK_HOURS[CLOCK_CLASSES[label]] % 12
    for angle, length, width in ((hour * 30, 0.55, S // 14), (0, 0.85, S // 28)):
        a = math.radians(angle + rng.uniform(-4, 4))
        d.line([(cx, cy), (cx + length * r * math.sin(a), cy - length * r * math.cos(a))], fill=(15, 15, 15),
               width=max(2, width))
    return img


SHAPES_CLASSES = ("red circle", "blue circle", "red square", "blue square", "red triangle", "blue triangle",
                  "red cross", "blue cross")
TEXTURE_CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots",
                   "grid", "zigzag", "concentric circles")
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ARROW_CLASSES = ("right arrow", "upper right arrow", "up arrow", "upper left arrow", "left arrow",
                 "lower left arrow", "down arrow", "lower right arrow")
FLAG_CLASSES = tuple(_FLAGS)
COLOR_CLASSES = tuple(_COLORS)
CLOCK_CLASSES = tuple(_CLOCK_HOURS)

DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("shapes", SHAPES_CLASSES, "a drawing of a {}.",
           ("a drawing of a {}.", "a picture of a {}.", "a simple {} shape.", "a {} on a gray background."),
           _paint_shapes),
    Domain("textures", TEXTURE_CLASSES, "a photo of a {} texture.",
           ("a photo of a {} texture.", "a pattern of {}.", "a close-up of {}.", "fabric with {}."),
           _paint_textures),
    Domain("digits", DIGIT_CLASSES, "a photo of the number {}.",
           ("a photo of the number {}.", "the digit {}.", "a white number {} on black.", "the number {} written."),
           _paint_digits),
    Domain("arrows", ARROW_CLASSES, "a road sign showing a {}.",
           ("a road sign showing a {}.", "a drawing of a {}.", "a black {} on yellow.", "a sign with a {}."),
           _paint_arrows),
    Domain("flags", FLAG_CLASSES, "a photo of the {}.",
           ("a photo of the {}.", "the {} waving in the wind.", "a picture of a {}.", "a {} on a pole."),
           _paint_flags),
    Domain("colors", COLOR_CLASSES, "a patch of {} color.",
           ("a patch of {} color.", "the color {}.", "a blotchy {} surface.", "something colored {}."),
           _paint_colors),
    Domain("clocks", CLOCK_CLASSES, "a clock showing {}.",
           ("a clock showing {}.", "a photo of a clock at {}.", "the time is {}.", "a wall clock at {}."),
           _paint_clocks),
)}
ALL_DOMAINS = tuple(DOMAINS)
_SPLIT_CODES = {"train": 1, "test": 2, "pretrain": 3}


def render(domain: str, label: int, seed: int, split: str, index: int, size: int) -> Image.Image:
    """The image (size x size, RGB) of sample ``index`` of class ``label`` of ``domain`` in ``split``."""
    rng = np.random.default_rng([seed, ALL_DOMAINS.index(domain), _SPLIT_CODES[split], label, index])
    S = size * SUPERSAMPLE
    big = DOMAINS[domain].paint(label, rng, S)
    small = big.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0.0, 5.0, (size, size, 3))
    arr = np.clip(np.asarray(small, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def captions_for(domain: str, classname: str) -> list[str]:
    """Every caption the pretrain set may pair with an image of this class."""
    dom = DOMAINS[domain]
    out = [dom.train_template, *dom.eval_templates, "a photo of a {}.", "an image of a {}."]
    return list(dict.fromkeys(t.replace("{}", classname) for t in out))


# ---------------------------------------------------------------------------------------------------------
# Building the world

def _items(domain: str, split: str, per_class: int, seed: int, size: int) -> list[Item]:
    items = []
    for label in range(len(DOMAINS[domain].classnames)):
        for i in range(per_class):
            items.append(Item(label=label, source=f"synthetic/{domain}/{split}/{label}/{i}",
                              make=functools.partial(render, domain, label, seed, split, i, size),
                              meta={"domain": domain}, est_bytes=size * size * 2))
    return items


def world_params(*, domains=None, image_size: int = 32, train_per_class: int = 100, test_per_class: int = 30,
                 pretrain_per_class: int = 100, seed: int = 0, held_out: int = 2) -> dict:
    names = list(domains) if domains else list(ALL_DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {', '.join(unknown)}; choose from {', '.join(ALL_DOMAINS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"domains listed twice: {names}")
    for key, value in (("image_size", image_size), ("train_per_class", train_per_class),
                       ("test_per_class", test_per_class)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    if pretrain_per_class < 0 or held_out < 0:
        raise ValueError("pretrain_per_class and held_out must be >= 0")
    return {"version": WORLD_VERSION, "domains": names, "image_size": image_size,
            "train_per_class": train_per_class, "test_per_class": test_per_class,
            "pretrain_per_class": pretrain_per_class, "seed": seed,
            "held_out": min(held_out, max(0, len(names) - 1))}


def _is_built(out: Path, params: dict) -> bool:
    manifest = out / "world.json"
    if not manifest.is_file():
        return False
    try:
        rec = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if rec.get("params") != params or not rec.get("complete"):
        return False
    tasks = list(params["domains"]) + (["pretrain"] if params["pretrain_per_class"] else [])
    return all((out / t / "task.json").is_file() for t in tasks) and (out / "sequence.yaml").is_file()


def build_world(out: str | Path, *, domains: Optional[list[str]] = None, image_size: int = 32,
                train_per_class: int = 100, test_per_class: int = 30, pretrain_per_class: int = 100,
                seed: int = 0, held_out: int = 2, shard_size: int = 1000, workers: int = 0,
                progress: bool = False) -> Path:
    """Write the synthetic world under ``out`` (one task per domain, ``pretrain/``, ``sequence.yaml``).

    A no-op when ``out/world.json`` records a complete world with the same parameters (a cache); an
    interrupted build resumes shard by shard. The last ``held_out`` domains are zero-shot-only in the
    sequence. Returns ``out``.
    """
    out = Path(out)
    params = world_params(domains=domains, image_size=image_size, train_per_class=train_per_class,
                          test_per_class=test_per_class, pretrain_per_class=pretrain_per_class, seed=seed,
                          held_out=held_out)
    if _is_built(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "world.json"
    manifest.write_text(json.dumps({"params": params, "complete": False}, indent=1) + "\n")
    opts = WriteOptions(shard_size=shard_size, workers=workers, progress=progress, image_format="png")
    names = params["domains"]
    for domain in names:
        dom = DOMAINS[domain]
        classnames = list(dom.classnames)
        splits = {split: write_split(out / domain, split, _items(domain, split, n, seed, image_size), classnames,
                                     opts, desc=f"{domain}/{split}")
                  for split, n in (("train", train_per_class), ("test", test_per_class))}
        write_task(out / domain, name=domain, classnames=classnames, train_template=dom.train_template,
                   eval_templates=list(dom.eval_templates), splits=splits,
                   source={"builder": "data_tools synthetic", "params": params})
    if pretrain_per_class:
        items, classnames = [], []
        for domain in names:
            for label, cname in enumerate(DOMAINS[domain].classnames):
                g = len(classnames)
                classnames.append(cname)
                caps = captions_for(domain, cname)
                for i in range(pretrain_per_class):
                    rng = np.random.default_rng([seed, ALL_DOMAINS.index(domain), 99, label, i])
                    items.append(Item(label=g, source=f"synthetic/{domain}/pretrain/{label}/{i}",
                                      make=functools.partial(render, domain, label, seed, "pretrain", i, image_size),
                                      meta={"domain": domain, "captions": caps},
                                      text=caps[int(rng.integers(len(caps)))], est_bytes=image_size ** 2 * 2))
        res = write_split(out / "pretrain", "train", items, classnames, opts, desc="pretrain")
        write_task(out / "pretrain", name="pretrain", classnames=classnames, train_template="a photo of a {}.",
                   eval_templates=["a photo of a {}."], splits={"train": res}, kind="pretrain",
                   source={"builder": "data_tools synthetic", "params": params})
    n_tasks = len(names) - params["held_out"]
    write_sequence(out / "sequence.yaml", name="synthetic", kind="mtil", tasks=names[:n_tasks],
                   held_out=names[n_tasks:], description="the synthetic world built by data_tools synthetic",
                   build=f"python -m data_tools synthetic --out {out}")
    manifest.write_text(json.dumps({"params": params, "complete": True}, indent=1) + "\n")
    return out
