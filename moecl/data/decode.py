"""Safe decoding of shard samples: images through PIL, ``.cls`` integers, ``.json`` and ``.txt`` text.

Nothing else in a shard is ever interpreted (no pickle, no torch.load): a data folder is untrusted input.
Images of more than PIL's MAX_IMAGE_PIXELS are refused (a small PNG can decode to gigabytes), and 16-bit
or float images are scaled to 8 bits by their own value range (PIL's own conversion clips them to white).
"""
from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from ..errors import DataError
from .untrusted import open_regular, regular_file_problem

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")


class BadSample(Exception):
    """A sample that cannot be used (undecodable image, missing label, ...): skipped and counted."""


_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def is_high_depth(mode: str) -> bool:
    """32-bit integer, 16-bit integer (``I;16`` and its byte orders) and float images."""
    return mode in ("I", "F") or mode.startswith(("I;", "F;"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB; integer/float images are scaled from their [min, max] to [0, 255] (a flat
    one becomes black; NaN becomes 0) instead of clipped at 255, which turns nearly every pixel white."""
    if is_high_depth(img.mode):
        arr = np.asarray(img).astype(np.float64)
        finite = np.isfinite(arr)
        out = np.zeros(arr.shape, dtype=np.uint8)
        if finite.any():
            lo, hi = float(arr[finite].min()), float(arr[finite].max())
            if hi > lo:
                scaled = np.where(finite, (arr - lo) * (255.0 / (hi - lo)), 0.0)
                out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        img = Image.fromarray(out, mode="L")
    return img.convert("RGB")


def image_error(e: BaseException, name: Optional[str]) -> str:
    """PIL's message without its ``<_io.BytesIO object at 0x...>``: the file or sample named instead."""
    text = _BYTESIO.sub(name or "the image bytes", str(e))
    if name and name not in text:
        text = f"{name}: {text}"
    return f"{type(e).__name__}: {text}"


def decode_image(data: bytes, name: Optional[str] = None) -> Image.Image:
    """Bytes -> RGB PIL image, fully decoded (a truncated file fails here, not later in a transform).
    ``name`` (a file or shard/key) only makes error messages say which image it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, rather than warn and decode
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)


def open_image(path: str | Path) -> Image.Image:
    """An image file as an RGB PIL image; a clear DataError naming the file when it cannot be read (a FIFO
    or device in its place is refused, not read)."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise DataError(f"image file {path} {problem}" + ("" if problem == "does not exist" else
                                                           "; refusing to read it"))
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror if e.errno else e}") from None
    try:
        return decode_image(data, str(path))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"cannot read image {path}: {image_error(e, str(path))}") from None


def image_field(sample: dict[str, Any]) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise BadSample("no image (.png/.jpg/...) in sample")


def decode_label(sample: dict[str, Any], num_classes: int | None) -> int:
    if "cls" not in sample:
        raise BadSample("no .cls label in sample")
    try:
        label = int(bytes(sample["cls"]).decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        raise BadSample(f".cls is not an integer: {bytes(sample['cls'])[:20]!r}") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadSample(f"label {label} outside 0..{num_classes - 1}")
    return label


def decode_json(sample: dict[str, Any]) -> dict[str, Any]:
    if "json" not in sample:
        return {}
    try:
        value = json.loads(bytes(sample["json"]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f".json is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {"value": value}


def decode_text(sample: dict[str, Any]) -> str:
    if "txt" not in sample:
        raise BadSample("no .txt caption in sample")
    try:
        return bytes(sample["txt"]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(f".txt is not UTF-8: {e}") from None


def decode_sample_image(sample: dict[str, Any]) -> Image.Image:
    ext = image_field(sample)
    name = f"{sample.get('__key__', '?')}.{ext}"
    try:
        return decode_image(sample[ext], name)
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"cannot decode .{ext} image: {image_error(e, name)}") from None
