"""``moecl train``: the trainer, with a console a person can read (timestamped INFO lines on rank 0,
warnings on every rank; DEBUG lines and library chatter go to ``RUN/train.log`` only)."""
from __future__ import annotations

import contextlib
import logging
import sys

CONSOLE_FORMAT = "%(asctime)s %(message)s"
CONSOLE_TIME = "%H:%M:%S"


@contextlib.contextmanager
def console(is_main: bool):
    """The 'moecl' logger on stderr for the duration of one command, restored afterwards."""
    ours = logging.getLogger("moecl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, CONSOLE_TIME))
    handler.setLevel(logging.INFO if is_main else logging.WARNING)
    quiet = {name: logging.getLogger(name).level for name in ("DeepSpeed", "deepspeed", "torch.distributed")}
    propagate = ours.propagate
    ours.addHandler(handler)
    ours.propagate = False  # not twice through a root handler some library set up
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.propagate = propagate
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def run_train(args) -> int:
    from ..runtime import distributed
    from .loop import train
    # the first call creates the world and fixes its collective timeout: pass the configured one here
    with distributed(args.cfg.runtime.device, args.cfg.runtime.collective_timeout_s) as info:
        is_main = info.is_main
        with console(is_main):
            report = train(args.cfg, args.out, args.resume,
                           allow_config_change=getattr(args, "allow_config_change", False))
    if is_main:
        from ..evaluation.report import summary_text
        print(summary_text(report))
        print(f"run folder: {args.out}")
    return 0
