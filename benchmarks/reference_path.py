"""(b) The published MoE-adapter path, re-implemented for the benchmark from METHOD.md, vs moecl.

    python -m benchmarks.reference_path --model ViT-B-16-quickgelu --batch 64 --classes 100 [--out FILE]

The published layer (as METHOD.md describes it): per sample, the router of the batch's task reads token 0;
Shazeer's noisy top-k gate (``clean = c @ Wg[t]``, ``+ randn * (softplus(c @ Wn[t]) + 0.01)`` in training,
softmax over the k selected logits, importance/load cv^2 loss computed and not used); a SparseDispatcher:
for EACH expert (a Python loop over all experts, also the empty ones) select the samples routed to it
(index dispatch), run the adapter on their [n_e, L, d] tokens, weight by the gate and scatter-add
(``index_add``) into the output. fp32 by default (``--ref-precision``), as published.

This module is also imported by ``train_step.py`` (the reference is one of its variants).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import common


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    eps = 1e-10
    if x.shape[0] == 1:
        return torch.zeros((), device=x.device, dtype=x.dtype)
    return x.float().var() / (x.float().mean() ** 2 + eps)


class ReferenceMoE(nn.Module):
    """One MoE-adapter site of the published path (benchmark-only code, not part of moecl)."""

    def __init__(self, dim: int, num_experts: int, k: int, width: int, dropout: float, scale: float,
                 tasks: int, noise_eps: float = 0.01):
        super().__init__()
        from moecl.model.experts import AdapterExpert
        self.dim, self.num_experts, self.k, self.noise_eps = dim, num_experts, k, noise_eps
        self.experts = nn.ModuleList([AdapterExpert(dim, width, dropout, scale) for _ in range(num_experts)])
        self.w_gate = nn.ParameterList([nn.Parameter(torch.zeros(dim, num_experts)) for _ in range(tasks)])
        self.w_noise = nn.ParameterList([nn.Parameter(torch.zeros(dim, num_experts)) for _ in range(tasks)])
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))
        self.l_aux = None

    def _prob_in_top_k(self, clean, noisy, noise_stddev, noisy_top_values):
        batch, m = clean.size(0), noisy_top_values.size(1)
        top_values_flat = noisy_top_values.flatten()
        threshold_positions_if_in = torch.arange(batch, device=clean.device) * m + self.k
        threshold_if_in = torch.gather(top_values_flat, 0, threshold_positions_if_in).unsqueeze(1)
        is_in = torch.gt(noisy, threshold_if_in)
        threshold_if_out = torch.gather(top_values_flat, 0, threshold_positions_if_in - 1).unsqueeze(1)
        normal = torch.distributions.Normal(self.mean, self.std)
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_stddev)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_stddev)
        return torch.where(is_in, prob_if_in, prob_if_out)

    def noisy_top_k_gating(self, x: torch.Tensor, train: bool, task: int):
        clean_logits = x @ self.w_gate[task]
        if train:
            raw_noise_stddev = x @ self.w_noise[task]
            noise_stddev = F.softplus(raw_noise_stddev) + self.noise_eps
            noisy_logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
            logits = noisy_logits
        else:
            logits = clean_logits
        top_logits, top_indices = logits.topk(min(self.k + 1, self.num_experts), dim=1)
        top_k_logits, top_k_indices = top_logits[:, :self.k], top_indices[:, :self.k]
        top_k_gates = F.softmax(top_k_logits, dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_k_indices, top_k_gates)
        if train and self.k < self.num_experts:
            load = self._prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0)
        return gates, load

    def forward(self, x, route_tokens, task_ids, single_task=None):
        """``x`` [B, L, d]; the published path has one task per batch (a global task id)."""
        task = single_task if single_task is not None else int(task_ids[0])
        gates, load = self.noisy_top_k_gating(route_tokens, self.training, task)
        importance = gates.sum(0)
        self.l_aux = (cv_squared(importance) + cv_squared(load)) * 0.01  # computed, never added (parity)
        # SparseDispatcher: sort (sample, expert) pairs by expert, split per expert
        nz = torch.nonzero(gates)
        sorted_experts, index_sorted_experts = nz.sort(0)
        _, expert_index = sorted_experts.split(1, dim=1)
        batch_index = nz[index_sorted_experts[:, 1], 0]
        part_sizes = (gates > 0).sum(0).tolist()  # host sync, as published
        gates_exp = gates[batch_index.flatten()]
        nonzero_gates = torch.gather(gates_exp, 1, expert_index)
        inp_exp = x[batch_index]
        expert_inputs = torch.split(inp_exp, part_sizes, dim=0)
        expert_outputs = [self.experts[i](expert_inputs[i]) for i in range(self.num_experts)]
        stitched = torch.cat(expert_outputs, 0)
        stitched = stitched * nonzero_gates.view(-1, 1, 1).to(stitched.dtype)
        zeros = torch.zeros(x.shape, dtype=stitched.dtype, device=x.device)
        return zeros.index_add(0, batch_index, stitched)


def build_reference(args, ctx, tasks: int = 1):
    """The same frozen backbone with a :class:`ReferenceMoE` beside the MLP of every block of both towers.

    Returns the model (a ``MoECLIP`` whose sites were swapped) and the parameters that train for task 0:
    its router and noise projection in every block and every expert (what moecl trains on task 0)."""
    model = common.build(args, ctx, "dense-adapter")
    from moecl.model.backbone import text_towers
    towers = [(model.clip.visual.transformer, "image_sites"), (text_towers(model.clip)[1], "text_sites")]
    for transformer, attr in towers:
        new_sites = nn.ModuleList()
        for block in transformer.resblocks:
            dim = block.mlp.adapter.expert.dim
            ref = ReferenceMoE(dim, args.experts, args.top_k, args.width, 0.1, 0.1, tasks).to(ctx.device)
            block.mlp.adapter = ref
            new_sites.append(ref)
        setattr(model, attr, new_sites)
    model.requires_grad_(False)
    params = []
    for site in model.sites():
        for p in (site.w_gate[0], site.w_noise[0], *site.experts.parameters()):
            p.requires_grad_(True)
            params.append(p)
    return model, params


def main() -> None:
    from . import train_step
    p = common.base_parser(__doc__.split("\n\n")[0], batch=64, classes=100)
    train_step.add_flags(p)
    args = p.parse_args()
    args.variants = "moecl,reference"
    train_step.run(args, bench="reference_path")


if __name__ == "__main__":
    main()
