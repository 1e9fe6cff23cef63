"""(a) + (b): one full training step of moecl's MoE-adapters vs the floor and vs the published path.

    python -m benchmarks.train_step --model ViT-B-16-quickgelu --batch 64 --classes 100 --precision bf16 \
        [--variants moecl,floor,reference] [--routing random|concentrated] [--out FILE]

A step = image tower on the batch + adapted text tower on ``--classes`` prompts (every step, as in
training, so the text adapters train) -> CLIP logits -> cross-entropy (label smoothing 0.2) -> backward
through the frozen backbone's activations -> AdamW step on the trainable parameters only.

Variants (all built in this one process, timed in interleaved rounds):
  moecl            MoE-adapters as moecl builds and trains them (MoEAdapter's gathered path at ep_size 1)
  floor            the same backbone with one dense adapter per block (method="dense-adapter")
  reference        the published path re-implemented from METHOD.md (benchmarks/reference_path.py), fp32
                   (``--ref-precision same`` runs it at ``--precision`` instead)
  moecl+ckpt, floor+ckpt   ... with activation checkpointing of every block (model.grad_checkpointing: torch's
                           non-reentrant checkpoint, as open_clip applies it)
  moecl+fsckpt, floor+fsckpt   ... with fairscale's checkpoint_wrapper on every block instead (activations
                           offloaded to the host on CUDA), the alternative the model does not ship

Prompts are trimmed to the longest prompt's EOT token once (``MoECLIP.trim_prompts``, as the trainer does);
``--full-context`` encodes all 77 positions instead.

``--routing random``: routers as after init + small random weights (routes spread over experts, as at the
start of a task); ``concentrated``: every router strongly prefers experts 0 and 1 (a trained task router;
text routing on token 0 is prompt-independent, so every prompt goes to the same experts anyway).
The record reports, per MoE variant, the expert load skew of the last step: the busiest expert's routes
over the mean (mean over blocks; 1.0 = balanced). It is what DeepSpeed's dispatch would pad to (rows of its
[E, capacity, L*d] buffer per route); moecl's gathered path, which the step runs, pays nothing for it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common

ALL = ["moecl", "floor", "reference", "reference-same", "moecl+ckpt", "floor+ckpt", "moecl+fsckpt", "floor+fsckpt"]


def add_flags(p) -> None:
    p.add_argument("--variants", default="moecl,floor,reference", help="comma list of: " + ",".join(ALL))
    p.add_argument("--ref-precision", choices=["fp32", "same"], default="fp32",
                   help="precision of the reference variant (published: fp32)")
    p.add_argument("--routing", choices=["random", "concentrated"], default="random")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of the moecl step here")
    p.add_argument("--full-context", action="store_true",
                   help="encode prompts at the model's full context (default: trimmed to the longest prompt's "
                        "EOT token once, as the trainer does for every method)")


def prompts_for(model, tokens: torch.Tensor, full_context: bool = False) -> torch.Tensor:
    """The class prompts as the trainer encodes them: trimmed once to the longest prompt's EOT token."""
    if full_context or not hasattr(model, "trim_prompts"):
        return tokens
    return model.trim_prompts(tokens)


# --------------------------------------------------------------------------------------------------------

def capture_route_tokens(model, images, tokens, ctx) -> dict[int, torch.Tensor]:
    """Token each site's router reads, from one no-grad eval forward (keyed by id of the site)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    def hook(mod, args):  # must return None (a pre-hook's return value would replace the arguments)
        seen.setdefault(id(mod), args[1].detach().float())

    from moecl.model.backbone import text_towers
    for transformer in (model.clip.visual.transformer, text_towers(model.clip)[1]):
        for block in transformer.resblocks:
            hooks.append(block.mlp.adapter.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad(), ctx.autocast():
        model(images, tokens, 0)
    model.train(was)
    for h in hooks:
        h.remove()
    return seen


def routers_of(site) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(site, "gate"):  # moecl MoEAdapter
        return site.gate.routers[0], site.gate.noise[0]
    return site.w_gate[0], site.w_noise[0]  # ReferenceMoE


def set_routing(model, images, tokens, ctx, mode: str, seed: int = 0) -> None:
    """random: small random router/noise weights; concentrated: experts 0 and 1 win by a wide margin."""
    sites = [s for s in model.sites() if hasattr(s, "gate") or hasattr(s, "w_gate")]
    if not sites:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in sites:
            for w in routers_of(s):
                w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w.device, w.dtype))
    if mode == "concentrated":
        seen = capture_route_tokens(model, images, tokens, ctx)
        with torch.no_grad():
            for s in sites:
                c = seen[id(s)]
                m = c.mean(0)
                direction = m / (m.norm() ** 2 + 1e-12)
                wg, _ = routers_of(s)
                wg.zero_()
                wg[:, 0] = 12.0 * direction.to(wg.dtype)
                wg[:, 1] = 10.0 * direction.to(wg.dtype)


def load_skew(model) -> float | None:
    """Mean over MoE sites of (E x busiest expert's routes) / (routes) of the last forward (moecl only)."""
    from moecl.model.moe import MoEAdapter
    vals = []
    for s in model.sites():
        if isinstance(s, MoEAdapter) and s.gate.last_counts is not None:
            c = s.gate.last_counts.float()
            if c.sum() > 0:
                vals.append(float(c.max() * c.numel() / c.sum()))
    return sum(vals) / len(vals) if vals else None


def make_variant(name: str, args, ctx):
    """(model, trainable params, precision of this variant)."""
    from . import reference_path
    base, _, opt = name.partition("+")
    precision = ctx.precision
    if opt not in ("", "ckpt", "fsckpt"):
        raise SystemExit(f"unknown variant option {opt!r} in {name!r}")
    ckpt = opt == "ckpt"
    if base in ("moecl", "floor"):
        model = common.build(args, ctx, "moe-adapters" if base == "moecl" else "dense-adapter", grad_checkpointing=ckpt)
        params = model.trainable_parameters(0)
    elif base in ("reference", "reference-same"):
        model, params = reference_path.build_reference(args, ctx)
        if base == "reference" and args.ref_precision == "fp32":
            precision = "fp32"
        if opt:
            raise SystemExit(f"{name!r}: the published path has no checkpointing variant")
    else:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(ALL)}")
    if opt == "fsckpt":
        fairscale_checkpointing(model, offload=ctx.cuda)
    return model, params, precision


def fairscale_checkpointing(model, offload: bool) -> None:
    """fairscale's ``checkpoint_wrapper`` on every residual block of both towers (``offload``: keep the saved
    block inputs in host memory). The model's routes must outlive the encode call, as under its own
    checkpointing: the blocks are re-run in the backward."""
    from fairscale.nn.checkpoint import checkpoint_wrapper
    from moecl.model.backbone import text_towers
    for transformer in (model.clip.visual.transformer, text_towers(model.clip)[1]):
        for block in transformer.resblocks:
            checkpoint_wrapper(block, offload_to_cpu=offload)
    model._checkpointing = torch.is_grad_enabled  # keep each call's route for the recomputation


def run(args, bench: str = "train_step") -> dict:
    ctx = common.setup(args)
    common.quiet()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    fns, info, models = {}, {}, {}
    images = tokens = labels = None
    for name in names:
        model, params, precision = make_variant(name, args, ctx)
        if images is None:
            images, tokens, labels = common.make_inputs(args, ctx, model)
        common.nonzero_adapters(model, args.seed)
        set_routing(model, images, tokens, ctx, args.routing, args.seed)
        prompts = prompts_for(model, tokens, args.full_context)
        model.train()
        opt = common.make_optimizer(params, ctx)
        vctx = common.Ctx(ctx.device, precision, args)

        def step(model=model, opt=opt, vctx=vctx, prompts=prompts):
            with vctx.autocast():
                logits = model(images, prompts, 0)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        fns[name] = step
        models[name] = model
        info[name] = {"precision": precision, "trainable_params": common.count(params)}
        print(f"built {name}: {info[name]['trainable_params']:,} trainable parameters, {precision}",
              file=sys.stderr, flush=True)
    print(f"timing {', '.join(names)}: {common.describe(ctx, args)}", file=sys.stderr, flush=True)
    timings = common.time_variants(fns, ctx, args.steps, args.warmup, args.rounds)
    for name in names:
        skew = load_skew(models[name])
        if skew is not None:
            info[name]["expert_load_max_over_mean"] = round(skew, 3)
    if args.profile and "moecl" in fns:
        profile_step(fns["moecl"], ctx, args.profile)

    first = names[0]
    floor = "floor" if "floor" in timings else None
    rows, results = [], {}
    for name in names:
        t = timings[name]
        results[name] = {**info[name], **t.as_dict(), "images_per_s": round(args.batch / (t.primary / 1e3), 2)}
        rows.append([name, info[name]["precision"], t.median, t.min, t.cpu_median, args.batch / (t.primary / 1e3),
                     t.primary / timings[floor].primary if floor else float("nan"),
                     timings["reference"].primary / t.primary if "reference" in timings else float("nan"),
                     info[name].get("expert_load_max_over_mean", "-")])
    print(f"\ntraining step: {common.describe(ctx, args)}, routing {args.routing}")
    print(common.table(rows, ["variant", "prec", "median ms", "min ms", "cpu ms", "img/s", "x floor",
                              "ref speedup", "load skew"]))
    ratios = step_ratios(names, timings, floor, "primary")
    ratios_min = step_ratios(names, timings, floor, "min")
    ratios_wall = step_ratios(names, timings, floor, "median")
    print(f"ratios (of {timings[names[0]].primary_name}): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return common.emit(bench, ctx, args, results, ratios, extra={"routing": args.routing,
                                                                "ref_precision": args.ref_precision,
                                                                "ratios_of_min": {k: round(v, 4) for k, v in ratios_min.items()},
                                                                "ratios_of_wall_median": {k: round(v, 4) for k, v in ratios_wall.items()},
                                                                "ratios_of": timings[names[0]].primary_name},
                       model=models[first])


def step_ratios(names, timings, floor, stat: str) -> dict[str, float]:
    """moecl-style ratios of the ``stat`` ("median" or "min") step times."""
    t = {n: getattr(timings[n], stat) for n in names}
    out = {}
    for name in names:
        if floor and name != floor:
            out[f"{name}/floor"] = t[name] / t[floor]
        if "reference" in t and name != "reference":
            out[f"reference/{name}"] = t["reference"] / t[name]
    if "moecl" in t:
        for name in names:
            if name not in ("moecl", "floor", "reference"):
                out[f"moecl/{name}"] = t["moecl"] / t[name]
    return out


def profile_step(fn, ctx, path: str, steps: int = 3) -> None:
    """torch.profiler over a few moecl steps; the op table (self CPU / CUDA time) goes to ``path``."""
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    fn()
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            with record_function("train_step"):
                fn()
            ctx.sync()
    key = "self_cuda_time_total" if ctx.cuda else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=40)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"# {steps} moecl training steps\n{text}\n")
    print(f"wrote profile {path}", file=sys.stderr)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=100)
    add_flags(p)
    run(p.parse_args())


if __name__ == "__main__":
    main()
