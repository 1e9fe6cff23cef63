"""MoE-adapted CLIP: adapters beside the MLP of every residual block of both towers, routed explicitly.

Blocks are not copied: each block's ``ln_2 -> mlp -> ls_2`` branch is moved into :class:`AdaptedMLP`, which
returns ``ls_2(mlp(ln_2(x))) + moe(x)``; the block still adds it to its residual, so the block computes
``x + mlp(ln_2(x)) + moe(x)`` with ``x`` taken after the attention residual (METHOD.md). Routing state (one task
id per sample, -1 = plain CLIP) is passed to ``encode_image`` / ``encode_text`` and lives only for that call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import compat
from ..config import MoEConfig, ModelConfig
from ..methods import get_method
from .backbone import text_towers
from .experts import AdapterExpert
from .moe import MoEAdapter

TaskIds = Union[int, torch.Tensor]


@dataclass
class Route:
    """The routing of one encode call: task per sample and which token each router reads."""
    task_ids: torch.Tensor  # [B] long
    single_task: Optional[int]  # set when every sample shares one task id >= 0
    token_index: Optional[torch.Tensor] = None  # [B] token the router reads; None = token 0


class RouteSlot:
    """Holds the current :class:`Route` of one tower for the duration of an encode call (not a module)."""

    def __init__(self, batch_first: bool = True):
        self.route: Optional[Route] = None
        self.batch_first = batch_first

    @contextlib.contextmanager
    def use(self, route: Optional[Route], persist: bool = False) -> Iterator[None]:
        """Route for one encode call. ``persist`` keeps it after the call, for activation checkpointing:
        blocks are recomputed during backward, after the call returned, and must route the same way."""
        previous, self.route = self.route, route
        try:
            yield
        finally:
            if not persist:
                self.route = previous


class DenseAdapter(nn.Module):
    """Baseline: one adapter per block applied to every routed sample (no MoE)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.expert = AdapterExpert(dim, cfg.width, cfg.dropout, cfg.scale)
        self.l_aux = None

    def forward(self, x, route_tokens, task_ids, single_task=None):
        out = self.expert(x)
        if single_task is None:
            out = torch.where((task_ids >= 0).view(-1, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out


class AdaptedMLP(nn.Module):
    """``ls_2(mlp(ln_2(x))) + adapter(x)``; the block's own ``ln_2`` and ``ls_2`` become identities."""

    def __init__(self, ln_2: nn.Module, mlp: nn.Module, ls_2: nn.Module, adapter: nn.Module, slot: RouteSlot):
        super().__init__()
        self.ln_2, self.mlp, self.ls_2, self.adapter = ln_2, mlp, ls_2, adapter
        self._slot = slot  # plain attribute: shared per tower, not a submodule

    @property
    def c_fc(self) -> nn.Module:  # open_clip reads the block's weight dtype from mlp.c_fc
        return self.mlp.c_fc

    @property
    def c_proj(self) -> nn.Module:
        return self.mlp.c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ls_2(self.mlp(self.ln_2(x)))
        route = self._slot.route
        if route is None:
            return out
        xb = x if self._slot.batch_first else x.transpose(0, 1)
        if route.token_index is None:
            tokens = xb[:, 0]
        else:
            tokens = xb[torch.arange(xb.shape[0], device=xb.device), route.token_index]
        moe = self.adapter(xb, tokens, route.task_ids, route.single_task)
        if not self._slot.batch_first:
            moe = moe.transpose(0, 1)
        return out + moe.to(out.dtype)


def _scalars_to_buffers(clip: nn.Module) -> None:
    """``logit_scale`` (and SigLIP's ``logit_bias``) become buffers: the temperature stays fixed in every
    method, and DeepSpeed's engine cannot broadcast 0-dim parameters. State-dict keys are unchanged."""
    for name in ("logit_scale", "logit_bias"):
        p = getattr(clip, name, None)
        if isinstance(p, nn.Parameter):
            delattr(clip, name)
            clip.register_buffer(name, p.detach().clone())


def block_ids(blocks, depth: int, key: str) -> list[int]:
    """The 0-based block indices a ``moe.image_blocks`` / ``moe.text_blocks`` value names in a tower of ``depth``
    blocks, sorted ("all": every block)."""
    if blocks == "all":
        return list(range(depth))
    too_deep = [b for b in blocks if b >= depth]
    if too_deep:
        from ..config import ConfigError
        raise ConfigError(f"moe.{key}={list(blocks)} names block(s) {too_deep}, but this tower has {depth} blocks "
                          f"(0..{depth - 1})")
    return sorted(blocks)


def _adapt_blocks(transformer: nn.Module, make_adapter, slot: RouteSlot, ids: list[int]) -> nn.ModuleList:
    """Adapters beside the MLP of the blocks ``ids`` (in that order); the other blocks stay untouched."""
    adapters = nn.ModuleList()
    for i in ids:
        block = transformer.resblocks[i]
        dim = block.ln_2.normalized_shape[0] if hasattr(block.ln_2, "normalized_shape") else block.mlp.c_fc.in_features
        adapter = make_adapter(dim)
        block.mlp = AdaptedMLP(block.ln_2, block.mlp, block.ls_2, adapter, slot)
        block.ln_2, block.ls_2 = nn.Identity(), nn.Identity()
        adapters.append(adapter)
    return adapters


class MoECLIP(nn.Module):
    """A frozen open_clip CLIP with MoE-adapters (or a dense-adapter baseline) in every block of both towers."""

    def __init__(self, clip: nn.Module, model_cfg: ModelConfig, moe_cfg: MoEConfig, method: str = "moe-adapters"):
        super().__init__()
        self.clip = clip
        self.model_cfg, self.moe_cfg, self.method = model_cfg, moe_cfg, method
        self._spec = get_method(method)  # which adapter, what trains (moecl/methods.py)
        _scalars_to_buffers(clip)
        self._num_tasks = 0
        text_owner, text_tf = text_towers(clip)
        self._text_owner = text_owner
        self.image_slot = RouteSlot(getattr(clip.visual.transformer, "batch_first", True))
        self.text_slot = RouteSlot(getattr(text_tf, "batch_first", True))
        if self._spec.adapter == "moe":
            make = lambda dim: MoEAdapter(dim, moe_cfg)  # noqa: E731
        elif self._spec.adapter == "dense":
            make = lambda dim: DenseAdapter(dim, moe_cfg)  # noqa: E731
        else:
            make = None
        towers = moe_cfg.towers
        image_on, text_on = bool(make) and towers in ("both", "image"), bool(make) and towers in ("both", "text")
        # block index of each site (plain lists, not state): moe.image_blocks / moe.text_blocks, default all
        self.image_block_ids = block_ids(moe_cfg.image_blocks, len(clip.visual.transformer.resblocks),
                                         "image_blocks") if image_on else []
        self.text_block_ids = block_ids(moe_cfg.text_blocks, len(text_tf.resblocks), "text_blocks") if text_on else []
        self.image_sites = _adapt_blocks(clip.visual.transformer, make, self.image_slot, self.image_block_ids)
        self.text_sites = _adapt_blocks(text_tf, make, self.text_slot, self.text_block_ids)
        if clip.visual.transformer.grad_checkpointing or model_cfg.grad_checkpointing:
            clip.set_grad_checkpointing(True)

    # -- tasks ---------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    def sites(self) -> list[nn.Module]:
        return list(self.image_sites) + list(self.text_sites)

    def moe_sites(self) -> list[MoEAdapter]:
        return [s for s in self.sites() if isinstance(s, MoEAdapter)]

    def add_task(self) -> int:
        """Start a new task: add its router (and noise projection) to every MoE site; returns its id."""
        for site in self.moe_sites():
            site.gate.add_task()
            site.counts.zero_()
        self._num_tasks += 1
        return self._num_tasks - 1

    def reset_counts(self) -> None:
        for site in self.moe_sites():
            site.counts.zero_()

    def freeze_most_selected(self, k: Optional[int] = None) -> dict[str, list[int]]:
        """Activate-freeze: freeze the k most-selected experts of every block (counts summed over ranks)."""
        k = self.moe_cfg.freeze_top if k is None else k
        return {name: site.freeze_most_selected(k) for name, site in self.named_moe_sites()}

    def set_eval_gate_noise(self, on: bool) -> None:
        """Keep the gates' noise on in eval mode (the published CIL evaluation does); off by default."""
        for site in self.moe_sites():
            site.gate.eval_noise = bool(on)

    def named_sites(self) -> Iterator[tuple[str, nn.Module]]:
        """``(tower.block, adapter)`` for every adapted block, named by the block's index in its tower."""
        for tower, sites, ids in (("image", self.image_sites, self.image_block_ids),
                                  ("text", self.text_sites, self.text_block_ids)):
            for i, site in zip(ids, sites):
                yield f"{tower}.{i}", site

    def named_moe_sites(self) -> Iterator[tuple[str, MoEAdapter]]:
        for name, site in self.named_sites():
            if isinstance(site, MoEAdapter):
                yield name, site

    def frozen_experts(self) -> dict[str, list[int]]:
        return {name: site.frozen.nonzero().flatten().tolist() for name, site in self.named_moe_sites()}

    def trainable_parameters(self, task: Optional[int] = None) -> list[nn.Parameter]:
        """What trains during ``task`` (default: the newest): its router and noise, and unfrozen experts.

        Sets ``requires_grad`` accordingly on every parameter, so old routers and frozen experts get no
        gradient at all."""
        task = self._num_tasks - 1 if task is None else task
        self.requires_grad_(False)
        params: list[nn.Parameter] = []
        if self._spec.trains == "backbone":
            self.clip.requires_grad_(True)
            return [p for p in self.clip.parameters()]
        for site in self.sites():
            if isinstance(site, MoEAdapter):
                r = site.gate.router_index(task)
                for plist in (site.gate.routers, site.gate.noise):
                    plist[r].requires_grad_(True)
                    params.append(plist[r])
                site.apply_frozen()
                for ex in site.local_experts:
                    params.extend(p for p in ex.parameters() if p.requires_grad)
            else:
                site.requires_grad_(True)
                params.extend(site.parameters())
        return params

    def setup_expert_parallel(self) -> None:
        """Create expert-parallel groups without a DeepSpeed engine (inference, tests)."""
        for site in self.moe_sites():
            site.set_deepspeed_parallelism()

    # -- encoding ------------------------------------------------------------------------------------------
    def _route(self, task_ids: TaskIds, batch: int, device: torch.device,
               token_index: Optional[torch.Tensor] = None) -> Optional[Route]:
        if self._spec.adapter is None or not self.sites():
            return None
        if isinstance(task_ids, int):
            if task_ids < 0:
                return None
            self._check_ids(task_ids)
            ids = torch.full((batch,), task_ids, dtype=torch.long, device=device)
            return Route(ids, task_ids, token_index)
        ids = torch.as_tensor(task_ids, dtype=torch.long, device=device).reshape(-1)
        if ids.numel() != batch:
            raise ValueError(f"task_ids has {ids.numel()} entries for a batch of {batch}")
        if int(ids.max()) < 0 and self.moe_cfg.ep_size == 1:
            # (with experts sharded every rank must run the same MoE collectives, even if all its rows are -1)
            return None
        self._check_ids(int(ids.max()))
        return Route(ids, None, token_index)

    def _check_ids(self, largest: int) -> None:
        limit = self._num_tasks if self._spec.per_task_routes else max(self._num_tasks, 1)
        if largest >= limit:
            raise ValueError(f"task id {largest} but the model has {self._num_tasks} task(s); call add_task() first")

    def encode_image(self, images: torch.Tensor, task_ids: TaskIds = -1, normalize: bool = False) -> torch.Tensor:
        route = self._route(task_ids, images.shape[0], images.device)
        with self.image_slot.use(route, persist=self._checkpointing()):
            features = self.clip.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def image_token(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS token entering the first adapted image block (what a single-pass selector reads); the
        blocks before it run, the rest does not (moecl.model.single_pass)."""
        from .single_pass import image_token
        return image_token(self, images)

    def encode_image_selected(self, images: torch.Tensor, choose, normalize: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward whose routes ``choose`` picks from the CLS token entering the first adapted image block:
        the blocks before it run once for every route. Returns (features, routes) (moecl.model.single_pass)."""
        from .single_pass import encode_image_selected
        return encode_image_selected(self, images, choose, normalize)

    def encode_text(self, tokens: torch.Tensor, task_ids: TaskIds = -1, normalize: bool = False) -> torch.Tensor:
        """Text features of ``tokens`` [C, n]: the full context, or fewer tokens as :meth:`trim_prompts` gives."""
        token_index = tokens.argmax(dim=-1) if self.moe_cfg.text_route_token == "eot" else None
        route = self._route(task_ids, tokens.shape[0], tokens.device, token_index)
        with self.text_slot.use(route, persist=self._checkpointing()):
            if self._text_owner is not self.clip:
                features = self._text_owner(tokens)  # open_clip's TextTransformer slices to the length itself
            elif tokens.shape[1] < self.clip.positional_embedding.shape[0]:
                features = self._encode_text_short(tokens)
            else:
                features = self.clip.encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def trim_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` cut after the batch's last end-of-text token. Exact for a causal text tower (no position
        up to an EOT token reads a later one, the feature is read at the EOT token, the routers at token 0 or
        the EOT token); unchanged for other towers. Reads the EOT positions on the host (one sync): call it
        once per prompt set, not per step."""
        owner = self._text_owner
        text = getattr(owner, "transformer", None)
        pool = getattr(owner, "text_pool_type", getattr(owner, "pool_type", None))
        causal = getattr(owner, "attn_mask", None) is not None and getattr(owner, "cls_emb", None) is None
        if text is None or not causal or pool not in ("argmax", "eos") or tokens.dim() != 2:
            return tokens
        if pool == "argmax":
            ends = tokens.argmax(dim=-1)
        else:
            eos = getattr(owner, "text_eos_id", getattr(owner, "eos_id", None))
            if eos is None:
                return tokens
            ends = (tokens == eos).int().argmax(dim=-1)
        n = int(ends.max()) + 1
        return tokens[:, :n] if n < tokens.shape[1] else tokens

    def _encode_text_short(self, text: torch.Tensor) -> torch.Tensor:
        """open_clip's ``CLIP.encode_text`` for a context shorter than the model's: the positional embedding
        and the causal mask sliced to ``n`` tokens."""
        clip, n = self.clip, text.shape[1]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype)
        x = x + clip.positional_embedding[:n].to(cast_dtype)
        mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=mask)
        x = clip.ln_final(x)
        x = compat.text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return x

    def _checkpointing(self) -> bool:
        return bool(getattr(self.clip.visual.transformer, "grad_checkpointing", False)) and torch.is_grad_enabled()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def aux_loss(self) -> torch.Tensor:
        """Sum of the load-balancing losses of the last forward (logged; weighted by moe.aux_loss_weight)."""
        losses = [s.l_aux for s in self.moe_sites() if s.l_aux is not None]
        return torch.stack([l.float() for l in losses]).sum() if losses else torch.zeros(())

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, task_ids: TaskIds = -1,
                text_task_ids: Optional[TaskIds] = None) -> torch.Tensor:
        """CLIP logits ``logit_scale.exp() * norm(img) @ norm(txt).T``."""
        img = self.encode_image(images, task_ids, normalize=True)
        txt = self.encode_text(tokens, task_ids if text_task_ids is None else text_task_ids, normalize=True)
        return self.logit_scale.exp() * img @ txt.t()
