"""Contrastive pretraining of a tiny open_clip CLIP on the synthetic world's image-caption set (cached).

The demo needs a CLIP foundation with zero-shot ability to keep, and no download: this trains one of the
shipped tiny backbones (``moecl-tiny`` by default) from scratch on ``<world>/pretrain`` with the symmetric
InfoNCE loss of CLIP (open_clip's ``ClipLoss``), AdamW, linear warmup then cosine, a learnable temperature.
The result is a plain open_clip state dict in safetensors (load it with ``model.init_checkpoint=FILE``)
and a JSON file with the parameters, the loss curve and the zero-shot accuracy measured afterwards on
every domain's test set (by the same :class:`~moecl.evaluation.evaluator.Evaluator` the trainer uses).

Cached: the output folder's name is a hash of the parameters and of the world's own parameters
(``world.json``), so a second call with the same parameters returns at once. Writes go to a temporary
folder renamed at the end, so an interrupted run never leaves a half-written checkpoint behind.

    python -m moecl.pretrain --world WORLD --cache DIR [--steps N] [--model moecl-tiny]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from . import pretrained
from .pretrained import (INFO_FILE, WEIGHTS_FILE, PretrainParams, PretrainResult, cache_key,  # noqa: F401
                         cached_result, default_cache, world_dir, world_fingerprint)

log = logging.getLogger("moecl.pretrain")


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's own rule: no weight decay on gains, biases, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
                   or "embedding" in name)
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def pretrain_clip(world: str | Path, cache_dir: str | Path, params: Optional[PretrainParams] = None, *,
                  workers: int = 1, device: Optional[str] = None, progress: bool = True,
                  evaluate: bool = True, eval_max_samples: Optional[int] = None,
                  threads: Optional[int] = None) -> PretrainResult:
    """Pretrain ``params.model`` on ``world``'s image-caption set; cached under ``cache_dir``.

    Returns the safetensors path and the info dict (params, loss curve, zero-shot accuracy per domain
    and chance level). A second call with the same parameters on the same world loads nothing and
    trains nothing: it returns the cached result.
    """
    params = params or PretrainParams()
    world, cache_dir = Path(world), Path(cache_dir)
    hit = cached_result(params, world, cache_dir)
    if hit is not None:
        log.info("pretrained %s found in cache: %s", params.model, hit.weights)
        return hit
    from . import runtime
    runtime.configure_accelerator_env()
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    from . import backbones
    from .data import make_transforms, pretrain_batches
    from .seeding import seed_all
    from .schedule import lr_at

    backbones.register_backbones()
    dev = runtime.pick_device(device or "auto")
    if threads:
        torch.set_num_threads(threads)
    seed_all(params.seed)
    from .model.backbone import quiet_random_init_notice
    with quiet_random_init_notice(True):  # random on purpose: this is what pretraining starts from
        model = open_clip.create_model(params.model, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(params.init_logit_scale)
    model.to(dev).train()
    tokenizer = open_clip.get_tokenizer(params.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    train_tf, _ = make_transforms(size, params.crop_scale, mean=pcfg.get("mean"), std=pcfg.get("std"))
    optimizer = torch.optim.AdamW(_param_groups(model, params.weight_decay), lr=params.lr, betas=params.betas,
                                  eps=1e-6)
    loss_fn = ClipLoss()
    stream = pretrain_batches(world, batch_size=params.batch_size, workers=workers, seed=params.seed,
                              preprocess=train_tf, shuffle_buffer=max(4 * params.batch_size, 1000),
                              pin_memory=dev.type == "cuda")
    use_bf16 = dev.type == "cuda"
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=params.steps, desc=f"pretrain {params.model}", unit="step", dynamic_ncols=True)
    curve: list[list[float]] = []
    tic = time.time()
    batches = iter(stream)
    ema = None
    for step in range(params.steps):
        lr = lr_at(step, params.steps, params.lr, params.warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images, captions = next(batches)
        images = images.to(dev, non_blocking=True)
        tokens = tokenizer(list(captions)).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            img = model.encode_image(images, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
        loss = loss_fn(img.float(), txt.float(), model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP's clamp of the temperature (at most 100)
            model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"pretraining loss is {value} at step {step}; lower the learning rate")
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if step % 10 == 0 or step == params.steps - 1:
            curve.append([step, round(value, 5)])
        if bar is not None:
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", T=f"{float(model.logit_scale.detach().exp()):.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    del batches
    train_s = time.time() - tic
    model.eval()
    folder = cache_dir / cache_key(params, world)
    tmp = cache_dir / f".{folder.name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    info: dict[str, Any] = {"params": params.as_dict(), "world": world_fingerprint(world), "complete": False,
                            "train_seconds": round(train_s, 1), "final_loss": curve[-1][1] if curve else None,
                            "logit_scale": float(model.logit_scale.detach().exp()), "loss_curve": curve,
                            "parameters": sum(p.numel() for p in model.parameters()), "device": str(dev)}
    if evaluate:
        info["zero_shot"], info["chance"] = zero_shot_accuracy(world, tmp / WEIGHTS_FILE, params.model, dev,
                                                               max_samples=eval_max_samples)
    info["complete"] = True
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("pretrained %s in %.0f s -> %s", params.model, train_s, folder / WEIGHTS_FILE)
    return PretrainResult(folder / WEIGHTS_FILE, info, cached=False)


def demo_backbone(cache: Optional[Path] = None, *, quick: bool = False, workers: int = 1, progress: bool = True,
                  device: Optional[str] = None, threads: Optional[int] = None) -> tuple[Path, PretrainResult]:
    """The demo's pretrained tiny CLIP (``model.init_checkpoint=demo``): the synthetic world and the
    contrastive pretraining on its captions (:mod:`moecl.pretrained`'s recipe), each built once and then read
    from ``cache`` (default :func:`~moecl.pretrained.default_cache`). Returns (world folder, result)."""
    from data_tools.synthetic import build_world
    cache = Path(cache) if cache is not None else default_cache()
    params = pretrained.WORLD_QUICK if quick else pretrained.WORLD
    world = world_dir(cache, params)
    build_world(world, workers=max(1, workers), progress=progress, **params)
    result = pretrain_clip(world, cache / "pretrained", pretrained.PRETRAIN_QUICK if quick else pretrained.PRETRAIN,
                           workers=workers, device=device, progress=progress, threads=threads)
    return world, result


def build_init_checkpoint(value: Optional[str], model_name: str, *, progress: bool = False) -> Optional[str]:
    """:func:`moecl.pretrained.resolve_init_checkpoint`, building the demo's pretrained tiny CLIP into the cache
    on first use instead of refusing."""
    if value not in pretrained.INIT_CHECKPOINTS:
        return value
    found = pretrained.cached_init_checkpoint(value, model_name)
    if found is not None:
        return found
    _, params = pretrained.recipe_for(value, model_name)
    log.info("model.init_checkpoint=%s: building the demo's pretrained %s into the cache %s (once; a few minutes "
             "on a CPU)", value, params.model, default_cache())
    return str(demo_backbone(quick=pretrained.INIT_CHECKPOINTS[value], progress=progress)[1].weights)


def zero_shot_accuracy(world: str | Path, weights: str | Path, model_name: str, device=None,
                       max_samples: Optional[int] = None) -> tuple[dict[str, float], dict[str, float]]:
    """Top-1 zero-shot accuracy (%) of a pretrained tiny CLIP on every domain's test set of ``world``
    (each domain's eval prompt ensemble, the trainer's Evaluator), and the chance level of each."""
    import torch

    from .config import ModelConfig, MoEConfig
    from .data import load_sequence, make_transforms
    from .evaluation.evaluator import Evaluator
    from .evaluation.row import ORACLE, evaluate_row
    from .model import build_model, image_size_of, tokenizer_for

    dev = torch.device(device) if device is not None else torch.device("cpu")
    mcfg = ModelConfig(name=model_name, init_checkpoint=str(weights))
    model = build_model(mcfg, MoEConfig(), "zero-shot").to(dev).eval()
    pcfg = getattr(model.clip.visual, "preprocess_cfg", {}) or {}
    _, eval_tf = make_transforms(image_size_of(model.clip), mean=pcfg.get("mean"), std=pcfg.get("std"))
    seq = load_sequence(world, str(Path(world) / "sequence.yaml"))
    ev = Evaluator(model, tokenizer_for(mcfg), eval_tf, device=dev, batch_size=256, max_samples=max_samples)
    row = evaluate_row(ev, seq, "zero-shot", [ORACLE], [])["oracle"].row
    acc = {task.name: round(a, 2) for task, a in zip(seq.all_tasks(), row)}
    chance = {task.name: round(100.0 / task.num_classes, 2) for task in seq.all_tasks()}
    return acc, chance


def format_zero_shot(info: dict[str, Any], held_out: Optional[list[str]] = None) -> str:
    """One line per domain: zero-shot accuracy vs chance."""
    zs, chance = info.get("zero_shot", {}), info.get("chance", {})
    held = set(held_out or [])
    lines = [f"  {name:<10} {acc:5.1f}%  (chance {chance.get(name, float('nan')):.1f}%)"
             + ("  held out" if name in held else "") for name, acc in zs.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecl.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="synthetic world folder (with pretrain/)")
    p.add_argument("--cache", required=True, help="cache folder for the weights")
    p.add_argument("--model", default=PretrainParams.model)
    p.add_argument("--steps", type=int, default=PretrainParams.steps)
    p.add_argument("--batch-size", type=int, default=PretrainParams.batch_size)
    p.add_argument("--lr", type=float, default=PretrainParams.lr)
    p.add_argument("--seed", type=int, default=PretrainParams.seed)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = PretrainParams(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed)
    res = pretrain_clip(args.world, args.cache, params, workers=args.workers, threads=args.threads)
    print(f"weights: {res.weights}{' (cached)' if res.cached else ''}")
    print("zero-shot accuracy on each domain's test set:")
    print(format_zero_shot(res.info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
