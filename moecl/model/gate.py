"""Per-task noisy top-k routing as small pure functions, plus the DeepSpeed gate that uses them.

The gate plugs into DeepSpeed's ``MOELayer``: it computes our logits (one router and one noise projection
per task, read from a routing feature per sample) and then calls DeepSpeed's own ``topkgating``, whose
renormalised top-k gate values equal a softmax over the k selected logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, topkgating
from torch import nn

from .. import compat


@dataclass
class RouteInput:
    """What the gate needs besides the rows: the routing feature and the task of each row."""
    features: torch.Tensor  # [S, d] the token the router reads (token 0 or EOT per sample; itself per token)
    task_ids: torch.Tensor  # [S] long, >= 0 (rows routed to plain CLIP never reach the gate... or are masked)
    single_task: Optional[int] = None  # all rows share this task: one matmul instead of a gather
    active: Optional[torch.Tensor] = None  # [S] bool; inactive rows get zero gates and are not counted


def task_logits(features: torch.Tensor, routers: list[torch.Tensor], task_ids: torch.Tensor,
                single_task: Optional[int] = None) -> torch.Tensor:
    """``features[s] @ routers[task_ids[s]]`` in fp32: [S, d] x T*[d, E] -> [S, E]."""
    f = features.float()
    if single_task is not None:
        return f @ routers[single_task].float()
    stacked = torch.stack([r.float() for r in routers], dim=1)  # [d, T, E]
    d, t, e = stacked.shape
    every = (f @ stacked.reshape(d, t * e)).view(-1, t, e)
    return every.gather(1, task_ids.view(-1, 1, 1).expand(-1, 1, e)).squeeze(1)


def noisy_logits(clean: torch.Tensor, noise_logits: torch.Tensor, eps: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shazeer-style learned noise: ``clean + randn * (softplus(noise_logits) + eps)``."""
    std = F.softplus(noise_logits) + eps
    noise = torch.randn(clean.shape, device=clean.device, dtype=clean.dtype, generator=generator)
    return clean + noise * std


def balance_loss(probs: torch.Tensor, idx: torch.Tensor, num_experts: int, k: int) -> torch.Tensor:
    """DeepSpeed's top-k load-balancing loss from the gate probabilities [S, E] and the chosen experts [S, k]:
    ``E^2 / k * mean_e(mean_s probs * mean_s chosen)``."""
    mask = torch.zeros_like(probs).scatter_(1, idx, 1.0)
    return (probs.mean(0) * mask.mean(0)).mean() * num_experts * num_experts / k


def route_weights(idx: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 per kept route of ``idx`` [S, k] (long); 0 for a dropped route (-1) and for the routes of a row whose
    ``active`` is False."""
    keep = idx >= 0
    if active is not None:
        keep = keep & active.unsqueeze(1)
    return keep.reshape(-1).long()


def route_counts(idx: torch.Tensor, num_experts: int, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How often each expert was chosen: idx [S, k] (-1 = dropped), rows with ``active`` False not counted.
    A scatter-add, not a bincount: the output's size is known, so the host never waits for the device."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=idx.device)
    return counts.index_put_((idx.clamp(min=0).reshape(-1).long(),), route_weights(idx, active), accumulate=True)


def selection_counts(indices: torch.Tensor, num_experts: int, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`route_counts` of DeepSpeed's sparse routes, laid out [k, S]."""
    return route_counts(indices.t(), num_experts, active)


class TaskRouterGate(TopKGate):
    """DeepSpeed ``TopKGate`` with one zero-initialised router and noise projection per task."""

    def __init__(self, model_dim: int, num_experts: int, k: int, *, capacity_factor: float = 1.0,
                 drop_tokens: bool = False, drop_policy: str = "probs", noise_eps: float = 0.01,
                 shared_router: bool = False):
        super().__init__(model_dim, num_experts, k, capacity_factor, capacity_factor, min_capacity=0,
                         noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=False)
        del self.wg  # replaced by the per-task routers below
        self.model_dim, self.num_experts = model_dim, num_experts
        self.drop_policy, self.noise_eps, self.shared_router = drop_policy, noise_eps, shared_router
        self.routers = nn.ParameterList()
        self.noise = nn.ParameterList()
        self._routes: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None
        self.last_counts = None
        self.eval_noise = False  # noise at test time too (the published CIL evaluation); see MoECLIP.set_eval_gate_noise

    @property
    def last_counts(self) -> Optional[torch.Tensor]:
        """Selection counts [E] of the last forward (derived on first read from the routes the gathered path
        records: the step itself needs only the MoE site's running ``counts``)."""
        if self._last_counts is None and self._routes is not None:
            _, idx, active = self._routes
            self._last_counts = route_counts(idx, self.num_experts, active)
        return self._last_counts

    @last_counts.setter
    def last_counts(self, value: Optional[torch.Tensor]) -> None:
        self._last_counts, self._routes = value, None

    def record_routes(self, probs: torch.Tensor, idx: torch.Tensor, active: Optional[torch.Tensor]) -> None:
        """The last forward's gate probabilities [S, E], routes [S, k] and active rows, from which
        :attr:`last_counts` and :meth:`recorded_balance_loss` are derived when read."""
        self._last_counts, self._routes = None, (probs.detach(), idx.detach(), active)

    def recorded_balance_loss(self) -> Optional[torch.Tensor]:
        """:func:`balance_loss` of the recorded routes (no graph: only for logging); None if none recorded."""
        if self._routes is None:
            return None
        probs, idx, _ = self._routes
        with torch.no_grad():
            return balance_loss(probs, idx, self.num_experts, self.k)

    @property
    def noisy(self) -> bool:
        """Whether logits get noise now: always in training, at eval only when ``eval_noise`` is set."""
        return self.training or self.eval_noise

    def add_task(self) -> None:
        if self.shared_router and len(self.routers) == 1:
            return
        device = self.routers[0].device if len(self.routers) else None
        for plist in (self.routers, self.noise):
            plist.append(nn.Parameter(torch.zeros(self.model_dim, self.num_experts, device=device)))

    def router_index(self, task: int) -> int:
        return 0 if self.shared_router else task

    def _set_ep_group(self, ep_group) -> None:  # (DeepSpeed's asserts on a second call: one engine per task)
        compat.set_gate_ep_group(self, ep_group)

    def logits(self, features: torch.Tensor, task_ids: torch.Tensor,
               single_task: Optional[int] = None) -> torch.Tensor:
        """The routing logits [S, E] in fp32: each row's task router, plus learned noise when :attr:`noisy`.
        The one definition both execution paths (DeepSpeed's dispatch and the gathered path) route with."""
        if self.shared_router:
            task_ids, single_task = torch.zeros_like(task_ids), 0
        clean = task_logits(features, list(self.routers), task_ids, single_task)
        if not self.noisy:
            return clean
        return noisy_logits(clean, task_logits(features, list(self.noise), task_ids, single_task), self.noise_eps)

    def forward(self, input: torch.Tensor, route: RouteInput, sparse_routes: bool = True,
                use_tutel: bool = False):
        assert sparse_routes, "this DeepSpeed version dispatches sparse routes"
        logits = self.logits(route.features, route.task_ids, route.single_task)
        cap = self.capacity_factor if self.training else self.eval_capacity_factor
        l_aux, capacity, num_experts, indices, locations, gates, _ = topkgating(
            logits, self.k, cap, self.min_capacity, self.drop_tokens, self.ep_group, self.drop_policy,
            sparse_routes=True)
        if route.active is not None:
            gates = gates * route.active.to(gates.dtype).unsqueeze(0)
        self.last_counts = selection_counts(indices, num_experts, route.active)
        return l_aux, capacity, num_experts, indices, locations, gates, self.last_counts
