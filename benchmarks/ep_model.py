"""Expert parallelism, on paper: all-to-all bytes vs compute per training step, for this model.

    python -m benchmarks.ep_model [--batch 64] [--classes 100] [--step-ms 45] [--out FILE]

Defaults: ViT-B/16 (image: 197 tokens, d=768, 12 blocks; text: 77 tokens, d=512, 12 blocks), 22 experts,
top-2, adapter r=64, bf16 activations, batch 64 images per rank and 100 class prompts per step (the text
batch is the same prompts on every rank). Everything printed is arithmetic; docs/expert_parallelism.md
explains it and compares the byte count with what benchmarks/ep_scaling.py counted on two CPU ranks.

Per MoE layer DeepSpeed runs two all-to-alls in the forward (dispatch, combine) and two in the backward.
Each sends the [E, capacity, M] buffer (M = L*d for per-sample routing, d for per-token), of which
(P-1)/P leaves the rank at ep_size P. With drop_tokens=False capacity = the largest expert load (max over
the expert-parallel group), so the buffer holds E*capacity rows for B*k routes: the padding factor
E*capacity/(B*k) is 1 for perfectly balanced routing, about 2 for random per-sample routing at B=64, and
E/k = 11 when every sample picks the same two experts (a trained task router; text routing on token 0 is
prompt-independent, so every prompt goes to the same experts). Per-token routing spreads B*L tokens,
whose loads are far more even (padding ~1.1-1.3 measured on CPU).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def flops_block(tokens: int, d: int) -> float:
    """Forward FLOPs of one pre-LN transformer block per sample: 24 d^2 per token (qkv, out, 4d MLP) + 4 L d
    per token (scores and weighted sum)."""
    return tokens * (24 * d * d + 4 * tokens * d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="images per rank")
    p.add_argument("--classes", type=int, default=100, help="class prompts per step (every rank)")
    p.add_argument("--image", default="197,768,12", help="tokens,width,blocks of the image tower")
    p.add_argument("--text", default="77,512,12", help="tokens,width,blocks of the text tower")
    p.add_argument("--experts", type=int, default=22)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--bytes", type=int, default=2, help="bytes per activation element (bf16: 2)")
    p.add_argument("--pad-random", type=float, default=2.15, help="padding factor, random per-sample routing")
    p.add_argument("--pad-token", type=float, default=1.2, help="padding factor, per-token routing")
    p.add_argument("--ep", type=int, default=2, help="ep_size P")
    p.add_argument("--bandwidths", default="12.5,25,50,100,200,400",
                   help="effective all-to-all GB/s per rank to tabulate (100GbE, 200Gb IB, 400Gb IB/PCIe5, "
                        "NVLink-class)")
    p.add_argument("--tflops", type=float, default=250.0,
                   help="sustained bf16 TFLOP/s of the backbone (H100: ~230 measured for the frozen ViT-B/16 "
                        "forward at batch 256, DESIGN.md)")
    p.add_argument("--step-ms", type=float, default=None, help="a measured step time to compare with")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    li, di, ni = (int(v) for v in args.image.split(","))
    lt, dt, nt = (int(v) for v in args.text.split(","))
    b, c, e, k, r, nb = args.batch, args.classes, args.experts, args.top_k, args.width, args.bytes
    P = args.ep
    leave = (P - 1) / P

    # ---- bytes: 4 all-to-alls per MoE layer, the whole buffer counted (as ep_scaling.py counts it)
    ideal_img = 4 * ni * b * k * li * di * nb
    ideal_txt = 4 * nt * c * k * lt * dt * nb
    rows = {
        "per-sample, balanced (no padding)": (ideal_img, ideal_txt),
        f"per-sample, random routing (pad {args.pad_random})": (ideal_img * args.pad_random, ideal_txt * args.pad_random),
        f"per-sample, concentrated (pad {e / k:g}: all samples on 2 experts)": (ideal_img * e / k, ideal_txt * e / k),
        f"per-token (pad {args.pad_token})": (ideal_img * args.pad_token, ideal_txt * args.pad_token),
    }
    # weights instead of activations: all-gather the experts of each block (fwd) + reduce-scatter their grads
    expert_params_block = lambda d: e * (2 * d * r + d + r)  # noqa: E731
    weights_img = 2 * ni * expert_params_block(di) * nb
    weights_txt = 2 * nt * expert_params_block(dt) * nb

    # ---- compute
    img_fwd = ni * flops_block(li, di)
    txt_fwd = nt * flops_block(lt, dt)
    backbone = 2 * (b * img_fwd + c * txt_fwd)  # forward + backward through activations (no weight grads)
    adapter_tok = lambda d: 4 * d * r  # noqa: E731 fwd FLOPs per token per route (down + up)
    adapters = 3 * k * (b * ni * li * adapter_tok(di) + c * nt * lt * adapter_tok(dt))  # fwd + bwd (x2)
    compute_ms = (backbone + adapters) / (args.tflops * 1e12) * 1e3
    step_ms = args.step_ms or compute_ms

    # ---- memory of the experts (what ep_size divides): bf16 weights + fp32 master, grads, Adam m and v
    expert_params = ni * expert_params_block(di) + nt * expert_params_block(dt)
    expert_state = expert_params * (2 + 4 + 4 + 8)

    bws = [float(x) for x in args.bandwidths.split(",")]
    lines = [f"ViT image {li}x{di}x{ni} blocks, text {lt}x{dt}x{nt} blocks; batch {b}/rank, {c} prompts, {e} experts "
             f"top-{k}, r={r}, {nb}-byte activations, ep_size {P} ({leave:.0%} of each buffer leaves the rank)",
             f"compute per step per rank: backbone fwd+bwd {backbone / 1e12:.2f} TFLOP, adapters (k={k}) "
             f"{adapters / 1e12:.3f} TFLOP ({adapters / backbone:.1%}); at {args.tflops:g} TFLOP/s = {compute_ms:.1f} ms"
             + (f"; measured step {args.step_ms:g} ms" if args.step_ms else ""),
             f"expert parameters {expert_params / 1e6:.1f} M, their training state {expert_state / 2**30:.2f} GiB "
             f"per rank at ep_size 1, {expert_state / P / 2**30:.2f} GiB at ep_size {P} (saves "
             f"{expert_state * leave / 2**30:.2f} GiB)",
             "", "all-to-all bytes per step per rank (image + text = total), and the time of the part that leaves "
             "the rank at each bandwidth as a fraction of the step:"]
    header = "  " + f"{'routing':<60}{'image MB':>10}{'text MB':>10}{'total MB':>10}" + "".join(f"{bw:>8g}GB/s" for bw in bws)
    lines.append(header)
    table = {}
    for name, (im, tx) in list(rows.items()) + [("gather expert WEIGHTS instead (all-gather + reduce-scatter)",
                                                 (weights_img, weights_txt))]:
        tot = im + tx
        sent = tot * leave
        fr = [sent / (bw * 1e9) * 1e3 / step_ms for bw in bws]
        table[name] = {"image_bytes": im, "text_bytes": tx, "total_bytes": tot, "sent_bytes": sent,
                       "ms_at": {f"{bw:g}GB/s": round(sent / (bw * 1e9) * 1e3, 2) for bw in bws}}
        lines.append("  " + f"{name:<60}{im / 1e6:>10.1f}{tx / 1e6:>10.1f}{tot / 1e6:>10.1f}"
                     + "".join(f"{f:>12.0%}" for f in fr))
    # break-even: ep pays only if the saved memory buys something; time never improves (no compute moves)
    lines += ["", "ep_size > 1 moves no compute off a rank (each rank still runs the experts for its own routes' "
              "share of B*k), so it can only pay in memory; the table says what that memory costs in time."]
    print("\n".join(lines))
    record = {"bench": "ep_model", "args": vars(args), "compute_tflop": (backbone + adapters) / 1e12,
              "backbone_tflop": backbone / 1e12, "adapter_tflop": adapters / 1e12, "compute_ms": compute_ms,
              "expert_params": expert_params, "expert_state_bytes": expert_state, "bytes": table}
    print("JSON " + json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
