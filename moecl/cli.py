"""The ``moecl`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a whole task sequence (continual learning)",
                       description="Train MoE-adapters (or a baseline) over a task sequence: for each task add a "
                                   "router, train, activate-freeze, fit DDAS, evaluate the accuracy-matrix row, "
                                   "checkpoint. Launch under torchrun / the deepspeed launcher for many ranks.")
    p.add_argument("--config", required=True, help="shipped config name (see `moecl configs`) or YAML path")
    p.add_argument("--out", required=True, help="run folder (config.yaml, checkpoints/, tb/, report.json)")
    p.add_argument("--resume", default=None, help="'auto' (latest valid checkpoint in RUN) or a checkpoint path")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although the config differs from the run's (logged)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. moe.num_experts=8")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a run's checkpoint on every test set",
                       description="Evaluate a trained run (its latest task-end checkpoint, or --checkpoint) on the "
                                   "test sets of its sequence or on other shards; writes report files.")
    p.add_argument("run", help="run folder")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: latest task end)")
    p.add_argument("--data-root", default=None, help="evaluate on shards under another root")
    p.add_argument("--sequence", default=None, help="evaluate on another sequence file")
    p.add_argument("--out", default=None, help="write the results here instead of RUN/eval/<name>/ "
                                               "(a read-only or archived run)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides (eval.*, ddas.*, data.max_bad_fraction, ...)")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="regenerate report.md, heatmaps and metrics from report.json",
                       description="Recompute Transfer/Avg/Last from the stored accuracy matrices and write "
                                   "report.md and PNG heatmaps of RUN.")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", default=None, help="write the report files here instead of RUN (a read-only run)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images: the route taken and the top-5 labels",
                       description="For each image: the route (a task or zero-shot) chosen by DDAS and the top-5 "
                                   "labels with probabilities.")
    p.add_argument("run", help="run folder")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--labels", default=None, help="comma-separated label names (open vocabulary), or all-seen: "
                                                 "every class of every learned task")
    p.add_argument("--task", default=None, help="use this task's class names as labels")
    p.add_argument("--json", default=None, help="also write results to this JSON file")
    p.add_argument("--csv", default=None, help="also write results to this CSV file")
    p.add_argument("--jsonl", default=None, help="write results as JSON lines, one per image, as they are computed "
                                                "(bounded memory for folders of any size)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the run's "
                                                                "eval.batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--top", type=int, default=5, help="labels shown per image")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes (default 0: decode here)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole method end to end on the built-in synthetic benchmark",
                       description="Build the synthetic world, pretrain a tiny CLIP on its captions (cached), run "
                                   "a task sequence through the real stack and compare zero-shot, continual "
                                   "fine-tuning, the reference setting and moecl side by side. No download.")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--cache", default=None,
                   help="cache folder for the world and the pretrained tiny CLIP (default: $MOECL_CACHE, else "
                        "$XDG_CACHE_HOME/moecl, else ~/.cache/moecl); model.init_checkpoint=demo reads it too")
    p.add_argument("--quick", action="store_true",
                   help="far fewer steps: a smoke test of the plumbing; the claims are printed but not judged")


def _add_import_reference(sub) -> None:
    p = sub.add_parser("import-reference", help="turn the authors' published checkpoints into a moecl run",
                       description="Read published MoE-Adapters .pth checkpoints (weights only) and write a normal "
                                   "run folder that `moecl eval`, `moecl report` and `moecl predict` use as they are. "
                                   "See docs/reproduction.md.")
    p.add_argument("checkpoints", nargs="+", help="the final .pth, or one per task in sequence order")
    p.add_argument("--model", required=True, help="open_clip model name of the backbone, e.g. ViT-B-16-quickgelu")
    p.add_argument("--sequence", required=True, help="the sequence it was trained on (shipped name or YAML path)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--autochooser", nargs="+", default=None, help="the DDAS autochooser .pth (final, or one per checkpoint)")
    p.add_argument("--config", default=None, help="base config (default: the sequence's *_reference config)")
    p.add_argument("--data-root", default=None, help="data.root of the imported run")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides of the run's config")


def _add_configs(sub) -> None:
    sub.add_parser("configs", help="list the shipped configs", description="List the configs shipped inside the "
                   "package; pass a name to `moecl train --config NAME`.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecl", description="Continual learning of CLIP with Mixture-of-"
                                     "Experts adapters, scaled with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_report, _add_predict, _add_demo, _add_configs,
                _add_import_reference):
        add(sub)
    return parser


def _cmd_configs(args) -> int:
    import yaml  # not moecl.config: listing names and descriptions needs no validation (pydantic stays unloaded)
    for path in sorted((Path(__file__).parent / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        print(f"{path.stem:<22} {data.get('description', '')}")
    return 0


def _dispatch(args) -> int:
    import importlib
    if args.command == "configs":
        return _cmd_configs(args)
    if args.command == "train":  # fail fast on a bad config, before the heavy imports
        from .config import load_config
        args.cfg = load_config(args.config, args.overrides)
    target = {"train": "moecl.train.cli", "eval": "moecl.evaluation.cli", "report": "moecl.evaluation.cli",
              "predict": "moecl.evaluation.predict", "demo": "moecl.demo",
              "import-reference": "moecl.reference_import"}[args.command]
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(target.rsplit(".", 1)[0]) and e.name in target:
            print(f"moecl {args.command}: not yet available in this version", file=sys.stderr)
            return 2
        raise
    return getattr(module, f"run_{args.command.replace('-', '_')}")(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # section.field=value overrides may also come after --options (argparse stops collecting them there)
    leftovers = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not args.command:
        parser.print_help()
        return 1
    from .errors import MoeclError
    try:
        return int(_dispatch(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside the trainer's own handling: one line, no traceback
        print(f"moecl {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MoeclError, FileNotFoundError) as e:
        code = getattr(e, "exit_code", None)  # a run stopped on SIGTERM / SIGINT: its own line and code
        print(f"moecl {args.command}: {e}" if code else f"moecl {args.command}: error: {e}", file=sys.stderr)
        return code or 2


if __name__ == "__main__":
    sys.exit(main())
