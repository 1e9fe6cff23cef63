"""Benchmark-only prototypes of speedups for moecl/model, measured next to moecl as it is.

Nothing here is imported by moecl; each function patches ONE built model instance so a benchmark can
time the idea side by side with the unpatched model. The findings (numbers) go to docs/performance.md.

- :func:`use_gathered_experts`: per-sample top-k MoE-adapter as two batched matmuls with per-sample
  GATHERED expert weights (``[B, d, k*r]`` and ``[B, k*r, d]``, the gate folded into the up-projection),
  instead of DeepSpeed's capacity-padded ``[E, capacity, L*d]`` dispatch buffer + combine. The work is
  exactly ``k`` adapters per sample whatever the routing skew; nothing is copied per route.
- :func:`trim_text_context`: encode class prompts only up to the longest prompt's EOT token. Under the
  causal mask the positions up to the EOT token never read later (padding) positions, the text feature is
  read at the EOT token and the router reads token 0 (or the EOT token), so the output is the same.
- :func:`route_safe_checkpointing`: activation checkpointing per residual block that captures the routing
  of the call; open_clip's own ``set_grad_checkpointing`` recomputes blocks in backward after
  ``MoECLIP.encode_*`` has cleared the route, and the recomputation then fails (see docs/performance.md).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


# --------------------------------------------------------------------------------------------------------
# gathered-weight experts

class GatheredExperts(nn.Module):
    """Same parameters and routing as the wrapped ``MoEAdapter`` (ep_size 1), another execution.

    ``y[b] = sum_k g[b,k] * scale * (relu(x[b] @ Wd[e_bk]^T + bd[e_bk]) @ Wu[e_bk]^T + bu[e_bk])``
    computed as ``h = baddbmm(bd_b, x, Wd_b)`` with ``Wd_b = [d, k*r]`` and ``y = baddbmm(bu_b, h, Wu_b)`` with
    ``Wu_b = [k*r, d]`` scaled by the gates. Rows with task id -1 get gate 0 (exactly zero output)."""

    def __init__(self, site):
        super().__init__()
        self.site = site  # shares every parameter and buffer with moecl's layer

    def forward(self, x: torch.Tensor, route_tokens: torch.Tensor, task_ids: torch.Tensor,
                single_task: Optional[int] = None) -> torch.Tensor:
        from moecl.model.gate import noisy_logits, task_logits
        site = self.site
        gate = site.gate
        b, length, d = x.shape
        active = task_ids >= 0
        ids = task_ids.clamp(min=0)
        if gate.shared_router:
            ids, single_task = torch.zeros_like(ids), 0
        clean = task_logits(route_tokens, list(gate.routers), ids, single_task)
        logits = clean
        if self.training:
            logits = noisy_logits(clean, task_logits(route_tokens, list(gate.noise), ids, single_task), gate.noise_eps)
        top, idx = logits.topk(gate.k, dim=1)  # [B, k]
        g = top.softmax(dim=1)  # = DeepSpeed's renormalised top-k gates
        if single_task is None:
            g = g * active.to(g.dtype).unsqueeze(1)
        if self.training and torch.is_grad_enabled():
            sel = idx[active] if single_task is None else idx
            site.counts += torch.bincount(sel.reshape(-1), minlength=site.num_experts)
        experts = site.local_experts
        first = experts[0]
        k, r, scale = gate.k, first.width, first.scale
        w_down = torch.stack([e.down.weight for e in experts])  # [E, r, d]
        b_down = torch.stack([e.down.bias for e in experts])  # [E, r]
        w_up = torch.stack([e.up.weight for e in experts])  # [E, d, r]
        b_up = torch.stack([e.up.bias for e in experts])  # [E, d]
        wd = w_down[idx].reshape(b, k * r, d).transpose(1, 2)  # [B, d, k*r]
        bd = b_down[idx].reshape(b, 1, k * r)
        gs = (g * scale).to(w_up.dtype)
        wu = (w_up[idx] * gs[..., None, None]).transpose(2, 3).reshape(b, k * r, d)  # [B, k*r, d]
        bu = (b_up[idx] * gs[..., None]).sum(1, keepdim=True)  # [B, 1, d]
        dt = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        h = torch.baddbmm(bd.to(dt), x.to(dt), wd.to(dt))
        h = first.dropout(F.relu(h))
        return torch.baddbmm(bu.to(dt), h, wu.to(dt))


def use_gathered_experts(model) -> int:
    """Swap every MoE site's execution for :class:`GatheredExperts`; returns how many sites were swapped."""
    from moecl.model.backbone import text_towers
    from moecl.model.moe import MoEAdapter
    n = 0
    for transformer in (model.clip.visual.transformer, text_towers(model.clip)[1]):
        for block in transformer.resblocks:
            adapter = getattr(block.mlp, "adapter", None)
            if isinstance(adapter, MoEAdapter):
                if adapter.ep_size != 1:
                    raise ValueError("the gathered-experts prototype is for ep_size 1")
                block.mlp.adapter = GatheredExperts(adapter)
                n += 1
    return n


# --------------------------------------------------------------------------------------------------------
# trimmed text context

def _trimmed_encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` on ``text[:, :n]``, n = 1 + the last EOT position of the batch."""
    from open_clip.transformer import text_global_pool
    if self.text_pool_type != "argmax":
        return type(self).encode_text(self, text, normalize)
    n = int(text.argmax(dim=-1).max()) + 1
    text = text[:, :n]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:n].to(cast_dtype)
    mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
    x = self.transformer(x, attn_mask=mask)
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def trim_text_context(model) -> None:
    clip = model.clip
    if hasattr(clip, "text"):
        raise ValueError("trim_text_context supports open_clip's CLIP (text tower inline)")
    clip.encode_text = types.MethodType(_trimmed_encode_text, clip)


# --------------------------------------------------------------------------------------------------------
# route-safe activation checkpointing

class _RouteCheckpoint(nn.Module):
    def __init__(self, block: nn.Module, slot):
        super().__init__()
        self.block = block
        self._slot = slot

    def __getattr__(self, name):  # open_clip reads resblocks[0].mlp.c_fc.weight.dtype etc.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, x, *args, **kwargs):
        route = self._slot.route
        if not (torch.is_grad_enabled() and x.requires_grad or any(p.requires_grad for p in self.block.parameters())):
            return self.block(x, *args, **kwargs)

        def run(inp):
            with self._slot.use(route):  # the recomputation in backward sees this call's routing
                return self.block(inp, *args, **kwargs)

        return checkpoint(run, x, use_reentrant=False)


def route_safe_checkpointing(model) -> None:
    """Checkpoint every residual block of both towers (open_clip's own flag stays off)."""
    from moecl.model.backbone import text_towers
    for transformer, slot in ((model.clip.visual.transformer, model.image_slot),
                              (text_towers(model.clip)[1], model.text_slot)):
        transformer.grad_checkpointing = False
        transformer.resblocks = nn.ModuleList(_RouteCheckpoint(b, slot) for b in transformer.resblocks)
