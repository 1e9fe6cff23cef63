"""Dispatched operators and host synchronisations per training step: a GPU-relevant figure a CPU can measure.

    python -m benchmarks.step_ops --model moecl-small --batch 64 --classes 20 [--variants moecl,floor,reference]

The step is ``train_step.py``'s (forward of both towers, CLIP loss, backward, AdamW; here the optimizer is
the fused AdamW on every device, one operator per parameter group). A ``TorchDispatchMode`` sees every
ATen operator the step dispatches, forward and backward. Counted per step:

- ``ops``: every ATen operator call;
- ``kernel_ops``: those that launch work on a GPU (views, ``empty*`` allocations and other metadata-only
  operators excluded): the kernel-launch count that bounds a step at small shapes on a GPU;
- ``gflop``: the matmul-class FLOPs of the step (``torch.utils.flop_counter``: matmuls, convolutions,
  attention; elementwise work not counted): moecl / floor of it is the ratio's FLOP floor;
- ``syncs``: calls that make the host wait for the device on CUDA: ``aten::_local_scalar_dense`` (what
  ``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor run), ``Tensor.tolist()``, and the operators whose
  output size depends on the data (``nonzero``, ``bincount``, ``unique*``, ``masked_select``, boolean-mask
  indexing, ``repeat_interleave`` without ``output_size``), listed by name in the record.

Counts do not depend on the machine's load: they are exact on any CPU.
"""
from __future__ import annotations

import collections
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from . import common, train_step

SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "bincount", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select", "repeat_interleave", "nonzero_numpy"}
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh", "_unsafe_view", "view",
             "_reshape_alias", "set_", "resize_", "_to_copy_noop"}


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls by name, and those that synchronise the host on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.kernel_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops[name] += 1
        if not (func.is_view or name in NO_KERNEL):
            self.kernel_ops += 1
        sync = name in SYNC_OPS
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            sync = False
        if name in ("index", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
                if i is not None):
            sync = True  # boolean-mask indexing: nonzero inside
            name = f"{name}(bool mask)"
        if sync:
            self.syncs[name] += 1
        return func(*args, **kwargs)


def count_step(step, steps: int = 2) -> dict:
    """Operators and syncs per step, averaged over ``steps`` steps (after one untimed step)."""
    step()
    counter = OpCounter()
    real_tolist = torch.Tensor.tolist

    def tolist(self):  # .tolist() copies to the host without going through a dispatched operator
        counter.syncs["tolist"] += 1
        return real_tolist(self)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            for _ in range(steps):
                step()
    finally:
        torch.Tensor.tolist = real_tolist
    total = sum(counter.ops.values())
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flops:  # matmul-class FLOPs of one step (elementwise work not counted)
        step()
    return {"gflop": round(flops.get_total_flops() / 1e9, 3), "ops": total / steps, "kernel_ops": counter.kernel_ops / steps,
            "syncs": sum(counter.syncs.values()) / steps,
            "sync_ops": {k: v / steps for k, v in sorted(counter.syncs.items())},
            "top_ops": {k: v / steps for k, v in counter.ops.most_common(15)}}


def run(args) -> dict:
    ctx = common.setup(args)
    common.quiet()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    results, first_model = {}, None
    images = tokens = labels = None
    for name in names:
        model, params, precision = train_step.make_variant(name, args, ctx)
        first_model = first_model or model
        if images is None:
            images, tokens, labels = common.make_inputs(args, ctx, model)
        common.nonzero_adapters(model, args.seed)
        train_step.set_routing(model, images, tokens, ctx, args.routing, args.seed)
        prompts = train_step.prompts_for(model, tokens)
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

        results[name] = {"precision": precision, "trainable_tensors": len(params), **count_step(step, args.steps)}
        r = results[name]
        print(f"{name}: {r['ops']:.0f} ops, {r['kernel_ops']:.0f} kernel ops, {r['syncs']:.0f} syncs per step "
              f"{r['sync_ops'] or ''}", file=sys.stderr, flush=True)
    ratios = {}
    if "floor" in results:
        for name in names:
            if name != "floor":
                ratios[f"{name}/floor ops"] = results[name]["ops"] / results["floor"]["ops"]
                ratios[f"{name}/floor kernel_ops"] = results[name]["kernel_ops"] / results["floor"]["kernel_ops"]
                ratios[f"{name}/floor flops"] = results[name]["gflop"] / results["floor"]["gflop"]
    rows = [[n, r["gflop"], r["ops"], r["kernel_ops"], r["syncs"], ", ".join(f"{k} {v:g}" for k, v in r["sync_ops"].items()) or "-"]
            for n, r in results.items()]
    print(f"\noperators per training step: {common.describe(ctx, args)}")
    print(common.table(rows, ["variant", "GFLOP", "ops", "kernel ops", "host syncs", "which syncs"]))
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return common.emit("step_ops", ctx, args, results, ratios, extra={"routing": args.routing}, model=first_model)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=20, steps=2)
    train_step.add_flags(p)
    run(p.parse_args())


if __name__ == "__main__":
    main()
