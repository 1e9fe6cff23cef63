"""(e) Peak memory of training, one fresh process per variant.

    python -m benchmarks.memory --model ViT-B-16-quickgelu --batch 64 --classes 100 --precision bf16
    python -m benchmarks.memory --model ViT-L-14 --batch 64 --variants moecl,moecl+ckpt,floor
    python -m benchmarks.memory --model ViT-B-16-quickgelu --batches 1,2,4 --variants moecl,moecl+ckpt,moecl+fsckpt

Each variant (same names as train_step.py: moecl, floor, moecl+ckpt, moecl+fsckpt, ...) runs ``--steps`` training
steps in its own child process, so nothing of another variant is resident:
- GPU: ``torch.cuda.max_memory_allocated`` over the steps (weights, activations, gradients, AdamW state:
  the figure the targets are about), and ``max_memory_reserved`` (what the caching allocator held).
- CPU: there is no allocator counter, so the figure is the process's peak resident set (VmHWM, reset with
  /proc/self/clear_refs after the model is built) minus its RSS after the model is built: activations +
  gradients + optimizer state + allocator slack, with glibc told to map every allocation of 64 KiB or more on
  its own (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set. It is labelled "CPU peak
  RSS delta" and is NOT a GPU figure.
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
    prompts = train_step.prompts_for(model, tokens, args.full_context)  # trimmed once, as the trainer does
    for _ in range(args.steps):
        with vctx.autocast():
            logits = model(images, prompts, 0)
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


def _child(name: str, batch: int, child_argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", *child_argv, "--batch", str(batch), "--worker", name]
    print(f"  {name} batch {batch}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items()  # the child makes its own world of one
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # CPU: every allocation of 64 KiB or more its own mapping, returned to the OS when freed, so the peak RSS
    # follows the live tensors (glibc's adaptive threshold would otherwise keep freed gradients resident and
    # let the next step's activations reuse them unseen)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEM ")), None)
    if proc.returncode or line is None:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        print(f"  {name} failed:\n{tail}", file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail}
    return json.loads(line[4:])


def slope_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (batch, MiB): (MiB per image, MiB at batch 0)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(m for _, m in points) / n
    var = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (m - my) for b, m in points) / var
    return slope, my - slope * mx


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=100, steps=3, warmup=0)
    p.add_argument("--variants", default="moecl,floor,moecl+ckpt,floor+ckpt")
    p.add_argument("--batches", default=None,
                   help="comma list of batch sizes (overrides --batch): every variant at each, then the per-image "
                        "slope and the projection to --project-batch")
    p.add_argument("--project-batch", type=int, default=64, help="batch the slope is projected to")
    p.add_argument("--routing", choices=["random", "concentrated"], default="random")
    p.add_argument("--ref-precision", choices=["fp32", "same"], default="fp32")
    p.add_argument("--full-context", action="store_true", help=argparse_hidden())
    p.add_argument("--worker", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    ctx = common.setup(args)  # only for the environment record (this parent process runs no model)
    common.quiet()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.batch]
    child_argv, skip = [], 0
    for i, a in enumerate(sys.argv[1:]):  # the child gets this run's flags, less those it must not repeat
        if skip:
            skip -= 1
        elif a in ("--out", "--batches", "--batch", "--project-batch"):
            skip = 1
        elif not a.startswith(("--out=", "--batches=", "--batch=", "--project-batch=")):
            child_argv.append(a)
    gpu = ctx.cuda
    key = "peak_allocated_mib" if gpu else "peak_rss_delta_mib"
    results, rows = {}, []
    for batch in batches:
        for name in names:
            r = _child(name, batch, child_argv)
            results[name if len(batches) == 1 else f"{name}@{batch}"] = r
            if "error" in r:
                rows.append([name, batch, "-", "failed", "-", "-"])
                continue
            args.image_size = r["shapes"]["image_size"]
            if gpu:
                rows.append([name, batch, r["precision"], r["peak_allocated_mib"] / 1024, r["peak_reserved_mib"] / 1024,
                             r["peak_minus_before_mib"] / 1024])
            else:
                rows.append([name, batch, r["precision"], r["peak_rss_delta_mib"], r["peak_rss_mib"], r["rss_before_mib"]])
    args.batch = batches[-1]
    header = ["variant", "batch", "prec", "peak alloc GiB", "peak reserved GiB", "peak - before GiB"] if gpu else \
        ["variant", "batch", "prec", "CPU peak RSS delta MiB", "peak RSS MiB", "RSS after build MiB"]
    print(f"\ntraining memory ({'GPU allocator' if gpu else 'CPU process RSS, not GPU memory'}): "
          f"{args.model}, {args.classes} prompts, {args.experts} experts top-{args.top_k}, {ctx.precision}")
    print(common.table(rows, header))
    ratios, slopes = {}, {}
    if len(batches) == 1:
        if "floor" in results and key in results["floor"]:
            for n, r in results.items():
                if n != "floor" and key in r:
                    ratios[f"{n}/floor"] = r[key] / results["floor"][key]
    else:
        total = "peak_allocated_mib" if gpu else "peak_rss_mib"
        srows = []
        for name in names:
            pts = [(b, results[f"{name}@{b}"][key]) for b in batches if key in results[f"{name}@{b}"]]
            tot = [(b, results[f"{name}@{b}"][total]) for b in batches if total in results[f"{name}@{b}"]]
            if len(pts) < 2:
                continue
            slope, icpt = slope_fit(pts)
            t_slope, t_icpt = slope_fit(tot)
            slopes[name] = {"mib_per_image": round(slope, 2), "intercept_mib": round(icpt, 1),
                            f"projected_delta_mib_at_{args.project_batch}": round(icpt + slope * args.project_batch, 1),
                            f"projected_total_mib_at_{args.project_batch}": round(t_icpt + t_slope * args.project_batch, 1)}
            srows.append([name, slope, icpt, icpt + slope * args.project_batch, (t_icpt + t_slope * args.project_batch) / 1024])
        print(f"\nper-image slope over batches {batches}, projected to batch {args.project_batch}:")
        print(common.table(srows, ["variant", "MiB/image", "MiB at 0", f"delta MiB at {args.project_batch}",
                                   f"total GiB at {args.project_batch}"]))
        base = next((n for n in names if "+" not in n and n in slopes), None)
        for n in slopes:
            if base and n != base and slopes[base]["mib_per_image"] > 0:
                ratios[f"{n}/{base} slope"] = slopes[n]["mib_per_image"] / slopes[base]["mib_per_image"]
    common.emit("memory", ctx, args, results, ratios,
                extra={"measure": "cuda max_memory_allocated" if gpu else
                       "CPU peak RSS delta (VmHWM after steps minus RSS after build); not GPU memory",
                       "routing": args.routing, "batches": batches, "slopes": slopes})


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
