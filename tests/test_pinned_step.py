"""One training step of the MoE-adapted tiny CLIP, pinned: logits, every gradient, the selection counts and the
load-balancing losses, as the code of session 3's end (aebd231) computed them (tests/data/pinned_step.json).
A change meant to make the step cheaper must leave these numbers as they were; session 4's operator cuts did, bit
for bit (1,490 tensors compared with ``torch.equal``). Each tensor is pinned by its sum and its absolute sum,
within 1e-4 of the absolute sum: that forgives rounding (the published gate formula, softmax over the k selected
logits, equal to moecl's renormalised probabilities in exact arithmetic, moves figures by up to 1.8e-5 of it) but
not a changed formula (the adapters' output scale off by 1% moves the logits' sum by 1%; both measured when this
test was written).

Record again, with code you trust: ``python tests/test_pinned_step.py > tests/data/pinned_step.json``."""
import json
import sys
from pathlib import Path

import torch

from helpers import inputs, scramble
from moecl.config import ModelConfig, MoEConfig
from moecl.model import build_model

PINNED = Path(__file__).resolve().parent / "data" / "pinned_step.json"


def step_figures() -> dict[str, list[float]]:
    """Sum and absolute sum of each output of one training forward/backward, one-task and mixed-task batches."""
    out: dict[str, list[float]] = {}
    for case, ids in (("one_task", 1), ("mixed", [0, 1, -1, 1, 0, -1])):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="moecl-tiny"), MoEConfig(num_experts=6, width=8))
        model.add_task()
        model.add_task()
        scramble(model)
        images, tokens = inputs()
        task_ids = ids if isinstance(ids, int) else torch.tensor(ids)
        model.train()
        torch.manual_seed(2)  # gate noise and expert dropout
        logits = model(images, model.trim_prompts(tokens), task_ids, 1)
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        tensors = {"logits": logits.detach()}
        tensors.update({f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        for i, site in enumerate(model.moe_sites()):
            tensors[f"counts.{i}"] = site.counts.double()
            tensors[f"l_aux.{i}"] = site.l_aux.detach().reshape(1)
        for name, t in tensors.items():
            t = t.double()
            out[f"{case}.{name}"] = [float(t.sum()), float(t.abs().sum())]
    return out


def test_one_training_step_is_unchanged():
    pinned = json.loads(PINNED.read_text())["figures"]
    now = step_figures()
    assert set(now) == set(pinned)
    assert sum(1 for k in now if k.startswith("one_task.grad.")) >= 2 * (2 + 2 + 4 * 6)  # routers, noise, experts
    for name, (total, size) in pinned.items():
        assert abs(now[name][1] - size) <= 1e-6 + 1e-4 * size, (name, now[name], (total, size))
        assert abs(now[name][0] - total) <= 1e-6 + 1e-4 * size, (name, now[name], (total, size))


if __name__ == "__main__":
    json.dump({"_doc": "tests/test_pinned_step.py: sum and absolute sum of each output of one training step",
               "figures": step_figures()}, sys.stdout, indent=0)
    print()
