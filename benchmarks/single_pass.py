"""(issue 16) The single-pass layout's inference vs plain CLIP, images/s, side by side in one run.

    python -m benchmarks.single_pass --model ViT-B-16-quickgelu --batch 8 --tasks 11 --image-blocks 6-11

What ``moecl predict`` and the evaluator's task-agnostic mode run per batch of images (class heads built once
beforehand, as both cache them; only image work is timed), each ending in an argmax over each route's head:
  plain        plain CLIP (no adapters at all): encode_image -> argmax over the zero-shot head
  single-in    the layout (adapters in --image-blocks only, ddas.feature=block): moecl.ddas.block.single_pass,
               one forward whose DDAS reads the CLS token entering the first adapted block; every image is
               accepted by its best task (in-distribution data, tasks mixed in the batch)
  single-half  same, about half the images routed (thresholds at the median error)
  single-out   same, every image rejected (out-of-distribution data): plain CLIP after the selector
  two-pass-in  today's default layout (every block adapted, DDAS on the final embedding): a plain pass for
               DDAS, then the routed pass, every image routed (for scale)
Scorers, routers and experts are random (their values do not change their cost); ``--scorer`` picks the
per-task model (gaussian or autoencoder). Ratios are plain's time over each variant's (>= 0.9 is the target).
"""
from __future__ import annotations

import sys

import torch

from . import common

ALL = ["plain", "single-in", "single-half", "single-out", "two-pass-in"]


def parse_blocks(text: str, depth: int) -> list[int]:
    """``6-11`` / ``6,7,8`` / ``half`` (the second half of the blocks) -> block indices."""
    if text == "half":
        return list(range(depth // 2, depth))
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=100, steps=12, warmup=2, rounds=3)
    p.add_argument("--tasks", type=int, default=11, help="trained tasks (routers and DDAS scorers)")
    p.add_argument("--image-blocks", default="half", help="adapted image blocks: half (the second half), 6-11, 6,7,8")
    p.add_argument("--scorer", choices=["gaussian", "autoencoder"], default="autoencoder", help="ddas.scorer")
    p.add_argument("--ae-hidden", type=int, default=64, help="autoencoder bottleneck (ddas.hidden)")
    p.add_argument("--variants", default=",".join(ALL), help=",".join(ALL))
    args = p.parse_args()
    ctx = common.setup(args)
    common.quiet()
    from moecl.ddas import DDASSelector, TaskAutoencoder
    from moecl.ddas.block import single_pass
    from moecl.ddas.gaussian import TaskGaussian
    from moecl.ddas.selector import ZERO_SHOT

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(ALL)}")
    plain_model = common.build(args, ctx, "zero-shot").eval()
    depth = len(plain_model.clip.visual.transformer.resblocks)
    blocks = parse_blocks(args.image_blocks, depth)
    layout = common.build(args, ctx, "moe-adapters", tasks=args.tasks, image_blocks=blocks).eval()
    default = common.build(args, ctx, "moe-adapters", tasks=args.tasks).eval() if "two-pass-in" in names else None
    for m in (layout, default):
        if m is None:
            continue
        common.nonzero_adapters(m, args.seed)
        for t in range(args.tasks):  # distinct random routers per task
            g = torch.Generator().manual_seed(args.seed + 100 + t)
            with torch.no_grad():
                for site in m.moe_sites():
                    w = site.gate.routers[t]
                    w.copy_((torch.randn(w.shape, generator=g) * 0.05).to(w.device))
    images, tokens, _ = common.make_inputs(args, ctx, layout)
    with torch.no_grad(), ctx.autocast():
        heads = {r: layout.encode_text(tokens, r, normalize=True).float().t().contiguous()
                 for r in [ZERO_SHOT, *range(args.tasks)]}
        token = layout.image_token(images)
        embed = layout.encode_image(images, ZERO_SHOT, normalize=True).shape[1]

    def scorers(dim: int, feats: torch.Tensor) -> DDASSelector:
        sel = DDASSelector(feature_block=blocks[0] if dim == token.shape[1] else None)
        for t in range(args.tasks):
            g = torch.Generator().manual_seed(t)
            if args.scorer == "gaussian":
                s = TaskGaussian(dim)
                with torch.no_grad():
                    s.mean.copy_(TaskAutoencoder.prepare(feats).mean(0) + 0.01 * torch.randn(dim, generator=g).to(feats.device))
                    s.std.copy_(torch.rand(dim, generator=g).to(feats.device) + 0.5)
            else:
                s = TaskAutoencoder(dim, args.ae_hidden, generator=g)
            sel.add_task(s, 0.0)
        return sel.to(ctx.device)

    selector = scorers(token.shape[1], token)
    thresholds = common.threshold_cases(selector, token, args.tasks)
    two_pass_sel = None
    if default is not None:
        with torch.no_grad(), ctx.autocast():
            pf = default.encode_image(images, ZERO_SHOT, normalize=True).float()
        two_pass_sel = scorers(embed, pf)
        two_pass_sel.thresholds = torch.full((args.tasks,), float("inf"), device=ctx.device)

    def plain():
        return common.zero_shot_predict(plain_model, images, heads, ctx)

    def single(kind: str):
        def run():
            common.set_thresholds(selector, thresholds, kind, ctx.device)
            with torch.no_grad(), ctx.autocast():
                feats, routes, _ = single_pass(layout, images, selector)
            return common.classify(feats, routes, heads)
        return run

    def two_pass():  # the evaluator's path before the layout (Evaluator.routes_for + routed encode)
        with torch.no_grad(), ctx.autocast():
            pf = default.encode_image(images, ZERO_SHOT, normalize=True).float()
            routes = two_pass_sel.select(pf).to(images.device)
            feats = default.encode_image(images, routes, normalize=True).float()
        return common.classify(feats, routes, heads)

    table = {"plain": plain, "single-in": single("in"), "single-half": single("half"), "single-out": single("out"),
             "two-pass-in": two_pass}
    routed = common.routed_fractions(selector, token, thresholds, ctx.device)
    print(f"timing {', '.join(names)}: {common.describe(ctx, args)}, {args.tasks} tasks, image blocks {blocks} of "
          f"{depth}, scorer {args.scorer}; routed fraction " + ", ".join(f"{k} {v:.2f}" for k, v in routed.items()),
          file=sys.stderr, flush=True)
    timings = common.time_variants({n: table[n] for n in names}, ctx, args.steps, args.warmup, args.rounds)

    base = timings.get("plain")
    rows, results = [], {}
    for n in names:
        t = timings[n]
        ips = args.batch / (t.primary / 1e3)
        results[n] = {**t.as_dict(), "images_per_s": round(ips, 2)}
        rows.append([n, t.median, t.min, t.cpu_median, ips, base.primary / t.primary if base else float("nan")])
    print(f"\nsingle-pass inference: {common.describe(ctx, args)}, {args.tasks} tasks, image blocks "
          f"{blocks[0]}-{blocks[-1]} of {depth}, scorer {args.scorer}")
    print(common.table(rows, ["variant", "median ms", "min ms", "cpu ms", "img/s", "x plain throughput"]))
    ratios = {f"{n}/plain_throughput": base.primary / timings[n].primary for n in names if n != "plain" and base}
    print(f"ratios (of {timings[names[0]].primary_name}): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    common.emit("single_pass", ctx, args, results, ratios, model=layout,
                extra={"tasks": args.tasks, "image_blocks": blocks, "scorer": args.scorer,
                       "routed_fraction": routed, "ratios_of": timings[names[0]].primary_name})


if __name__ == "__main__":
    main()
