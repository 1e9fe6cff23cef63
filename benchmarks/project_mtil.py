"""(f) Project a full MTIL-shaped run (11 tasks x 1000 steps x batch 64 + evaluation) from measured records.

    python -m benchmarks.project_mtil --train benchmarks/results/gpu_train_step_b64.json \
        --inference benchmarks/results/gpu_inference.json [--data benchmarks/results/gpu_data.json] [--out FILE]

Reads JSON records written by train_step.py (step time of ``--variant``, default moecl, at the record's
batch; scaled per image if the batch is not 64), inference.py (plain and routed image throughput, adapted
text tower prompts/s) and optionally data_throughput.py (images/s per loader worker, 224 px train/eval
streams). Nothing is run here: it is arithmetic on measurements, with every assumption printed.

Evaluation, per row t (after task t; MTIL evaluates every test set after every task, in two modes):
- as moecl's evaluator does it today (``moecl.evaluation.Evaluator``): every batch computes plain CLIP
  features (also in oracle mode, where trained tasks then run the routed forward as well); in agnostic mode
  DDAS routes per sample and the WHOLE batch runs the routed forward when any sample is routed (with a
  false-accept rate of a few % every batch of 256 has one); text heads are rebuilt per row and per route
  seen (``--routes-per-set``).
- as moecl's evaluator does it now (``eval.frozen_cache``, moecl.evaluation.frozen): plain features of every
  test image computed once for the whole run (the backbone is frozen; DDAS reads them, zero-shot uses them),
  oracle mode's routed forward reused by agnostic mode where DDAS picks the same task, routed forward (and
  image decoding) only for routed images. The image-forward counts are those ``report.json``'s ``eval_work``
  records (benchmarks/eval_stage.py measures both ways on a real run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# MTIL test-set sizes: torchvision test splits, and 20% of the whole set for the seeded 80/20 splits
# (Caltech101 8677 images, EuroSAT 27000, SUN397 108754). Class counts where mtil.json reads them from disk.
TEST_SIZES = {"Aircraft": 3333, "Caltech101": 1736, "CIFAR100": 10000, "DTD": 1880, "EuroSAT": 5400,
              "Flowers": 6149, "Food": 25250, "MNIST": 10000, "OxfordPet": 3669, "StanfordCars": 8041,
              "SUN397": 21751}
CLASSES = {"Aircraft": 100, "Caltech101": 101, "CIFAR100": 100, "DTD": 47, "EuroSAT": 10, "Flowers": 102,
           "Food": 101, "MNIST": 10, "OxfordPet": 37, "StanfordCars": 196, "SUN397": 397}


def load(path: str | None) -> dict | None:
    if not path:
        return None
    text = Path(path).read_text().strip()
    if text.startswith("{") and "\n{" in text:  # JSON lines (data_throughput.py appends)
        text = text.splitlines()[-1]
    return json.loads(text)


def templates_per_set() -> dict[str, int]:
    spec = json.loads((ROOT / "data_tools" / "benchmarks" / "mtil.json").read_text())
    return {name: len(d.get("templates", [])) or 1 for name, d in spec["datasets"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="train_step.py JSON record")
    p.add_argument("--variant", default="moecl", help="which training variant's step time to use")
    p.add_argument("--inference", required=True, help="inference.py JSON record")
    p.add_argument("--routed-variant", default="oracle",
                   help="inference.py variant whose images/s is the routed forward (oracle)")
    p.add_argument("--data", default=None, help="data_throughput.py JSON (line) record")
    p.add_argument("--tasks", type=int, default=11)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ddas-images", type=int, default=5000, help="ddas.max_images per task (plain forward)")
    p.add_argument("--false-accept", type=float, default=0.05,
                   help="fraction of out-of-distribution test images DDAS routes to some task")
    p.add_argument("--routes-per-set", type=int, default=2,
                   help="distinct routes per test set in agnostic mode (each needs a text head)")
    p.add_argument("--target-min", type=float, default=15.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    train, inf, data = load(args.train), load(args.inference), load(args.data)
    tr = train["results"][args.variant]
    step_ms = tr.get("median_ms") if train["env"].get("gpu") else tr.get("cpu_median_ms", tr["median_ms"])
    rec_batch = train["shapes"]["batch"]
    step_s = step_ms / 1e3 * (args.batch / rec_batch)
    res = inf["results"]
    key = "images_per_s"
    plain_ips = res["plain"][key]
    routed_ips = res[args.routed_variant][key]
    text_ps = inf.get("text_prompts_per_s") or None
    names = list(TEST_SIZES)[: args.tasks]
    n = [TEST_SIZES[k] for k in names]
    N = sum(n)
    tmpl = templates_per_set()
    prompts = {k: CLASSES[k] * tmpl.get(k, 1) for k in names}
    P = sum(prompts.values())

    train_s = args.tasks * args.steps * step_s
    ddas_s = args.tasks * args.ddas_images / plain_ips
    # the published evaluator (eval.frozen_cache=none): image forwards and seconds
    cur_img = cur_txt = 0.0
    cur_fwd = cur_dec = 0.0
    for t in range(args.tasks):
        trained = t + 1
        in_dist = sum(n[:trained])
        cur_img += 2 * N / plain_ips  # plain features in both modes
        cur_img += in_dist / routed_ips  # oracle, trained tasks
        cur_img += N / routed_ips  # agnostic: whole batch re-encoded when any row is routed
        cur_fwd += 2 * N + in_dist + N
        cur_dec += 2 * N  # each mode reads every set
        cur_txt += P * (1 + args.routes_per_set)  # oracle head (route j or -1) + agnostic heads per route
    # moecl's evaluator (frozen features once, modes in one pass, routed work only where routed)
    new_img = N / plain_ips
    new_fwd = new_dec = float(N)
    new_txt = P  # plain heads once
    for t in range(args.tasks):
        trained = t + 1
        in_dist = sum(n[:trained])
        routed = in_dist + args.false_accept * (N - in_dist)
        new_img += routed / routed_ips
        new_fwd += routed
        new_dec += routed
        # routed heads of the trained sets (oracle; agnostic reuses them) + heads of the other routes DDAS picks
        new_txt += sum(prompts[k] for k in names[:trained]) + P * max(0, args.routes_per_set - 1)
    cur_txt_s = cur_txt / text_ps if text_ps else 0.0
    new_txt_s = new_txt / text_ps if text_ps else 0.0
    total_cur = train_s + ddas_s + cur_img + cur_txt_s
    total_new = train_s + ddas_s + new_img + new_txt_s

    loader = None
    if data:
        rows = [r for r in data.get("results", []) if r.get("px") == "224" and r.get("workers", 0) >= 1]
        tr_rate = max((r["images_per_s_per_worker"] for r in rows if r["stage"] == "stream-train"), default=None)
        ev_rate = max((r["images_per_s_per_worker"] for r in rows if r["stage"] == "stream-eval"), default=None)
        need_train = args.batch / step_s
        loader = {"train_images_per_s_needed": round(need_train, 1),
                  "train_images_per_s_per_worker": tr_rate,
                  "train_workers_needed": round(need_train / tr_rate, 1) if tr_rate else None,
                  "eval_images_per_s_needed": round(routed_ips, 1),
                  "eval_images_per_s_per_worker": ev_rate,
                  "eval_workers_needed": round(routed_ips / ev_rate, 1) if ev_rate else None}

    where = train["env"].get("gpu") or f"CPU ({train['env'].get('cpu')}, {train['env'].get('torch_threads')} threads)"
    lines = [
        f"MTIL-shaped run projected from measurements on {where}: {train['shapes']['model']} "
        f"{train['shapes']['image_size']}px, {train['precision']}",
        f"  training step ({args.variant}, batch {rec_batch} record{'' if rec_batch == args.batch else f', scaled to {args.batch}'}): "
        f"{step_s * 1e3:.1f} ms -> {args.tasks} x {args.steps} steps = {train_s / 60:.1f} min",
        f"  DDAS features: {args.tasks} x {args.ddas_images} plain forwards at {plain_ips:.0f} img/s = {ddas_s / 60:.2f} min",
        f"  evaluation, {N} test images x {args.tasks} rows x 2 modes; plain {plain_ips:.0f} img/s, routed "
        f"{routed_ips:.0f} img/s, text {text_ps or float('nan'):.0f} prompts/s ({P} prompts per row set)",
        f"    published evaluator: {cur_fwd / 1e6:.2f} M image forwards, {cur_dec / 1e6:.2f} M decoded; images "
        f"{cur_img / 60:.1f} min + text heads {cur_txt_s / 60:.1f} min",
        f"    moecl (frozen features once, modes in one pass, routed work only where routed): "
        f"{new_fwd / 1e6:.2f} M image forwards, {new_dec / 1e6:.2f} M decoded; images {new_img / 60:.1f} min + "
        f"text heads {new_txt_s / 60:.1f} min",
        f"    image forwards {cur_fwd / new_fwd:.2f}x fewer, decoded images {cur_dec / new_dec:.2f}x fewer",
        f"  total: {total_cur / 60:.1f} min with the published evaluator, {total_new / 60:.1f} min with moecl's "
        f"(target <= {args.target_min:g} min on one H100)",
    ]
    if loader:
        lines.append(f"  loader: training needs {loader['train_images_per_s_needed']} img/s = "
                     f"{loader['train_workers_needed']} workers at {loader['train_images_per_s_per_worker']} img/s/worker; "
                     f"evaluation needs {loader['eval_workers_needed']} workers")
    print("\n".join(lines))
    record = {"bench": "project_mtil", "inputs": {"train": args.train, "inference": args.inference, "data": args.data},
              "measured_on": where, "precision": train["precision"], "shapes": train["shapes"],
              "assumptions": {"tasks": args.tasks, "steps": args.steps, "batch": args.batch,
                              "test_images": N, "test_sizes": dict(zip(names, n)), "prompts_per_row": P,
                              "ddas_images": args.ddas_images, "false_accept": args.false_accept,
                              "routes_per_set": args.routes_per_set},
              "step_ms": round(step_s * 1e3, 3), "plain_images_per_s": plain_ips, "routed_images_per_s": routed_ips,
              "text_prompts_per_s": text_ps,
              "minutes": {"train": round(train_s / 60, 2), "ddas": round(ddas_s / 60, 2),
                          "eval_images_current": round(cur_img / 60, 2), "eval_text_current": round(cur_txt_s / 60, 2),
                          "eval_images_proposed": round(new_img / 60, 2), "eval_text_proposed": round(new_txt_s / 60, 2),
                          "total_current": round(total_cur / 60, 2), "total_proposed": round(total_new / 60, 2)},
              "eval_image_forwards": {"published": int(cur_fwd), "moecl": int(new_fwd),
                                      "ratio": round(cur_fwd / new_fwd, 3)},
              "eval_images_decoded": {"published": int(cur_dec), "moecl": int(new_dec),
                                      "ratio": round(cur_dec / new_dec, 3)},
              "target_minutes": args.target_min, "loader": loader}
    print("JSON " + json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
