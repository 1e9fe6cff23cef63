"""(d) Task-agnostic inference: per-sample DDAS + routed forward vs plain CLIP zero-shot, images/s.

    python -m benchmarks.inference --model ViT-B-16-quickgelu --batch 256 --tasks 11 --precision bf16

One evaluation batch through each path (text heads are built once beforehand, as the evaluator caches
them; only image work is timed):
  plain            zero-shot CLIP: encode_image(images, -1) -> argmax over one class head
  oracle           the adapters of one known task: encode_image(images, t) -> argmax (task-incremental eval)
  ddas-in          moecl's evaluator path (moecl.evaluation.Evaluator.routes_for + evaluate): plain features,
                   DDASSelector.select per sample over T trained autoencoders, then the routed forward of
                   the whole batch, argmax per route's head. Thresholds let every sample through: every
                   sample takes its best task (in-distribution test data; tasks mixed in the batch)
  ddas-half        same, thresholds at the per-task median error: about half the samples are routed
  ddas-out         same, thresholds 0: every sample is zero-shot (out-of-distribution data); the
                   evaluator then skips the routed forward
  ddas-half-subset prototype: the routed forward only on the routed rows (zero-shot rows reuse the
                   plain features), not on the whole batch
The autoencoders are random (fitting them does not change their cost); so are the routers and experts.
"""
from __future__ import annotations

import sys

import torch

from . import common

ALL = ["plain", "oracle", "ddas-in", "ddas-half", "ddas-out", "ddas-half-subset"]


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=256, classes=100, steps=20, warmup=3)
    p.add_argument("--tasks", type=int, default=11, help="trained tasks (routers and DDAS autoencoders)")
    p.add_argument("--ae-hidden", type=int, default=64, help="DDAS autoencoder bottleneck (ddas.hidden)")
    p.add_argument("--variants", default=",".join(ALL), help=",".join(ALL))
    p.add_argument("--text-batch", type=int, default=None,
                   help="also time the adapted text tower on this many prompts (eval heads), prompts/s")
    args = p.parse_args()
    ctx = common.setup(args)
    common.quiet()
    from . import train_step
    from moecl.ddas import DDASSelector, TaskAutoencoder
    from moecl.ddas.selector import ZERO_SHOT

    model = common.build(args, ctx, "moe-adapters", tasks=args.tasks)
    common.nonzero_adapters(model, args.seed)
    images, tokens, _ = common.make_inputs(args, ctx, model)
    for t in range(args.tasks):  # distinct random routers per task
        g = torch.Generator().manual_seed(args.seed + 100 + t)
        with torch.no_grad():
            for site in model.moe_sites():
                w = site.gate.routers[t]
                w.copy_((torch.randn(w.shape, generator=g) * 0.05).to(w.device))
    model.eval()
    with torch.no_grad(), ctx.autocast():
        heads = {r: model.encode_text(tokens, r, normalize=True).float().t().contiguous()
                 for r in [ZERO_SHOT, *range(args.tasks)]}
        plain_feats = model.encode_image(images, ZERO_SHOT, normalize=True).float()
    embed = plain_feats.shape[1]

    selector = DDASSelector()
    for t in range(args.tasks):
        selector.add_task(TaskAutoencoder(embed, args.ae_hidden, generator=torch.Generator().manual_seed(t)), 0.0)
    selector.to(ctx.device)
    thresholds = common.threshold_cases(selector, plain_feats, args.tasks)

    def plain():
        return common.zero_shot_predict(model, images, heads, ctx)

    def oracle(m=model):
        with torch.no_grad(), ctx.autocast():
            f = m.encode_image(images, 0, normalize=True).float()
        return (f @ heads[0]).argmax(dim=1)

    def ddas(kind: str, subset: bool = False, m=model):
        model = m

        def run():
            common.set_thresholds(selector, thresholds, kind, ctx.device)
            with torch.no_grad(), ctx.autocast():
                pf = model.encode_image(images, ZERO_SHOT, normalize=True).float()
                routes = selector.select(pf, decision="sample").to(images.device)
                if not subset:  # moecl's evaluator: whole batch again if any row is routed
                    feats = model.encode_image(images, routes, normalize=True).float() if bool((routes >= 0).any()) else pf
                else:
                    feats = pf.clone()
                    idx = (routes >= 0).nonzero().squeeze(1)
                    if idx.numel():
                        feats[idx] = model.encode_image(images[idx], routes[idx], normalize=True).float()
            return common.classify(feats, routes, heads)
        return run

    table = {"plain": plain, "oracle": oracle, "ddas-in": ddas("in"), "ddas-half": ddas("half"),
             "ddas-out": ddas("out"), "ddas-half-subset": ddas("half", subset=True)}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n not in table:
            raise SystemExit(f"unknown variant {n!r}; choose from {', '.join(ALL)}")
    fns = {n: table[n] for n in names}
    routed = common.routed_fractions(selector, plain_feats, thresholds, ctx.device)
    print(f"timing {', '.join(names)}: {common.describe(ctx, args)}, {args.tasks} tasks; routed fraction "
          + ", ".join(f"{k} {v:.2f}" for k, v in routed.items()), file=sys.stderr, flush=True)
    timings = common.time_variants(fns, ctx, args.steps, args.warmup, args.rounds)

    text_rate = None
    if args.text_batch:
        tok = tokens.repeat((args.text_batch + tokens.shape[0] - 1) // tokens.shape[0], 1)[:args.text_batch]

        def text():
            with torch.no_grad(), ctx.autocast():
                return model.encode_text(tok, 0, normalize=True)
        tt = common.time_variants({"text": text}, ctx, max(3, args.steps // 4), 1, 1)["text"]
        text_rate = args.text_batch / (tt.primary / 1e3)

    base = timings["plain"] if "plain" in timings else None
    rows, results = [], {}
    for n in names:
        t = timings[n]
        ips = args.batch / (t.primary / 1e3)
        results[n] = {**t.as_dict(), "images_per_s": round(ips, 2)}
        rows.append([n, t.median, t.min, t.cpu_median, ips, base.primary / t.primary if base else float("nan")])
    print(f"\ninference: {common.describe(ctx, args)}, {args.tasks} tasks, DDAS hidden {args.ae_hidden}")
    print(common.table(rows, ["variant", "median ms", "min ms", "cpu ms", "img/s", "x plain throughput"]))
    ratios = {f"{n}/plain_throughput": timings["plain"].primary / timings[n].primary for n in names
              if n != "plain" and base}
    print(f"ratios (of {timings[names[0]].primary_name}): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if text_rate:
        print(f"adapted text tower: {text_rate:.1f} prompts/s ({args.text_batch} prompts per call)")
    common.emit("inference", ctx, args, results, ratios, model=model,
                extra={"tasks": args.tasks, "ae_hidden": args.ae_hidden, "routed_fraction": routed,
                       "text_prompts_per_s": text_rate, "ratios_of": timings[names[0]].primary_name})


if __name__ == "__main__":
    main()
