"""Run under torchrun with N ranks: load an adapter state saved at another ep_size (ep_size = N here) and
write the outputs on the saved inputs."""
import json
import os
import sys

import torch

import moecl  # noqa: F401
from moecl.config import ModelConfig, MoEConfig
from moecl.model import build_model
from moecl.runstate.adapters import load_adapter_state
from moecl.runtime import init_distributed

from ending import end_world

if __name__ == "__main__":
    out_dir = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "gather"  # moe.ep_mode of the saved run and of this one
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="moecl-tiny"), MoEConfig(num_experts=4, width=8, dropout=0.0,
                                                                  ep_size=info.world_size, ep_mode=mode))
    model.setup_expert_parallel()
    load_adapter_state(model, os.path.join(out_dir, f"state-{mode}"))
    model.eval()
    io = torch.load(os.path.join(out_dir, f"io-{mode}.pt"), weights_only=True)
    with torch.no_grad():
        out = model.encode_image(io["images"], io["ids"])
    with open(os.path.join(out_dir, f"load_ep{info.world_size}_{mode}_rank{info.rank}.json"), "w") as f:
        json.dump({"max_diff": (out - io["out"]).abs().max().item()}, f)
    end_world()
