"""(c) One MoE-adapter layer, forward + backward on [B, L, d]: moecl vs DeepSpeed's stock per-token MoE.

    python -m benchmarks.moe_layer --batch 256 --tokens 197 --dim 768 --experts 22 --top-k 2 --precision bf16

Variants (same shapes, same expert module, same k, nothing dropped, one process, interleaved rounds):
  moecl         moecl's MoEAdapter: per-sample routing (router reads token 0), the gathered path (each
                sample's k adapters as two batched matmuls)
  stock         deepspeed.moe.layer.MoE(AdapterExpert, k, drop_tokens=False): per-token routing, stock
                Experts (a Python loop over the local experts); stock defaults otherwise
  moecl-token   moecl's MoEAdapter with routing="token" (grouped experts, per-token routing): separates
                the effect of routing granularity from that of the grouped matmul
  dispatch      the same MoEAdapter through DeepSpeed's MOELayer dispatch (capacity-padded [E, C, L*d] buffer:
                what ep_mode all-to-all, token routing and drop_tokens run)
  dense         one dense adapter on every token (the floor's layer)

The input requires grad (the backward goes through the block's activations, as in training); the expert
and router parameters get gradients. ``--routing random`` (small random routers, noisy gate) or
``concentrated`` (every sample prefers experts 0 and 1: capacity = batch, the worst case of padding).
"""
from __future__ import annotations

import sys

import torch

from . import common

ALL = ["moecl", "dispatch", "stock", "moecl-token", "dense"]


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, steps=20, warmup=3)
    p.add_argument("--tokens", type=int, default=None, help="L (default: the model's image tokens)")
    p.add_argument("--dim", type=int, default=None, help="d (default: the model's image width)")
    p.add_argument("--variants", default="moecl,dispatch,stock,moecl-token,dense", help=",".join(ALL))
    p.add_argument("--routing", choices=["random", "concentrated"], default="random")
    args = p.parse_args()
    ctx = common.setup(args)
    common.quiet()
    if args.tokens is None or args.dim is None:
        from moecl.config import ModelConfig
        from moecl.model import create_backbone, image_size_of
        clip = create_backbone(ModelConfig(name=args.model))
        args.tokens = args.tokens or int(clip.visual.positional_embedding.shape[0])
        args.dim = args.dim or int(clip.visual.transformer.width)
        args.image_size = image_size_of(clip)
        del clip

    from deepspeed.moe.layer import MoE
    from moecl.model.clip import DenseAdapter
    from moecl.model.experts import AdapterExpert
    from moecl.model.moe import MoEAdapter

    b, length, d = args.batch, args.tokens, args.dim
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(b, length, d, generator=g).to(ctx.device)
    dy = (torch.randn(b, length, d, generator=g) * 0.01).to(ctx.device)
    task_ids = torch.zeros(b, dtype=torch.long, device=ctx.device)

    def small_random_(module, scale=0.02):
        gg = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for prm in module.parameters():
                prm.copy_((torch.randn(prm.shape, generator=gg) * scale).to(prm.device, prm.dtype))

    def concentrate(w: torch.Tensor, feats: torch.Tensor) -> None:
        """w [d, E]: logits of experts 0 and 1 = 12, 10 at the mean routing feature, others 0."""
        m = feats.float().mean(0)
        direction = m / (m.norm() ** 2 + 1e-12)
        with torch.no_grad():
            w.zero_()
            w[:, 0] = 12.0 * direction
            w[:, 1] = 10.0 * direction

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    layers, fns, info = {}, {}, {}
    for name in names:
        if name in ("moecl", "moecl-token", "dispatch"):
            cfg = common.moe_config(args, routing="token" if name == "moecl-token" else "sample")
            layer = MoEAdapter(d, cfg)
            layer.set_deepspeed_parallelism()
            layer.gate.add_task()
            small_random_(layer)
            if args.routing == "concentrated":
                feats = x0[:, 0] if name != "moecl-token" else x0.reshape(-1, d)
                concentrate(layer.gate.routers[0], feats)
            if name == "dispatch":
                def fwd(x, layer=layer):  # every row active: DeepSpeed's MOELayer instead of the gathered path
                    return layer._run(x, x[:, 0], task_ids, 0, torch.ones_like(task_ids, dtype=torch.bool))
            else:
                def fwd(x, layer=layer):
                    return layer(x, x[:, 0], task_ids, 0)
        elif name == "stock":
            layer = MoE(hidden_size=d, expert=AdapterExpert(d, args.width), num_experts=args.experts, ep_size=1,
                        k=args.top_k, drop_tokens=False)
            layer.set_deepspeed_parallelism()
            small_random_(layer)
            if args.routing == "concentrated":
                concentrate(layer.deepspeed_moe.gate.wg.weight.t(), x0.reshape(-1, d))  # wg: Linear(d, E)

            def fwd(x, layer=layer):
                return layer(x)[0]
        elif name == "dense":
            layer = DenseAdapter(d, common.moe_config(args))
            small_random_(layer)

            def fwd(x, layer=layer):
                return layer(x, x[:, 0], task_ids, 0)
        else:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(ALL)}")
        layer.to(ctx.device).train()
        layers[name] = layer

        def step(fwd=fwd, layer=layer):
            x = x0.detach().requires_grad_(True)
            for prm in layer.parameters():
                prm.grad = None
            with ctx.autocast():
                y = fwd(x)
            y.backward(dy.to(y.dtype))
            return y

        fns[name] = step
        info[name] = {"params": common.count(layer.parameters())}

    print(f"timing {', '.join(names)}: [{b}, {length}, {d}], {args.experts} experts top-{args.top_k}, "
          f"{ctx.precision}, routing {args.routing}", file=sys.stderr, flush=True)
    timings = common.time_variants(fns, ctx, args.steps, args.warmup, args.rounds)
    # capacity after the timed steps (moecl: gate.last_counts; stock: exp_counts of the last forward)
    for name in names:
        lay = layers[name]
        counts = None
        if isinstance(lay, MoEAdapter) and name != "moecl" and lay.gate.last_counts is not None:  # (moecl: no buffer)
            counts = lay.gate.last_counts
        elif name == "stock":
            counts = lay.deepspeed_moe.exp_counts
        if counts is not None:
            c = counts.float()
            info[name]["dispatch_rows_per_route"] = round(float(c.max() * c.numel() / c.sum()), 3)
    rows, results = [], {}
    ref = "stock" if "stock" in timings else names[0]
    for name in names:
        t = timings[name]
        results[name] = {**info[name], **t.as_dict()}
        rows.append([name, t.median, t.min, t.cpu_median, timings[ref].primary / t.primary,
                     info[name].get("dispatch_rows_per_route", "-")])
    print(f"\nMoE layer forward+backward: [{b}, {length}, {d}], {args.experts} experts top-{args.top_k}, "
          f"{ctx.precision}, routing {args.routing}")
    print(common.table(rows, ["variant", "median ms", "min ms", "cpu ms", f"speedup vs {ref}", "pad"]))
    def ratio_set(stat):
        out = {f"{ref}/{n}": getattr(timings[ref], stat) / getattr(timings[n], stat) for n in names if n != ref}
        if "moecl" in timings:
            for n in names:
                if n not in ("moecl", ref):
                    out[f"moecl/{n}"] = getattr(timings["moecl"], stat) / getattr(timings[n], stat)
        return out

    ratios, ratios_min, ratios_wall = ratio_set("primary"), ratio_set("min"), ratio_set("median")
    print(f"ratios (of {timings[ref].primary_name}): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    args.classes = None
    common.emit("moe_layer", ctx, args, results, ratios,
                extra={"layer_shape": [b, length, d], "routing": args.routing,
                       "ratios_of_min": {k: round(v, 4) for k, v in ratios_min.items()},
                       "ratios_of_wall_median": {k: round(v, 4) for k, v in ratios_wall.items()},
                       "ratios_of": timings[ref].primary_name})


if __name__ == "__main__":
    main()
