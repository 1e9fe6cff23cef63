"""Image preprocessing as METHOD.md fixes it, built with open_clip's own ``image_transform``.

Train: RandomResizedCrop(size, scale=data.train_crop_scale, bicubic) -> tensor -> CLIP normalisation.
Eval: Resize(size, bicubic) -> CenterCrop(size) -> tensor -> CLIP normalisation.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from open_clip.transform import AugmentationCfg, image_transform


def make_transforms(image_size: int, crop_scale: Sequence[float] = (0.9, 1.0), *,
                    mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> tuple[Callable, Callable]:
    """``(train_tf, eval_tf)``: PIL image -> normalised float tensor [3, image_size, image_size]."""
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"data.train_crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(crop_scale)}")
    mean_t = tuple(mean) if mean is not None else None
    std_t = tuple(std) if std is not None else None
    train_tf = image_transform(image_size, is_train=True, mean=mean_t, std=std_t,
                               aug_cfg=AugmentationCfg(scale=(lo, hi)))
    eval_tf = image_transform(image_size, is_train=False, mean=mean_t, std=std_t)
    return train_tf, eval_tf
