"""Run under torchrun: ep_size = world gives the same outputs and gradients as ep_size 1; adapter state
saved at ep_size = world loads at ep_size 1 (checked by the parent test) with identical outputs."""
import json
import os
import sys

import torch
import torch.distributed as dist

import moecl
from moecl.config import ModelConfig, MoEConfig
from moecl.model import build_model
from moecl.model.state import adapter_state
from moecl.runstate.adapters import load_adapter_state, save_adapter_state
from moecl.runtime import init_distributed

from ending import end_world


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in model.moe_sites():
            for r in list(site.gate.routers) + list(site.gate.noise):
                r.copy_(torch.randn(r.shape, generator=g))
            # experts by global id, identical for every ep layout
            for gid in range(site.num_experts):
                w = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in site.local_experts[0].state_dict().items()}
                if gid in site.global_expert_ids():
                    site.local_experts[gid - site.global_expert_ids()[0]].load_state_dict(w)


def run(out_dir: str) -> None:
    info = init_distributed("cpu")
    results = {}
    for mode in ("gather", "all-to-all"):
        compare(out_dir, mode, info.world_size, info.rank, results)
    with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
        json.dump(results, f)
    end_world()


def compare(out_dir: str, mode: str, world: int, rank: int, results: dict) -> None:
    """ep_size 1 vs ep_size = world in ``mode``; keys of ``results`` are prefixed with the mode."""
    torch.manual_seed(0)
    mcfg = ModelConfig(name="moecl-tiny")
    ref = build_model(mcfg, MoEConfig(num_experts=4, width=8, dropout=0.0, ep_size=1))
    torch.manual_seed(0)
    par = build_model(mcfg, MoEConfig(num_experts=4, width=8, dropout=0.0, ep_size=world, ep_mode=mode))
    other = "all-to-all" if mode == "gather" else "gather"
    for m in (ref, par):
        m.setup_expert_parallel()
        m.add_task()
        m.add_task()
        randomize(m, 1234)
        m.eval()
    g = torch.Generator().manual_seed(7)
    images = torch.randn(4 * world, 3, 32, 32, generator=g)
    ids = torch.tensor([0, 1, -1, 1] * world)
    tokens = torch.randint(1, 400, (3 * world, 16), generator=g)
    mine = slice(rank * 4, (rank + 1) * 4)
    res = {}
    with torch.no_grad():
        a = ref.encode_image(images[mine], ids[mine])
        b = par.encode_image(images[mine], ids[mine])
        res["image_max_diff"] = (a - b).abs().max().item()
        res["image_moved"] = (a - ref.encode_image(images[mine], -1)).abs().max().item()
        ta = ref.encode_text(tokens[rank * 3:(rank + 1) * 3], 1)
        tb = par.encode_text(tokens[rank * 3:(rank + 1) * 3], 1)
        res["text_max_diff"] = (ta - tb).abs().max().item()
    # gradients (train mode: noise on, so compare with the same RNG stream on both)
    grads = {}
    for name, m in (("ref", ref), ("par", par)):
        m.train()
        params = m.trainable_parameters(1)
        torch.manual_seed(99 + rank)
        gids = ids[mine].clamp(min=0)  # same rows on both paths, so the same noise draws
        loss = m.encode_image(images[mine], gids).pow(2).sum() + m.encode_text(tokens[rank * 3:(rank + 1) * 3], 1).pow(2).sum()
        loss.backward()
        grads[name] = m
    diffs = []
    for (n1, s1), (n2, s2) in zip(ref.named_moe_sites(), par.named_moe_sites()):
        diffs.append((s1.gate.routers[1].grad - s2.gate.routers[1].grad).abs().max().item())
        diffs.append((s1.gate.noise[1].grad - s2.gate.noise[1].grad).abs().max().item())
        # ep_size 1: each rank's expert grads come from its own samples; with experts sharded, an expert's
        # grad comes from every rank's samples routed to it. So compare with the sum over ranks.
        summed = {}
        for gid in range(s1.num_experts):  # same order on every rank: the all_reduces pair up
            for pname in ("down.weight", "up.weight", "down.bias", "up.bias"):
                g = s1.local_experts[gid].get_parameter(pname).grad.clone()
                dist.all_reduce(g)
                summed[gid, pname] = g
        for gid, ex in zip(s2.global_expert_ids(), s2.local_experts):
            for pname in ("down.weight", "up.weight", "down.bias", "up.bias"):
                diffs.append((summed[gid, pname] - ex.get_parameter(pname).grad).abs().max().item())
    res["grad_max_diff"] = max(diffs)
    res["grad_norm"] = float(sum(p.grad.abs().sum() for p in par.trainable_parameters(1) if p.grad is not None))
    # save at ep_size=world; parent loads at ep 1
    par.eval()
    tensors, meta = adapter_state(par)
    save_adapter_state(par, os.path.join(out_dir, f"state-{mode}"))
    dist.barrier()
    with torch.no_grad():
        out = par.encode_image(images, ids.clamp(max=1))  # full batch on every rank
    if rank == 0:
        torch.save({"images": images, "ids": ids.clamp(max=1), "out": out}, os.path.join(out_dir, f"io-{mode}.pt"))
    # reload into a fresh ep=world model: identical outputs
    torch.manual_seed(0)  # same random backbone (real runs load pretrained weights)
    fresh = build_model(mcfg, MoEConfig(num_experts=4, width=8, dropout=0.0, ep_size=world, ep_mode=mode))
    fresh.setup_expert_parallel()
    load_adapter_state(fresh, os.path.join(out_dir, f"state-{mode}"))
    fresh.eval()
    with torch.no_grad():
        res["reload_max_diff"] = (fresh.encode_image(images, ids.clamp(max=1)) - out).abs().max().item()
    res["counts_total_equal"] = all(torch.equal(a.reduced_counts(), b.reduced_counts())
                                    for a, b in zip(par.moe_sites(), fresh.moe_sites()))
    # ... and into the other ep_mode: the same parameters, another execution
    torch.manual_seed(0)
    swapped = build_model(mcfg, MoEConfig(num_experts=4, width=8, dropout=0.0, ep_size=world, ep_mode=other))
    swapped.setup_expert_parallel()
    load_adapter_state(swapped, os.path.join(out_dir, f"state-{mode}"))
    swapped.eval()
    with torch.no_grad():
        res["other_mode_max_diff"] = (swapped.encode_image(images, ids.clamp(max=1)) - out).abs().max().item()
    results.update({f"{mode}:{k}": v for k, v in res.items()})


if __name__ == "__main__":
    run(sys.argv[1])
