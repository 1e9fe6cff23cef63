"""The trainer's step accounting stays on the device: no host synchronisation in a step, and the
non-finite policy still sees every bad step (its first step and value, how many) when the host reads."""
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moecl.train.step_stats import StepStats


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in ("_local_scalar_dense", "nonzero", "is_nonzero"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_steps_run_without_host_syncs_and_bad_steps_are_reported_at_the_read():
    w = torch.nn.Parameter(torch.ones(3))
    stats = StepStats(torch.device("cpu"))
    syncs = _Syncs()
    grads = []
    with syncs:
        for step, scale in enumerate([1.0, float("nan"), 2.0, float("inf")]):
            stats.new_step()
            loss = (w * scale).sum()
            aux = torch.tensor(0.5)
            loss = stats.guard(loss, step)
            w.grad = None
            loss.backward()
            stats.add(loss, aux, 1.0)
            grads.append(w.grad.clone())
    assert syncs.n == 0
    assert torch.equal(grads[0], torch.ones(3)) and torch.equal(grads[2], torch.full((3,), 2.0))
    r = stats.read()
    assert r.skipped == 2 and r.first_bad_step == 1 and math.isnan(r.first_bad_loss)
    assert r.loss == 0.0 and r.aux == 0.5  # the last step's (zeroed) loss
    stats.new_step()
    stats.add(stats.guard((w * 3.0).sum(), 4), torch.tensor(0.0), 0.5)
    r = stats.read()
    assert r.skipped == 0 and r.first_bad_step is None and r.loss == 4.5
