"""Check that the prototypes in benchmarks/prototypes.py compute what moecl computes (fp32, CPU is fine).

    python benchmarks/check_prototypes.py [--model moecl-small] [--batch 8]

For each prototype: logits and the gradients of every trainable parameter of one loss, with dropout 0 and
the noise drawn from the same seed, against moecl as it is: once in eval mode (no noise) with mixed task ids
-1/0/1 in the batch, once in train mode (noisy gate) with every sample on one task. Prints max abs differences and one JSON line.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import prototypes  # noqa: E402


def loss_and_grads(model, params, images, tokens, labels, task_ids, seed: int):
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    logits = model(images, tokens, task_ids, text_task_ids=0)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return logits.detach(), [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0], batch=8, classes=6, model="moecl-small")
    args = p.parse_args()
    ctx = common.setup(args)
    common.quiet()
    import train_step
    results = {}
    base = None
    # moecl and floor first: the others are compared with them
    for name in ("moecl", "gather", "moecl+trim", "moecl+ckpt", "floor", "floor+trim"):
        torch.manual_seed(0)
        method = "dense-adapter" if name.startswith("floor") else "moe-adapters"
        model = common.build(args, ctx, method, dropout=0.0, tasks=2)
        images, tokens, labels = common.make_inputs(args, ctx, model)
        params = model.trainable_parameters(1)
        common.nonzero_adapters(model, 1)
        train_step.set_routing(model, images, tokens, ctx, "random", 2)
        for site in model.moe_sites():  # routers of task 1 too
            with torch.no_grad():
                for w in (site.gate.routers[1], site.gate.noise[1]):
                    w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        if name.startswith("gather"):
            prototypes.use_gathered_experts(model)
        if name.endswith("+trim"):
            prototypes.trim_text_context(model)
        if name.endswith("+ckpt"):
            prototypes.route_safe_checkpointing(model)
        # eval mode (no noise) with mixed task ids -1/0/1, then train mode (noise) with every sample on task 1
        mixed = torch.tensor([(i % 3) - 1 for i in range(args.batch)], device=ctx.device)
        model.eval()
        logits, grads = loss_and_grads(model, params, images, tokens, labels, mixed, seed=5)
        model.train()
        logits2, grads2 = loss_and_grads(model, params, images, tokens, labels, 1, seed=6)
        logits, grads = torch.cat([logits, logits2]), grads + grads2
        if name in ("moecl", "floor"):
            base = (logits, grads)
            results[name] = {"reference_for": "itself"}
            continue
        ref_logits, ref_grads = base
        results[name] = {"logits_max_abs_diff": float((logits - ref_logits).abs().max()),
                         "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads)),
                         "grad_max_abs": max(float(b.abs().max()) for b in ref_grads)}
        print(f"{name:12s} logits max diff {results[name]['logits_max_abs_diff']:.3e}  grad max diff "
              f"{results[name]['grad_max_abs_diff']:.3e} (largest grad {results[name]['grad_max_abs']:.3e})")
    common.emit("check_prototypes", ctx, args, results, {})


if __name__ == "__main__":
    main()
