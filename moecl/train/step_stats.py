"""Per-step training figures kept on the device and read on the host only at the logging interval.

A ``float(loss)`` or ``bool(isfinite(loss))`` in every step makes the host wait for the GPU once per step, so
the next step cannot be queued while this one runs. The non-finite check therefore stays a device tensor (the
same decision on every rank through one all-reduce), the loss of a bad step is replaced by zero as before
(``loss.nan_to_num(0) * 0``), and the host learns about it at the next :meth:`StepStats.read`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class StepReport:
    """What :meth:`StepStats.read` found since the last read."""
    loss: float  # mean micro-batch loss of the last step
    aux: float  # its load-balancing loss
    skipped: int  # steps with a non-finite loss (their gradient was zero)
    first_bad_step: Optional[int]  # the first of them, None when all were finite
    first_bad_loss: float  # its loss value (nan or inf)


class StepStats:
    """Device-side accumulators of one task's training loop."""

    def __init__(self, device: torch.device):
        self.device = device
        self._zero()

    def _zero(self) -> None:
        z = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        self.loss, self.aux = z(torch.float32), z(torch.float32)
        self.skipped, self.bad_loss = z(torch.long), z(torch.float32)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def new_step(self) -> None:
        self.loss.zero_()
        self.aux.zero_()

    def guard(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss`` where every rank's loss is finite, else ``loss.nan_to_num(0) * 0`` (what the trainer used
        to do after a host-side check)."""
        ok = torch.isfinite(loss.detach()).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:  # all ranks take the same decision
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        ok = ok.bool()
        first = ~ok & (self.first_bad < 0)
        self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, step), self.first_bad)
        self.skipped += (~ok).long()
        return torch.where(ok, loss, loss.nan_to_num(0.0) * 0.0)

    def add(self, loss: torch.Tensor, aux: Optional[torch.Tensor], weight: float) -> None:
        """Add one micro-batch; ``aux`` None when the step did not compute it (read only at logging steps)."""
        self.loss += loss.detach().float() * weight
        if aux is not None:
            self.aux += aux.detach().float().to(self.device) * weight

    def read(self) -> StepReport:
        """The host's view (one synchronisation); resets the non-finite record."""
        first = int(self.first_bad)
        report = StepReport(float(self.loss), float(self.aux), int(self.skipped), first if first >= 0 else None,
                            float(self.bad_loss))
        self.skipped.zero_()
        self.first_bad.fill_(-1)
        self.bad_loss.zero_()
        return report
