"""``python -m data_tools SUBCOMMAND``: turn datasets into WebDataset shards a moecl run streams."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LAYOUT = ("Output: ROOT/<task>/<split>-NNNNNN.tar (image + .cls + .json per sample), task.json (class names, "
          "templates, counts, shards, sha256), sizes.json (open_clip's format), bad_images.json. Re-running "
          "skips complete shards.")


def _folder(sub) -> None:
    from .common import add_write_args
    p = sub.add_parser("folder", help="a class-per-subfolder tree or a CSV/JSONL manifest into one task "
                                      "(or, with --tasks N, into N class-incremental tasks)",
                       description="Convert SRC/<class>/* (or SRC/<split>/<class>/*, or a CSV/JSONL manifest with "
                                   "path,label[,split]) into the shards of one task; with --tasks N, cut its classes "
                                   "into N class-incremental tasks TASK-01..TASK-N and write the sequence file "
                                   "OUT/TASK.yaml (kind: cil) to train them: moecl train ... data.root=OUT "
                                   "data.sequence=OUT/TASK.yaml. Folder names / labels are the class names; integer "
                                   "labels need --classnames. " + LAYOUT)
    p.add_argument("src", help="image tree or manifest file (.csv / .jsonl)")
    p.add_argument("--out", required=True, help="data root; the task goes to OUT/TASK")
    p.add_argument("--task", default=None, help="task name (default: the source's name)")
    p.add_argument("--split", default="train", help="split name of a tree without split folders (default train)")
    p.add_argument("--classnames", default=None,
                   help="name the classes: a mapping LABEL=NAME (4=four,5=five, or a file of two columns "
                        "'LABEL NAME'), or names by position (a,b,c or a file with one per line: integer label 0 is "
                        "the first name)")
    p.add_argument("--tasks", type=int, default=None,
                   help="cut the classes into N class-incremental tasks (sizes differ by at most one) and write "
                        "OUT/TASK.yaml")
    p.add_argument("--class-order", default=None,
                   help="with --tasks: the class order, comma-separated names (default: sorted labels)")
    p.add_argument("--class-seed", type=int, default=None,
                   help="with --tasks: a seeded random class order (torch.randperm, as Avalanche's nc_benchmark)")
    p.add_argument("--template", default="a photo of a {}.", help="training prompt template ('{}' = class)")
    p.add_argument("--eval-template", action="append", default=None,
                   help="an evaluation template (repeat for an ensemble; default: the training template)")
    p.add_argument("--test-fraction", type=float, default=None, help="split a single-split source: test share")
    p.add_argument("--seed", type=int, default=42, help="seed of --test-fraction (default 42)")
    p.add_argument("--keep-underscores", action="store_true", help="do not turn _ into spaces in class names")
    add_write_args(p)


def _mtil(sub) -> None:
    from .common import add_write_args
    p = sub.add_parser("mtil", help="the 11 MTIL datasets from torchvision-format folders",
                       description="Convert Aircraft, Caltech101, CIFAR100, DTD, EuroSAT, Flowers, Food, MNIST, "
                                   "OxfordPet, StanfordCars and SUN397 from the folders torchvision's dataset "
                                   "classes read (SRC/fgvc-aircraft-2013b, SRC/caltech101, SRC/cifar100 (image-folder "
                                   "export), SRC/dtd, SRC/eurosat, SRC/flowers-102, SRC/food-101, SRC/MNIST, "
                                   "SRC/oxford-iiit-pet, SRC/stanford_cars, SRC/SUN397), with the benchmark's class "
                                   "names, templates and splits (Caltech101, EuroSAT, SUN397: seeded 80/20, seed 42). "
                                   "Flowers and StanfordCars annotations are .mat files: they need scipy. " + LAYOUT)
    p.add_argument("--src", required=True, help="folder holding the torchvision-format dataset folders")
    p.add_argument("--out", required=True, help="data root (e.g. data/mtil, or data/mtil_fewshot with --shots)")
    p.add_argument("--datasets", default=None, help="comma-separated subset (default: all 11)")
    p.add_argument("--shots", type=int, default=None, help="few-shot: keep K training images per class")
    p.add_argument("--seed", type=int, default=1, help="seed of the few-shot choice (default 1)")
    p.add_argument("--skip-missing", action="store_true", help="skip datasets whose folder is absent")
    p.add_argument("--trust-pickle", action="store_true",
                   help="UNSAFE: let torchvision unpickle the official CIFAR100 files (pickles can run code); "
                        "only for files you trust. Without it CIFAR100 must be an image-folder export")
    add_write_args(p)


def _cil(sub) -> None:
    from .common import add_write_args
    p = sub.add_parser("cil", help="class-incremental CIFAR100 (10/20/50 steps) and TinyImageNet (100 + 5/10/20)",
                       description="One task per step, classes in the published order, prompt 'a bad photo of a "
                                   "{}.'. CIFAR100 from SRC/cifar100/{train,test}/<class>/ (or --trust-pickle); "
                                   "TinyImageNet from SRC/tiny-imagenet-200. " + LAYOUT)
    p.add_argument("dataset", choices=("cifar100", "tinyimagenet"))
    p.add_argument("--src", required=True, help="folder holding cifar100/ or tiny-imagenet-200/")
    p.add_argument("--out", required=True, help="data root (e.g. data/cil)")
    p.add_argument("--steps", default=None,
                   help="comma-separated step counts (default: cifar100 10,20,50; tinyimagenet 5,10,20)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="UNSAFE: let torchvision unpickle the official CIFAR100 files; only for files you trust")
    add_write_args(p)


def _synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="the procedurally drawn world: domains as tasks + image-caption pairs",
                       description="Draw a deterministic world of visually distinct domains (shapes, textures, "
                                   "digits, arrows, flags, colors, clocks), one task each, plus pretrain/ "
                                   "(image-caption pairs of every domain) and OUT/sequence.yaml (the last "
                                   "--held-out domains are zero-shot only). A no-op when OUT already holds the "
                                   "same world.")
    p.add_argument("--out", required=True, help="world folder (e.g. data/synthetic)")
    p.add_argument("--domains", default=None, help="comma-separated subset, in sequence order (default: all 7)")
    p.add_argument("--image-size", type=int, default=32, help="pixels (default 32)")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--pretrain-per-class", type=int, default=100, help="0: no pretrain set")
    p.add_argument("--held-out", type=int, default=2, help="last N domains are zero-shot-only (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _verify(sub) -> None:
    p = sub.add_parser("verify", help="check shards against task.json checksums and sample counts",
                       description="Recompute the sha256 and count the samples of every shard listed in the "
                                   "task.json files under ROOT (or of ROOT itself when it is a task folder). "
                                   "Exit status 1 and one line per bad shard when anything differs.")
    p.add_argument("root", help="data root or task folder")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all under ROOT)")
    p.add_argument("--no-counts", action="store_true", help="checksums only")


def _export(sub) -> None:
    p = sub.add_parser("export", help="a task in another tool's layout (clip-benchmark: CLIP_benchmark's WebDataset)",
                       description="Write a task's shards and metadata in CLIP_benchmark's WebDataset layout "
                                   "(OUT/<split>/{0..N-1}.tar + nshards.txt, classnames.txt, "
                                   "zeroshot_classification_templates.txt with {c}), to score a backbone with "
                                   "clip_benchmark eval --dataset wds/NAME --dataset_root OUT. Shards are hard-linked "
                                   "(or copied) and checked against task.json's sha256.")
    p.add_argument("format", choices=("clip-benchmark",))
    p.add_argument("task", help="task folder (DATA_ROOT/TASK, with task.json)")
    p.add_argument("--out", required=True, help="output folder (the --dataset_root of clip_benchmark)")
    p.add_argument("--splits", default=None, help="comma-separated splits (default: all the task has)")
    p.add_argument("--templates", choices=("eval", "train"), default="eval",
                   help="prompts: the task's evaluation ensemble (default) or its training template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools",
                                     description="Turn datasets into WebDataset shards for moecl.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for add in (_folder, _mtil, _cil, _synthetic, _verify, _export):
        add(sub)
    return parser


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args: argparse.Namespace) -> int:
    from .common import write_options
    if args.command == "folder" and (args.tasks is not None or args.class_order or args.class_seed is not None):
        from .folder import convert_class_split, read_classnames_arg
        if args.tasks is None:
            raise ValueError("--class-order / --class-seed need --tasks N")
        folders, seq = convert_class_split(
            args.src, args.out, tasks=args.tasks, name=args.task, split=args.split,
            classnames=read_classnames_arg(args.classnames), order=_csv(args.class_order),
            order_seed=args.class_seed, template=args.template, eval_templates=args.eval_template,
            test_fraction=args.test_fraction, seed=args.seed, keep_underscores=args.keep_underscores,
            opts=write_options(args), build="python -m data_tools " + " ".join(getattr(args, "argv", None) or []))
        for path in folders:
            print(f"wrote {path}")
        print(f"wrote {seq} (train it: moecl train --config demo --out RUN data.root={args.out} data.sequence={seq} "
              "model.init_checkpoint=demo)")
    elif args.command == "folder":
        from .folder import convert_folder, read_classnames_arg
        path = convert_folder(args.src, args.out, task=args.task, split=args.split,
                              classnames=read_classnames_arg(args.classnames), template=args.template,
                              eval_templates=args.eval_template, test_fraction=args.test_fraction, seed=args.seed,
                              keep_underscores=args.keep_underscores, opts=write_options(args))
        print(f"wrote {path}")
    elif args.command == "mtil":
        from .mtil import convert_mtil
        for path in convert_mtil(args.src, args.out, datasets=_csv(args.datasets), trust_pickle=args.trust_pickle,
                                 shots=args.shots, seed=args.seed, skip_missing=args.skip_missing,
                                 opts=write_options(args)):
            print(f"wrote {path}")
    elif args.command == "cil":
        from .cil import convert_cil
        steps = [int(s) for s in _csv(args.steps)] if args.steps else None
        if steps is None:
            from .common import benchmark
            steps = benchmark("cil")[args.dataset]["steps"]
        for path in convert_cil(args.dataset, args.src, args.out, steps=steps, trust_pickle=args.trust_pickle,
                                opts=write_options(args)):
            print(f"wrote {path}")
    elif args.command == "synthetic":
        from .synthetic import build_world
        out = build_world(args.out, domains=_csv(args.domains), image_size=args.image_size,
                          train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                          pretrain_per_class=args.pretrain_per_class, seed=args.seed, held_out=args.held_out,
                          shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress)
        print(f"world ready in {out} (sequence: {Path(out) / 'sequence.yaml'})")
    elif args.command == "export":
        from .export import export_clip_benchmark
        out = export_clip_benchmark(args.task, args.out, _csv(args.splits), templates=args.templates)
        print(f"wrote {out} (clip_benchmark eval --dataset wds/{Path(args.task).name} --dataset_root {out} ...)")
    elif args.command == "verify":
        from .verify import verify
        problems = verify(args.root, _csv(args.tasks), counts=not args.no_counts)
        for line in problems:
            print(f"BAD {line}", file=sys.stderr)
        if problems:
            print(f"verify: {len(problems)} problem(s) under {args.root}", file=sys.stderr)
            return 1
        print(f"verify: all shards under {args.root} match their task.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if not args.command:
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from moecl.errors import MoeclError
    try:
        return run(args)
    except (MoeclError, ValueError, FileNotFoundError) as e:
        print(f"data_tools {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
