"""Expert parallelism on the CPU: a training step at ep_size 1 vs ep_size 2 (both moe.ep_mode), two data-parallel
ranks each.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m benchmarks.ep_scaling \
        --model moecl-small --batch 64 --classes 20 --threads 1 [--out FILE]

Both models live in the same two processes (gloo) and are timed in interleaved rounds. Each step goes
through a DeepSpeed engine built as the trainer builds it (moecl.train.engine.build_engine, ds_configs/cpu
or bf16_zero0 on GPU): ep_size 1 = every rank holds all experts, all gradients are all-reduced; ep_size 2 =
each rank holds half the experts; ``ep_mode`` gather: every MoE layer all-gathers its expert weights in the
forward and reduce-scatters their gradients in the backward (gloo: all-reduce, it has no reduce-scatter);
``ep_mode`` all-to-all: tokens go to their experts by all-to-all (2 per MoE layer forward, 2 backward).
Expert gradients stay on their rank, router gradients are all-reduced.

DeepSpeed's collectives are wrapped to count what each rank sends per step: all-to-all bytes (the MoE
dispatch and combine), all-gather / reduce-scatter bytes (gather mode) and all-reduce bytes (gradients, the
capacity max, gather mode's gradient on gloo), and the time spent inside them.
``--batch`` is the global batch (split over the ranks).
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from . import common

COUNTS: dict[str, float] = defaultdict(float)
CURRENT = {"tag": None, "depth": 0}


def wrap_collectives() -> None:
    import deepspeed.comm as dcomm

    def wrap(name):
        inner = getattr(module, name)

        def counted(*a, **kw):
            if name == "all_reduce":
                tensor = a[0] if a else kw.get("tensor")
            else:  # (output, input, ...): the input buffer
                tensor = a[1] if len(a) > 1 else kw.get("input", kw.get("input_tensor"))
            tag = CURRENT["tag"] if CURRENT["depth"] == 0 else None  # deepspeed.comm calls torch.distributed
            t0 = time.perf_counter()
            CURRENT["depth"] += 1
            try:
                out = inner(*a, **kw)
            finally:
                CURRENT["depth"] -= 1
            if tag is not None:
                COUNTS[f"{tag}:{name}:calls"] += 1
                COUNTS[f"{tag}:{name}:bytes"] += tensor.numel() * tensor.element_size() if tensor is not None else 0
                COUNTS[f"{tag}:{name}:ms"] += (time.perf_counter() - t0) * 1e3
            return out
        setattr(module, name, counted)

    import torch.distributed as tdist
    for module in (dcomm, tdist):
        for name in ("all_to_all_single", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
            if hasattr(module, name):
                wrap(name)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=20, steps=10, warmup=2, rounds=2)
    p.add_argument("--configs", default="1,2:gather,2:all-to-all",
                   help="comma list of EP_SIZE[:EP_MODE] (ep_mode gather or all-to-all)")
    args = p.parse_args()
    wrap_collectives()
    ctx = common.setup(args)
    common.quiet()
    import torch.distributed as dist
    from moecl.config import Config
    from moecl.train.engine import build_engine, ds_config
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide over {world} ranks")
    per_rank = args.batch // world
    cfg = Config()
    cfg.data.batch_size = args.batch
    cfg.train.ds_config = "bf16_zero0" if ctx.cuda and ctx.precision == "bf16" else ("fp32" if ctx.cuda else "cpu")
    ds = ds_config(cfg, world, ctx.device)
    fns, meta = {}, {}
    images = tokens = labels = None
    for conf in [c.strip() for c in args.configs.split(",") if c.strip()]:
        ep_text, _, mode = conf.partition(":")
        ep, mode = int(ep_text), mode or "gather"
        torch.manual_seed(args.seed)
        model = common.build(args, ctx, "moe-adapters", ep_size=ep, ep_mode=mode)
        if images is None:
            images, tokens, labels = common.make_inputs(args, ctx, model, batch=args.batch)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            images, labels = images[mine].contiguous(), labels[mine].contiguous()
        common.nonzero_adapters(model, args.seed)
        params = model.trainable_parameters(0)
        engine, _ = build_engine(model, params, cfg, ds, 1e-3)
        engine.train()
        tag = f"ep{ep}" if ep == 1 else f"ep{ep}-{mode}"

        def step(engine=engine, tag=tag):
            CURRENT["tag"] = tag
            with ctx.autocast():
                logits = engine(images, tokens, 0)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.2)
            engine.backward(loss)
            engine.step()
            CURRENT["tag"] = None
            return loss

        fns[tag] = step
        local_experts = sum(common.count(ex.parameters()) for s in model.moe_sites() for ex in s.local_experts)
        meta[tag] = {"ep_size": ep, "ep_mode": mode, "local_expert_params": local_experts,
                     "trainable_params_this_rank": common.count(params)}
        if rank == 0:
            print(f"built {tag}: {local_experts:,} expert parameters on this rank", file=sys.stderr, flush=True)
    timings = common.time_variants(fns, ctx, args.steps, args.warmup, args.rounds, log=rank == 0)
    # the counters ran through warmup too: count per step over every call made with the tag
    steps_run = args.warmup + args.steps
    results, rows = {}, []
    for tag, t in timings.items():
        # slowest rank's figures (a step waits for the slowest rank); "primary" = CPU time on the CPU
        vals = torch.tensor([t.median, t.primary], dtype=torch.float64)
        dist.all_reduce(vals, op=dist.ReduceOp.MAX)
        a2a_b = COUNTS[f"{tag}:all_to_all_single:bytes"] / steps_run
        ar_b = COUNTS[f"{tag}:all_reduce:bytes"] / steps_run
        a2a_ms = COUNTS[f"{tag}:all_to_all_single:ms"] / steps_run
        ar_ms = COUNTS[f"{tag}:all_reduce:ms"] / steps_run
        ag_b = (COUNTS[f"{tag}:all_gather_into_tensor:bytes"] + COUNTS[f"{tag}:reduce_scatter_tensor:bytes"]) / steps_run
        ag_ms = (COUNTS[f"{tag}:all_gather_into_tensor:ms"] + COUNTS[f"{tag}:reduce_scatter_tensor:ms"]) / steps_run
        results[tag] = {**meta[tag], **t.as_dict(), "max_rank_median_ms": float(vals[0]),
                        "max_rank_primary_ms": float(vals[1]),
                        "all_to_all_calls_per_step": COUNTS[f"{tag}:all_to_all_single:calls"] / steps_run,
                        "all_to_all_bytes_per_step_per_rank": a2a_b, "all_to_all_ms_per_step": round(a2a_ms, 3),
                        "all_reduce_bytes_per_step_per_rank": ar_b, "all_reduce_ms_per_step": round(ar_ms, 3),
                        "all_gather_reduce_scatter_bytes_per_step_per_rank": ag_b,
                        "all_gather_reduce_scatter_ms_per_step": round(ag_ms, 3)}
        rows.append([tag, float(vals[0]), float(vals[1]), a2a_b / 2**20, a2a_ms, ag_b / 2**20, ag_ms, ar_b / 2**20,
                     ar_ms, meta[tag]["local_expert_params"] / 1e6])
    ratios = {}
    for tag in timings:
        if tag != "ep1" and "ep1" in timings:
            # wall clock of the slowest rank: waiting in collectives is part of the cost here
            ratios[f"{tag}/ep1"] = results[tag]["max_rank_median_ms"] / results["ep1"]["max_rank_median_ms"]
            ratios[f"{tag}/ep1_cpu_time"] = results[tag]["max_rank_primary_ms"] / results["ep1"]["max_rank_primary_ms"]
    if rank == 0:
        print(f"\nexpert parallelism: {common.describe(ctx, args)} (global batch, {world} ranks x {per_rank})")
        print(common.table(rows, ["config", "step ms (wall, max rank)", "step ms (primary)", "all-to-all MiB/step",
                                  "all-to-all ms", "gather+scatter MiB/step",
                                  "gather+scatter ms", "all-reduce MiB/step", "all-reduce ms", "expert params/rank (M)"]))
        print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        common.emit("ep_scaling", ctx, args, results, ratios, model=None,
                    extra={"world_size": world, "batch_per_rank": per_rank, "ds_config": cfg.train.ds_config})
    dist.barrier()


if __name__ == "__main__":
    main()
