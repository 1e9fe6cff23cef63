"""Safe decoding of shard samples: images through PIL, ``.cls`` integers, ``.json`` and ``.txt`` text.

Nothing else in a shard is ever interpreted (no pickle, no torch.load): a data folder is untrusted input.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")


class BadSample(Exception):
    """A sample that cannot be used (undecodable image, missing label, ...): skipped and counted."""


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, fully decoded (a truncated file fails here, not later in a transform)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """An image file as an RGB PIL image; a clear DataError naming the file when it cannot be read."""
    path = Path(path)
    try:
        return decode_image(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"cannot read image {path}: {e}") from None


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
    try:
        return decode_image(sample[ext])
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"cannot decode .{ext} image: {type(e).__name__}: {e}") from None
