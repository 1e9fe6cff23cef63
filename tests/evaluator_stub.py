"""A stub CLIP whose features and heads are one-hot, and the tiny tasks it reads, so that every accuracy the
Evaluator reports is known by hand (tests/test_evaluator.py, tests/dist/evaluator_ranks.py).

Images are solid colours: red = 20 x g + 10 for global class g (task "a": c0..c3, task "b": c4..c6). The stub
preprocess reads g back; the image feature is one-hot(g). The class head of route r is one-hot(g) when task r owns
class g, and otherwise (zero-shot included) one-hot of the next class of g's own task, so an image of class g
scores only against the previous class: a sample is right exactly when its route is its own task. The stub
selector routes even classes to their task and odd classes to zero-shot.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

DIM = 16
TASKS = {"a": ["c0", "c1", "c2", "c3"], "b": ["c4", "c5", "c6"]}
TEST_COUNTS = {"c0": 3, "c1": 2, "c2": 2, "c3": 1, "c4": 2, "c5": 2, "c6": 3}  # a: 8, b: 7


def owner(g: torch.Tensor) -> torch.Tensor:
    return (g >= len(TASKS["a"])).long()


class OneHotCLIP:
    def eval(self):
        return self

    def encode_image(self, images, task_ids=-1, normalize=False):
        return F.one_hot(images[:, 0].round().long().clamp(0, DIM - 1), DIM).float()

    def trim_prompts(self, tokens):  # nothing to trim: one token per class name
        return tokens

    def encode_text(self, tokens, task_ids=-1, normalize=False):
        g = tokens[:, 0]
        right = owner(g) == torch.as_tensor(task_ids)
        a = len(TASKS["a"])
        nxt = torch.where(g < a, (g + 1) % a, a + (g - a + 1) % len(TASKS["b"]))
        return F.one_hot(torch.where(right, g, nxt), DIM).float()


class EvenToTaskSelector:
    num_tasks = 2

    def select(self, features, decision="sample"):
        g = features.argmax(dim=1)
        return torch.where(g % 2 == 0, owner(g), torch.full_like(g, -1))


def tokenizer(texts):
    return torch.tensor([[int(re.search(r"\bc(\d+)\b", t).group(1))] for t in texts])


def preprocess(image: Image.Image) -> torch.Tensor:
    red = image.convert("RGB").getpixel((0, 0))[0]
    return torch.tensor([(red - 10) / 20.0])


def build_tasks(root: Path) -> Path:
    """Write tasks a and b (test shards of at most 5 samples, so two ranks get unequal shares)."""
    from data_tools.folder import convert_folder
    from data_tools.writer import WriteOptions
    for task, classes in TASKS.items():
        src = root / "src" / task
        for c in classes:
            g = int(c[1:])
            for split, n in (("train", 1), ("test", TEST_COUNTS[c])):
                (src / split / c).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.new("RGB", (8, 8), (20 * g + 10, 0, 0)).save(src / split / c / f"{i}.png")
        convert_folder(src, root / "data", task=task, classnames=classes, template="a photo of {}.",
                       eval_templates=["a photo of {}.", "a drawing of {}."],
                       opts=WriteOptions(shard_size=5, progress=False))
    return root / "data"


def evaluate_all(data: Path, rank: int = 0, world_size: int = 1, batch_size: int = 3,
                 collective_routes: bool = False) -> dict:
    """Every case of the tests, as plain numbers: {case: [correct, total, routes-confusion-row]}."""
    from moecl.data import read_task
    from moecl.evaluation.evaluator import Evaluator, cil_label_set, confusion_row, label_set
    tasks = [read_task(data / name) for name in TASKS]
    ev = Evaluator(OneHotCLIP(), tokenizer, preprocess, device=torch.device("cpu"), batch_size=batch_size,
                   rank=rank, world_size=world_size, collective_routes=collective_routes)
    out = {}

    def record(case, r):
        out[case] = [r.correct, r.total, confusion_row(r, 2)]

    for j, task in enumerate(tasks):
        ls = label_set(task)
        record(f"oracle/{task.name}", ev.evaluate(task, ls, mode="oracle", oracle_route=j, trained=2))
        record(f"oracle-wrong/{task.name}", ev.evaluate(task, ls, mode="oracle", oracle_route=1 - j, trained=2))
        record(f"zero-shot/{task.name}", ev.evaluate(task, ls, mode="oracle", oracle_route=-1, trained=2))
        record(f"agnostic/{task.name}", ev.evaluate(task, ls, mode="agnostic", oracle_route=j,
                                                    selector=EvenToTaskSelector(), trained=2))
    cil = cil_label_set(tasks, "train")
    offset = 0
    for j, task in enumerate(tasks):
        record(f"cil/{task.name}", ev.evaluate(task, cil, mode="oracle", oracle_route=j, label_offset=offset,
                                               trained=2))
        offset += task.num_classes
    return out


# by hand from TEST_COUNTS: even classes c0 (3), c2 (2) of a; c4 (2), c6 (3) of b
EXPECTED = {
    "oracle/a": [8, 8, [8, 0, 0]], "oracle/b": [7, 7, [0, 7, 0]],
    "oracle-wrong/a": [0, 8, [0, 8, 0]], "oracle-wrong/b": [0, 7, [7, 0, 0]],
    "zero-shot/a": [0, 8, [0, 0, 8]], "zero-shot/b": [0, 7, [0, 0, 7]],
    "agnostic/a": [5, 8, [5, 0, 3]], "agnostic/b": [5, 7, [0, 5, 2]],
    "cil/a": [8, 8, [8, 0, 0]], "cil/b": [7, 7, [0, 7, 0]],
}
