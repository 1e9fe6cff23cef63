"""Two gloo ranks reduce set results whose routes differ beyond id 63 (rank 0 saw route 70, rank 1 did not);
rank 0 writes the reduced result to argv[1] (tests/test_evaluator.py). Every collective is bounded by a 60 s
timeout, so a mismatch of all-reduce sizes fails instead of hanging."""
import json
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from moecl.evaluation.evaluator import Evaluator, SetResult  # noqa: E402
from ending import end_world  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    ev = Evaluator(None, None, None, device=None, batch_size=1, rank=rank, world_size=world)
    mine = {0: SetResult(5, 9, {-1: 2, 3: 4, 70: 3}, 1), 1: SetResult(2, 6, {-1: 1, 5: 5}, 4)}[rank]
    out = ev._reduce(mine)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"correct": out.correct, "total": out.total,
                                                 "routes": {str(k): v for k, v in sorted(out.routes.items())},
                                                 "zero_shot_correct": out.zero_shot_correct}))
    end_world()


if __name__ == "__main__":
    main()
