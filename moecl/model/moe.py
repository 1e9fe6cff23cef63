"""One MoE-adapter site: a DeepSpeed ``MoE`` layer with our gate, routing per sample or per token."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn

from .. import compat
from ..config import MoEConfig
from .experts import AdapterExpert, GroupedExperts
from .gate import RouteInput, TaskRouterGate, balance_loss, route_weights


class _AllGather(torch.autograd.Function):
    """All-gather a flat tensor over a group (forward); reduce-scatter the gradient back (backward). gloo
    has no reduce-scatter: there the gradient is all-reduced and this rank's slice taken."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group=group)
        out = local.new_empty(world * local.numel())
        dist.all_gather_into_tensor(out, local.contiguous().view(-1), group=group)
        return out.view((world,) + tuple(local.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine.view(-1), grad.view(-1), group=ctx.group)
        else:
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            mine = grad[dist.get_rank(group=ctx.group)]
        return mine, None


class _StackExperts(torch.autograd.Function):
    """The weights of E experts as ``[2E, r, d]`` (down weights, then up weights transposed), the down biases
    ``[E, r]`` and the up biases ``[E, d]``. torch.stack would do the same, but its backward hands each expert
    a view of the stacked gradient, and the transposed up-weight views make autograd copy 22 gradients one by
    one; here the backward transposes all up-weight gradients in one copy."""

    @staticmethod
    def forward(ctx, e: int, *tensors: torch.Tensor):
        down, up, b_down, b_up = (tensors[i * e:(i + 1) * e] for i in range(4))
        ctx.e = e
        return torch.stack(list(down) + [u.t() for u in up]), torch.stack(b_down), torch.stack(b_up)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor, grad_bd: torch.Tensor, grad_bu: torch.Tensor):
        e = ctx.e
        down = grad_w[:e].unbind(0)
        up = grad_w[e:].transpose(1, 2).contiguous().unbind(0)
        return (None, *down, *up, *grad_bd.unbind(0), *grad_bu.unbind(0))


class MoEAdapter(MoE):
    """DeepSpeed ``MoE`` (so the engine finds it, builds expert-parallel groups and param groups, and
    checkpoints its experts one file per expert) whose gate is :class:`TaskRouterGate`.

    Per-sample routing views a block input ``[B, L, d]`` as ``[B, L*d]`` rows: the router reads one token per
    sample and the chosen experts process all of that sample's tokens. Per-token routing uses ``[B*L, d]``.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        compat.init_moe_container(self, cfg.num_experts, cfg.ep_size)  # MoE.__init__ less its gate and experts
        self.dim, self.routing = dim, cfg.routing
        self.aux_loss_weight = cfg.aux_loss_weight
        self.ep_mode = cfg.ep_mode
        expert = AdapterExpert(dim, cfg.width, cfg.dropout, cfg.scale)
        experts = GroupedExperts(expert, self.num_local_experts, self.expert_group_name)
        for i, ex in enumerate(experts.deepspeed_experts):  # independent kaiming draws per expert
            if i:
                ex.reset_parameters()
        gate = TaskRouterGate(dim, cfg.num_experts, cfg.top_k, capacity_factor=cfg.capacity_factor,
                              drop_tokens=cfg.drop_tokens, drop_policy=cfg.drop_policy,
                              noise_eps=cfg.noise_eps, shared_router=cfg.shared_router)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, self.ep_size,
                                      self.num_local_experts)
        # activate-freeze state, indexed by GLOBAL expert id
        self.register_buffer("counts", torch.zeros(cfg.num_experts, dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(cfg.num_experts, dtype=torch.bool))
        self.register_buffer("_one", torch.ones((), dtype=torch.long), persistent=False)  # a route's count
        self._l_aux: Optional[torch.Tensor] = None

    # -- structure -------------------------------------------------------------------------------------
    @property
    def gate(self) -> TaskRouterGate:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def expert_rank(self) -> int:
        """This rank's index in the expert-parallel group (0 when not parallel)."""
        group = self.deepspeed_moe.ep_group
        return dist.get_rank(group=group) if self.ep_size > 1 and group is not None else 0

    def global_expert_ids(self) -> list[int]:
        first = self.expert_rank() * self.num_local_experts
        return list(range(first, first + self.num_local_experts))

    # -- forward -----------------------------------------------------------------------------------------
    @property
    def l_aux(self) -> Optional[torch.Tensor]:
        """Load-balancing loss of the last forward. With ``aux_loss_weight`` 0 it is only logged: the gathered
        path leaves it to the gate's recorded routes, and it is computed on first read, outside the step."""
        if self._l_aux is None:
            self._l_aux = self.gate.recorded_balance_loss()
        return self._l_aux

    @l_aux.setter
    def l_aux(self, value: Optional[torch.Tensor]) -> None:
        self._l_aux = value

    def forward(self, x: torch.Tensor, route_tokens: torch.Tensor, task_ids: torch.Tensor,
                single_task: Optional[int] = None) -> torch.Tensor:
        """``x`` [B, L, d]; ``route_tokens`` [B, d] (the token each sample's router reads); ``task_ids`` [B]
        with -1 = plain CLIP. Returns the MoE output [B, L, d], exactly zero for rows with id -1."""
        if single_task is not None:  # every row takes the adapters of task ``single_task`` >= 0
            return self._run(x, route_tokens, task_ids, single_task, None)
        active = task_ids >= 0
        if self.ep_size == 1:
            # skip plain-CLIP rows entirely (no collectives to keep in step when experts are local)
            if not bool(active.any()):
                return torch.zeros_like(x)
            if not bool(active.all()):
                idx = active.nonzero().squeeze(1)
                out = torch.zeros_like(x)
                sub = self._run(x[idx], route_tokens[idx], task_ids[idx], None, None)
                return out.index_copy(0, idx, sub.to(out.dtype))
            return self._run(x, route_tokens, task_ids, None, None)
        return self._run(x, route_tokens, task_ids.clamp(min=0), None, active)

    def _run(self, x, route_tokens, task_ids, single_task, active) -> torch.Tensor:
        b, length, d = x.shape
        if self.routing == "sample" and not self.gate.drop_tokens and (
                (self.ep_size == 1 and active is None) or (self.ep_size > 1 and self.ep_mode == "gather")):
            return self._run_gathered(x, route_tokens, task_ids, single_task, active)
        if self.routing == "sample":
            rows = x.reshape(b, length * d)
            route = RouteInput(route_tokens, task_ids, single_task, active)
        else:
            rows = x.reshape(b * length, d)
            route = RouteInput(rows, task_ids.repeat_interleave(length), single_task,
                               None if active is None else active.repeat_interleave(length))
        out = self.deepspeed_moe(rows, route)
        self.l_aux = self.deepspeed_moe.l_aux
        if self.training and torch.is_grad_enabled() and not compat.in_backward():
            # (activation checkpointing re-runs this forward inside backward: count each sample once)
            self.counts += self.gate.last_counts.to(self.counts.device)
        out = out.reshape(b, length, d)
        if active is not None:
            out = torch.where(active.view(b, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out

    def _run_gathered(self, x, route_tokens, task_ids, single_task, active=None) -> torch.Tensor:
        """Experts local and nothing dropped: each sample's k adapters as two batched matmuls over that sample's
        gathered expert weights. Same routing and the same parameters as the DeepSpeed dispatch, without its
        capacity padding (E x max-load rows for B x k routes), and without a host synchronisation: the
        selection counts stay on the device. With experts sharded (``ep_mode: gather``) the block's expert
        weights are all-gathered first and their gradients reduce-scattered back; ``active`` [B] bool then
        marks the rows that take the adapters (the others get gate 0: an exactly zero output).

        Every operator here is one kernel launch on a GPU, so the step computes only what the update needs:
        the load-balancing loss (when only logged) and :attr:`TaskRouterGate.last_counts` are derived from
        the recorded routes when read; the running counts take one scatter-add."""
        gate = self.gate
        b, length, d = x.shape
        probs = gate.logits(route_tokens, task_ids, single_task).softmax(dim=1)
        top, idx = probs.topk(gate.k, dim=1)  # [B, k], as DeepSpeed's topkgating selects
        g = top / top.sum(dim=1, keepdim=True)  # (the k largest of a softmax sum to >= k/E: no clamp needed)
        gate.record_routes(probs, idx, active)
        self.l_aux = balance_loss(probs, idx, self.num_experts, gate.k) if self.aux_loss_weight else None
        if active is not None:
            g = g * active.to(g.dtype).unsqueeze(1)
        if self.training and torch.is_grad_enabled() and not compat.in_backward():
            ones = self._one if active is None else route_weights(idx, active)
            self.counts.index_put_((idx.reshape(-1),), ones, accumulate=True)
        first = self.local_experts[0]
        k, r, scale = gate.k, first.width, first.scale
        w, b_down, b_up = self._expert_tensors()
        w_down, w_up = w.index_select(1, idx.reshape(-1)).unbind(0)  # [B*k, r*d] each
        gs = (g * scale).to(w.dtype)  # gate x scale of each (sample, expert), folded into the hidden units
        wd = w_down.view(b, k * r, d).transpose(1, 2)  # [B, d, k*r]
        wu = w_up.view(b, k * r, d)  # [B, k*r, d]
        bd = b_down[idx].reshape(b, 1, k * r)
        bu = (b_up[idx] * gs[..., None]).sum(1, keepdim=True)  # [B, 1, d]
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        h = first.dropout(F.relu(torch.baddbmm(bd.to(dt), x.to(dt), wd.to(dt))))
        h = (h.view(b, length, k, r) * gs.to(dt).view(b, 1, k, 1)).view(b, length, k * r)
        return torch.baddbmm(bu.to(dt), h, wu.to(dt))

    def _expert_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every expert of the block: down weights and transposed up weights ``[2, E, r*d]`` (one stack: a
        copy of the E experts, not of the B x k gathered ones), down biases ``[E, r]``, up biases ``[E, d]``.
        With ``ep_size > 1`` each rank contributes its local experts through one all-gather."""
        experts = self.local_experts
        first = experts[0]
        r, d, e = first.width, first.dim, len(experts)
        w, b_down, b_up = _StackExperts.apply(
            e, *[ex.down.weight for ex in experts], *[ex.up.weight for ex in experts],
            *[ex.down.bias for ex in experts], *[ex.up.bias for ex in experts])
        if self.ep_size == 1:
            return w.view(2, e, r * d), b_down, b_up
        flat = torch.cat([w.view(-1), b_down.view(-1), b_up.view(-1)])
        if torch.is_grad_enabled() and not flat.requires_grad:
            # every local expert frozen: still take part in the backward's reduce-scatter (a collective)
            flat = flat.detach().requires_grad_()
        every = _AllGather.apply(flat, self.deepspeed_moe.ep_group)  # [ep, N], ranks in global expert order
        n = self.ep_size * e
        w = every[:, :2 * e * r * d].reshape(self.ep_size, 2, e, r * d).transpose(0, 1).reshape(2, n, r * d)
        b_down = every[:, 2 * e * r * d:2 * e * r * d + e * r].reshape(n, r)
        b_up = every[:, 2 * e * r * d + e * r:].reshape(n, d)
        return w, b_down, b_up

    # -- activate-freeze ---------------------------------------------------------------------------------
    def reduced_counts(self) -> torch.Tensor:
        """Selection counts of the current task summed over every rank."""
        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return counts

    def freeze_most_selected(self, k: int, counts: Optional[torch.Tensor] = None) -> list[int]:
        """Freeze the ``k`` most-selected experts of this task (union with earlier tasks)."""
        counts = self.reduced_counts() if counts is None else counts
        newly = []
        if k > 0 and int(counts.sum()) > 0:
            # stable order: ties go to the lower expert id, the same on every rank
            order = sorted(range(self.num_experts), key=lambda e: (-int(counts[e]), e))
            newly = order[:k]
            self.frozen[newly] = True
        self.apply_frozen()
        return newly

    def apply_frozen(self) -> None:
        for gid, ex in zip(self.global_expert_ids(), self.local_experts):
            ex.requires_grad_(not bool(self.frozen[gid]))
