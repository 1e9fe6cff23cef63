"""(e) Peak memory of training, one fresh process per variant.

    python -m benchmarks.memory --model ViT-B-16-quickgelu --batch 64 --classes 100 --precision bf16
    python -m benchmarks.memory --model ViT-L-14 --batch 64 --variants moecl,moecl+ckpt,floor

Each variant (same names as train_step.py: moecl, floor, moecl+ckpt, floor+ckpt) runs ``--steps`` training
steps in its own child process, so nothing of another variant is resident:
- GPU: ``torch.cuda.max_memory_allocated`` over the steps (weights, activations, gradients, AdamW state:
  the figure the targets are about), and ``max_memory_reserved`` (what the caching allocator held).
- CPU: there is no allocator counter, so the figure is the process's peak resident set (VmHWM, reset with
  /proc/self/clear_refs after the model is built) minus its RSS after the model is built: activations +
  gradients + optimizer state + allocator slack. It is labelled "CPU peak RSS delta" and is NOT a GPU figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch.nn.functional as F

from . import common


def worker(args) -> None:
    from . import train_step
    ctx = common.setup(args)
    common.quiet()
    model, params, precision = train_step.make_variant(args.worker, args, ctx)
    images, tokens, labels = common.make_inputs(args, ctx, model)
    common.nonzero_adapters(model, args.seed)
    train_step.set_routing(model, images, tokens, ctx, args.routing, args.seed)
    model.train()
    opt = common.make_optimizer(params, ctx)
    vctx = common.Ctx(ctx.device, precision, args)
    ctx.sync()
    before = common.memory_now(ctx)
    common.reset_peak_memory(ctx)
    for _ in range(args.steps):
        with vctx.autocast():
            logits = model(images, tokens, 0)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ctx.sync()
    after = common.memory_now(ctx)
    out = {"variant": args.worker, "precision": precision, "trainable_params": common.count(params),
           "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    if ctx.cuda:
        out.update(peak_allocated_mib=round(after["peak_allocated_mib"], 1),
                   peak_reserved_mib=round(after["peak_reserved_mib"], 1),
                   allocated_before_mib=round(before["allocated_mib"], 1),
                   peak_minus_before_mib=round(after["peak_allocated_mib"] - before["allocated_mib"], 1))
    else:
        out.update(rss_before_mib=round(before["rss_mib"], 1), peak_rss_mib=round(after["peak_rss_mib"], 1),
                   peak_rss_delta_mib=round(after["peak_rss_mib"] - before["rss_mib"], 1))
    out["shapes"] = common.shapes(args, model)
    print("MEM " + json.dumps(out), flush=True)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=100, steps=3, warmup=0)
    p.add_argument("--variants", default="moecl,floor,moecl+ckpt,floor+ckpt")
    p.add_argument("--routing", choices=["random", "concentrated"], default="random")
    p.add_argument("--ref-precision", choices=["fp32", "same"], default="fp32")
    p.add_argument("--worker", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    ctx = common.setup(args)  # only for the environment record (this parent process runs no model)
    common.quiet()
    results, rows = {}, []
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    child_argv = [a for a in sys.argv[1:]]
    if "--out" in child_argv:
        i = child_argv.index("--out")
        del child_argv[i:i + 2]
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.memory", *child_argv, "--worker", name]
        print(f"  {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items()  # the child makes its own world of one
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEM ")), None)
        if proc.returncode or line is None:
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
            results[name] = {"error": f"exit {proc.returncode}", "stderr_tail": tail}
            rows.append([name, "-", "failed", "-", "-"])
            print(f"  {name} failed:\n{tail}", file=sys.stderr)
            continue
        r = json.loads(line[4:])
        results[name] = r
        if "peak_allocated_mib" in r:
            rows.append([name, r["precision"], r["peak_allocated_mib"] / 1024, r["peak_reserved_mib"] / 1024,
                         r["peak_minus_before_mib"] / 1024])
        else:
            rows.append([name, r["precision"], r["peak_rss_delta_mib"], r["peak_rss_mib"], r["rss_before_mib"]])
        args.image_size = r["shapes"]["image_size"]
    gpu = ctx.cuda
    header = ["variant", "prec", "peak alloc GiB", "peak reserved GiB", "peak - before GiB"] if gpu else \
        ["variant", "prec", "CPU peak RSS delta MiB", "peak RSS MiB", "RSS after build MiB"]
    print(f"\ntraining memory ({'GPU allocator' if gpu else 'CPU process RSS, not GPU memory'}): "
          f"{args.model} batch {args.batch}, {args.classes} prompts, {args.experts} experts top-{args.top_k}, "
          f"{ctx.precision}")
    print(common.table(rows, header))
    key = "peak_allocated_mib" if gpu else "peak_rss_delta_mib"
    ratios = {}
    if "floor" in results and key in results["floor"]:
        for n, r in results.items():
            if n != "floor" and key in r:
                ratios[f"{n}/floor"] = r[key] / results["floor"][key]
    common.emit("memory", ctx, args, results, ratios,
                extra={"measure": "cuda max_memory_allocated" if gpu else
                       "CPU peak RSS delta (VmHWM after steps minus RSS after build); not GPU memory",
                       "routing": args.routing})


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
