"""Two gloo ranks evaluate the one-hot stub (tests/evaluator_stub.py) with padded equal batches; rank 0 writes the
reduced numbers to argv[2] (tests/test_evaluator.py compares them with the hand-derived ones)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from evaluator_stub import evaluate_all  # noqa: E402
from ending import end_world  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = evaluate_all(Path(sys.argv[1]), rank=rank, world_size=world, batch_size=3, collective_routes=True)
    if rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(out))
    end_world()


if __name__ == "__main__":
    main()
