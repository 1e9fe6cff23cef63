"""DDAS at the first adapted image block (``ddas.feature=block``): the single-pass layout's selector.

With ``moe.image_blocks`` starting at block ``b > 0`` the blocks before ``b`` are shared by every route, so the
selector can read the CLS token entering block ``b`` and the routed forward can go on from there: one image
forward per test image instead of a plain pass (for DDAS) and a routed pass. Fitted and calibrated exactly as
today's DDAS after each task (same split, quantile x margin), on that token instead of the final embedding.
These helpers are what the trainer, the evaluator and ``moecl predict`` call; the model side is
``moecl.model.single_pass``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import Config, DDASConfig
from .autoencoder import AutoencoderStats, fit_autoencoder
from .gaussian import fit_gaussian
from .selector import DDASSelector


def new_selector(cfg: Config, model: Any) -> DDASSelector:
    """An empty selector reading what ``cfg.ddas.feature`` names (the block: the model's first adapted image block)."""
    if cfg.ddas.feature == "block" and cfg.train.method == "moe-adapters" and cfg.ddas.enabled:
        return DDASSelector(feature_block=model.image_block_ids[0])
    return DDASSelector()


def is_single_pass(selector: Any) -> bool:
    return getattr(selector, "feature_block", None) is not None


def _check_block(selector: DDASSelector, model: Any) -> None:
    first = model.image_block_ids[0] if getattr(model, "image_block_ids", None) else None
    if selector.feature_block != first:
        raise ValueError(f"the DDAS selector reads the CLS token entering image block {selector.feature_block}, but "
                         f"the model's first adapted image block is {first}: load the run with its own config")


@torch.no_grad()
def selector_input(selector: Any, model: Any, images: torch.Tensor) -> torch.Tensor:
    """What ``selector`` reads from ``images``: the CLS token entering its block (prefix only), or the frozen
    CLIP's normalised image embedding (today's DDAS)."""
    if is_single_pass(selector):
        _check_block(selector, model)
        return model.image_token(images)
    return model.encode_image(images, -1, normalize=True)


def fit_scorer(features: torch.Tensor, cfg: DDASConfig, seed: int = 0) -> tuple[Any, AutoencoderStats]:
    """One task's scorer (``ddas.scorer``: autoencoder or gaussian) and its calibrated threshold."""
    if cfg.scorer == "gaussian":
        return fit_gaussian(features, cfg, seed)
    return fit_autoencoder(features, cfg, seed)


@torch.no_grad()
def single_pass(model: Any, images: torch.Tensor, selector: Any, decision: str = "sample"
                ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(normalised fp32 image features, route per image, DDAS errors [N, T]) from one forward, or None when
    ``selector`` reads the final embedding (then routing needs its own plain pass, as before)."""
    if not is_single_pass(selector):
        return None
    _check_block(selector, model)
    errors: list[torch.Tensor] = []

    def choose(token: torch.Tensor) -> torch.Tensor:
        err = selector.errors(token)
        errors.append(err)
        return selector.select_from_errors(err, decision)

    feats, routes = model.encode_image_selected(images, choose, normalize=True)
    return feats.float(), routes, errors[0]
