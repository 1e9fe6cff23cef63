"""Two gloo ranks score the one-hot stub (tests/evaluator_stub.py) with every mode in one pass and a frozen-feature
cache, twice (two rows; padded equal batches, expert-parallel style collective forwards, then without them);
rank 0 writes the reduced numbers and the work of each row to argv[2] (tests/test_eval_once.py)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from evaluator_stub import TASKS, EvenToTaskSelector, OneHotCLIP, preprocess, tokenizer  # noqa: E402
from ending import end_world  # noqa: E402


def main() -> None:
    from moecl.data import read_task
    from moecl.evaluation.evaluator import Evaluator, RouteMode, confusion_row, label_set
    from moecl.evaluation.frozen import FrozenCache
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tasks = [read_task(Path(sys.argv[1]) / name) for name in TASKS]
    out = {}
    for collective in (True, False):
        cache = FrozenCache({"name": "stub"})
        for row in (0, 1):
            ev = Evaluator(OneHotCLIP(), tokenizer, preprocess, device=torch.device("cpu"), batch_size=3, rank=rank,
                           world_size=world, collective_routes=collective, frozen=cache)
            for j, task in enumerate(tasks):
                modes = [RouteMode("oracle", j), RouteMode("agnostic", j, EvenToTaskSelector())]
                for name, r in zip(("oracle", "agnostic"), ev.evaluate_set(task, label_set(task), modes, trained=2)):
                    out[f"{collective}/{row}/{name}/{task.name}"] = [r.correct, r.total, confusion_row(r, 2)]
            out[f"{collective}/{row}/work"] = ev.reduce_work().as_dict()
    if rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(out))
    end_world()


if __name__ == "__main__":
    main()
