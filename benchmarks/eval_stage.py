"""(g) The evaluation stage of a run, with and without reusing the frozen backbone's work (issue 16).

    python -m benchmarks.eval_stage [--run RUN] [--rounds 3] [--out benchmarks/results/cpu_eval_stage.json]

Scores every row of a trained run's accuracy matrix (row t from checkpoint task-t, every mode the run
configures) the way the trainer does, two ways, interleaved round by round in this one process:
  published  ``eval.frozen_cache=none``: every mode reads and encodes every test set; plain CLIP features
             are recomputed per row and per mode; a batch with any routed image is re-encoded whole
  once       the frozen features and zero-shot heads computed on the first row and reused; all modes of a
             set in one pass; the adapted forward only for routed images, once per distinct route
Only the scoring is timed (checkpoint loading is not). Work = images through the frozen and the adapted
forward, summed over rows. Both ways must give identical rows; the script stops if they do not.

Without ``--run`` it builds the synthetic world (6 domains, 32 px, 2 held out) and trains the tiny config on
it first (a few minutes on 2 CPU cores), under ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _train(workdir: Path) -> Path:
    from data_tools.synthetic import build_world
    world = build_world(workdir / "world", domains=["shapes", "digits", "arrows", "clocks", "colors", "textures"],
                        image_size=32, train_per_class=16, test_per_class=30, pretrain_per_class=0, held_out=2)
    run = workdir / "run"
    if not (run / "report.json").is_file():
        subprocess.run([sys.executable, "-m", "moecl", "train", "--config", "tiny", "--out", str(run),
                        f"data.root={world}", f"data.sequence={world / 'sequence.yaml'}", "train.iterations=20",
                        "ddas.iterations=40", "eval.frozen_cache=none", "runtime.progress=false"], check=True)
    return run


def _stage(run: Path, checkpoints: list[str], frozen_on: bool) -> tuple[float, dict, list]:
    """Score every row; (seconds of scoring, work summed over rows, the rows per mode)."""
    from moecl.evaluation.evaluator import Evaluator, Work
    from moecl.evaluation.frozen import FrozenCache
    from moecl.evaluation.loading import load_run
    from moecl.evaluation.row import evaluate_row
    from moecl.runstate.identity import backbone_identity

    cache, seconds, work, rows = None, 0.0, Work(), []
    for name in checkpoints:
        loaded = load_run(run, name, device="cpu")
        cfg = loaded.cfg
        if frozen_on and cache is None:
            cache = FrozenCache(backbone_identity(cfg))
        ev = Evaluator(loaded.model, loaded.tokenizer, loaded.eval_tf, device=loaded.device,
                       batch_size=cfg.eval.batch_size, autocast=loaded.autocast, max_samples=cfg.eval.max_samples,
                       frozen=cache if frozen_on else None)
        tic = time.perf_counter()
        out = evaluate_row(ev, loaded.sequence, loaded.method, loaded.eval_modes(), loaded.trained_task_names,
                           trained=loaded.num_trained_tasks, cil=cfg.eval.cil, templates=cfg.eval.templates,
                           zero_shot=loaded.method.zero_shot_is_frozen)
        seconds += time.perf_counter() - tic
        w = next(iter(out.values())).work
        work.plain, work.routed, work.decoded = work.plain + w.plain, work.routed + w.routed, work.decoded + w.decoded
        rows.append({m: (r.row, r.confusion(len(loaded.sequence.tasks))) for m, r in out.items()})
    return seconds, work.as_dict(), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a trained run folder (default: train the tiny config first)")
    p.add_argument("--workdir", default="/tmp/moecl-bench-eval-stage")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger("moecl").setLevel(logging.WARNING)
    run = Path(args.run) if args.run else _train(Path(args.workdir))
    checkpoints = sorted(c.name for c in (run / "checkpoints").glob("task-*") if c.is_dir())
    times: dict[str, list[float]] = {"published": [], "once": []}
    work, rows = {}, {}
    for r in range(args.rounds):
        order = ["published", "once"] if r % 2 == 0 else ["once", "published"]
        for way in order:
            s, w, rw = _stage(run, checkpoints, way == "once")
            times[way].append(s)
            work[way], rows[way] = w, rw
        if rows["published"] != rows["once"]:
            raise SystemExit("the two ways gave different rows: " + json.dumps(rows))
    med = {k: statistics.median(v) for k, v in times.items()}
    fw = {k: v["plain"] + v["routed"] for k, v in work.items()}
    lines = [f"evaluation stage of {run} ({len(checkpoints)} rows, {args.rounds} interleaved rounds, "
             f"{args.threads} thread(s)); rows identical both ways",
             f"  published: {med['published']:.2f} s, {fw['published']} image forwards {work['published']}",
             f"  once:      {med['once']:.2f} s, {fw['once']} image forwards {work['once']}",
             f"  ratio: work {fw['published'] / max(fw['once'], 1):.2f}x less, "
             f"time {med['published'] / med['once']:.2f}x less"]
    print("\n".join(lines))
    record = {"bench": "eval_stage", "run": str(run), "rows": len(checkpoints), "rounds": args.rounds,
              "threads": args.threads, "seconds": times, "median_s": med, "work": work,
              "work_ratio": round(fw["published"] / max(fw["once"], 1), 3),
              "time_ratio": round(med["published"] / med["once"], 3), "torch": torch.__version__}
    print("JSON " + json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
