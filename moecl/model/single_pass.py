"""The single-pass layout: when the image adapters start at block ``b > 0``, blocks ``0..b-1`` are the same for
every route, so a test image needs one forward: the shared prefix, a route chosen from the CLS token entering
block ``b``, then the image's own tail. Both functions work through a forward pre-hook on block ``b`` held for
one call only (open_clip's forward is not copied); the model keeps no state between calls.
"""
from __future__ import annotations

from typing import Callable

import torch


class _PrefixDone(Exception):
    """Stops a forward once the wanted token is read (the tail is not needed)."""


def _first_block(model) -> tuple[torch.nn.Module, int]:
    ids = getattr(model, "image_block_ids", [])
    if not ids:
        raise ValueError("the model has no adapted image block: the single-pass layout needs moe.image_blocks "
                         "and moe.towers=both or image")
    return model.clip.visual.transformer.resblocks[ids[0]], ids[0]


def _cls(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x[:, 0] if batch_first else x[0]


@torch.no_grad()
def image_token(model, images: torch.Tensor) -> torch.Tensor:
    """[B, width] CLS token entering the first adapted image block, through plain CLIP (the blocks before it
    carry no adapters, so every route sees this same token). Runs the prefix only."""
    block, _ = _first_block(model)
    slot = model.image_slot
    found: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        found.append(_cls(args[0], slot.batch_first).clone())
        raise _PrefixDone

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with slot.use(None):
            model.clip.visual(images)
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    return found[0]


def encode_image_selected(model, images: torch.Tensor, choose: Callable[[torch.Tensor], torch.Tensor],
                          normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward with the route of each sample chosen inside it: ``choose`` gets the CLS tokens entering the
    first adapted image block ([B, width]) and returns a task id per sample ([B] long, -1 = plain CLIP).
    Returns (image features, routes). Equals ``encode_image(images, routes)`` with those routes."""
    block, _ = _first_block(model)
    slot = model.image_slot
    chosen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        x = args[0]
        routes = choose(_cls(x, slot.batch_first)).to(device=x.device, dtype=torch.long).reshape(-1)
        chosen.append(routes)
        slot.route = model._route(routes, x.shape[0 if slot.batch_first else 1], x.device)  # until the call ends

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with slot.use(None):
            features = model.clip.visual(images)
    finally:
        handle.remove()
    features = torch.nn.functional.normalize(features, dim=-1) if normalize else features
    return features, chosen[0]
