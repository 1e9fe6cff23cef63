"""The last call of every script in tests/dist, on every rank."""
import os
import sys

import torch.distributed as dist


def end_world() -> None:
    """Wait for the other ranks, destroy the process group, and leave without the interpreter's teardown. After
    the script's work is done and its files are closed, torch's static destructors abort a rank now and then at
    interpreter exit ("terminate called without an active exception", SIGABRT with no Python frame, found with
    PYTHONFAULTHANDLER=1): eval_once_ranks.py ending with destroy_process_group failed so in 2 of 10 runs, and
    with a barrier before it in 1 of 24. torchrun then reports the whole run as failed."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
