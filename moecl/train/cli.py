"""``moecl train``."""
from __future__ import annotations


def run_train(args) -> int:
    from .loop import train
    report = train(args.cfg, args.out, args.resume)
    from ..runtime import init_distributed
    if init_distributed(args.cfg.runtime.device).is_main:
        from ..evaluation.report import summary_text
        print(summary_text(report))
        print(f"run folder: {args.out}")
    return 0
