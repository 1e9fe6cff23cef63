"""Markdown tables from the JSON records in benchmarks/results/ (for docs/performance.md and the README).

    python -m benchmarks.summarize [--prefix cpu_|gpu_] [--dir benchmarks/results]

Every row names the record it comes from, the device it was measured on and the figure used for ratios
(wall-clock median on GPU; median per-call CPU time on CPU, see benchmarks/run_cpu.sh).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def where(rec: dict) -> str:
    env = rec.get("env", {})
    if env.get("gpu"):
        return env["gpu"]
    return f"CPU {env.get('cpu', '?')} x{env.get('torch_threads', '?')}"


def shape(rec: dict) -> str:
    s = rec.get("shapes", {})
    return f"{s.get('model')} {s.get('image_size')}px b{s.get('batch')}"


def ms(r: dict) -> float:
    return r.get("cpu_median_ms") if r.get("primary") == "cpu_median_ms" else r.get("median_ms")


def train_rows(path: Path, rec: dict) -> list[str]:
    res = rec["results"]
    out = []
    floor = res.get("floor")
    ref = res.get("reference")
    for name, r in res.items():
        x_floor = f"{ms(r) / ms(floor):.2f}" if floor else "-"
        x_ref = f"{ms(ref) / ms(r):.2f}" if ref else "-"
        out.append(f"| {shape(rec)}, {rec['shapes'].get('classes')} prompts, {rec.get('routing')} | {name} | "
                   f"{r['precision']} | {ms(r):.1f} | {x_floor} | {x_ref} | {r.get('expert_load_max_over_mean', r.get('dispatch_rows_per_route', '-'))} | "
                   f"`{path.name}` |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--prefix", default="")
    args = p.parse_args()
    recs = {}
    for f in sorted(Path(args.dir).glob(f"{args.prefix}*.json")):
        try:
            recs[f] = json.loads(f.read_text())
        except ValueError:
            continue
    by = lambda kind: [(f, r) for f, r in recs.items() if r.get("bench") == kind]  # noqa: E731

    if by("train_step") or by("reference_path"):
        print("Training step (a: x floor = step / floor step; b: ref speedup = published path / variant; "
              "load skew = busiest expert's routes over the mean, what DeepSpeed's dispatch pads to)\n")
        print("| shape | variant | precision | step ms | x floor | ref speedup | load skew | record |")
        print("|---|---|---|---:|---:|---:|---:|---|")
        for f, r in by("train_step") + by("reference_path"):
            print("\n".join(train_rows(f, r)))
        print()
    if by("moe_layer"):
        print("MoE layer forward + backward (c: speedup vs DeepSpeed's stock per-token MoE)\n")
        print("| [B, L, d] | routing | variant | ms | vs stock | pad | record |")
        print("|---|---|---|---:|---:|---:|---|")
        for f, rec in by("moe_layer"):
            res = rec["results"]
            stock = res.get("stock")
            for name, r in res.items():
                sp = f"{ms(stock) / ms(r):.2f}" if stock else "-"
                print(f"| {rec['layer_shape']} | {rec.get('routing')} | {name} | {ms(r):.1f} | {sp} | "
                      f"{r.get('dispatch_rows_per_route', '-')} | `{f.name}` |")
        print()
    if by("inference"):
        print("Inference (d: images/s relative to plain zero-shot CLIP)\n")
        print("| shape | variant | img/s | x plain | record |")
        print("|---|---|---:|---:|---|")
        for f, rec in by("inference"):
            res = rec["results"]
            for name, r in res.items():
                print(f"| {shape(rec)}, {rec.get('tasks')} tasks | {name} | {r['images_per_s']:.1f} | "
                      f"{r['images_per_s'] / res['plain']['images_per_s']:.2f} | `{f.name}` |")
        print()
    if by("memory"):
        print("Training memory (e)\n")
        print("| shape | variant | measure | MiB | x floor | record |")
        print("|---|---|---|---:|---:|---|")
        for f, rec in by("memory"):
            res = rec["results"]
            key = "peak_allocated_mib" if rec["env"].get("gpu") else "peak_rss_delta_mib"
            label = "GPU peak allocated" if key == "peak_allocated_mib" else "CPU peak RSS delta"
            fl = res.get("floor", {}).get(key)
            for name, r in res.items():
                if key not in r:
                    print(f"| {shape(rec)} | {name} | failed: {r.get('error')} | - | - | `{f.name}` |")
                    continue
                xf = f"{r[key] / fl:.2f}" if fl else "-"
                print(f"| {shape(rec)}, {rec['shapes'].get('classes')} prompts, {rec.get('routing')} | {name} | "
                      f"{label} | {r[key]:.0f} | {xf} | `{f.name}` |")
        print()
    if by("ep_scaling"):
        print("Expert parallelism (2 ranks)\n")
        print("| shape | config | step ms (wall, slowest rank) | all-to-all MiB/step/rank | all-reduce MiB/step/rank | record |")
        print("|---|---|---:|---:|---:|---|")
        for f, rec in by("ep_scaling"):
            for name, r in rec["results"].items():
                print(f"| {shape(rec)} global | {name} | {r['max_rank_median_ms']:.1f} | "
                      f"{r['all_to_all_bytes_per_step_per_rank'] / 2**20:.1f} | "
                      f"{r['all_reduce_bytes_per_step_per_rank'] / 2**20:.1f} | `{f.name}` |")
        print()
    devices = sorted({where(r) for r in recs.values() if "env" in r})
    if devices:
        print("Measured on: " + "; ".join(devices))


if __name__ == "__main__":
    main()
