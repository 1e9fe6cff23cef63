"""Every place moecl leans on a private API of DeepSpeed or torch, in one module, each behind a small function.

moecl keeps DeepSpeed's MoE layer as the container (expert-parallel groups, parameter groups, per-expert
checkpoints) but builds its own gate and execution, which reaches past DeepSpeed's public surface in a few
places. They all live here, and ``tests/test_compat.py`` checks each against the installed versions, so an
upgrade that breaks one fails there, by name, instead of deep inside a training run. The supported DeepSpeed
range is checked when this module is imported (``moecl.model`` imports it).

open_clip: the shipped backbones are added with its public ``add_model_config`` and resolved with
``list_models``/``create_model`` (``moecl.backbones``); the one semi-private function used, the text tower's
pooling (``text_global_pool``), is reached through :func:`text_global_pool` below.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Optional

import torch

# 0.19.4 is the first release whose ``topkgating`` takes ``sparse_routes`` and whose gate returns the 7-tuple
# (l_aux, capacity, num_experts, indices, locations, gates, exp_counts) that MOELayer dispatches from; 0.19.3
# and earlier (0.16.5 included) have dense [S, E, C] combine tensors and a 4-tuple gate.
DEEPSPEED_MIN = (0, 19, 4)
DEEPSPEED_BELOW = (0, 20, 0)  # tested through the 0.19 series; setup.py pins the same range


def _version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor, micro) of a version string; pre-releases count as their release (0.20.0rc1 -> 0.20.0)."""
    from packaging.version import Version
    return tuple((Version(text).release + (0, 0, 0))[:3])


def _dotted(v: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


def check_deepspeed_version(version: Optional[str] = None) -> None:
    """Raise ImportError naming the missing feature when DeepSpeed is older than :data:`DEEPSPEED_MIN`; warn
    when it is newer than the tested range (then run ``pytest tests/test_compat.py`` before trusting it)."""
    if version is None:
        import deepspeed
        version = deepspeed.__version__
    v = _version_tuple(version)
    if v < DEEPSPEED_MIN:
        raise ImportError(
            f"moecl needs deepspeed>={_dotted(DEEPSPEED_MIN)},<{_dotted(DEEPSPEED_BELOW)}; deepspeed {version} is "
            "installed, whose MoE gate has no sparse routes (topkgating(sparse_routes=...)) and returns a 4-tuple "
            f"instead of 7. Upgrade: pip install 'deepspeed>={_dotted(DEEPSPEED_MIN)},<{_dotted(DEEPSPEED_BELOW)}'")
    if v >= DEEPSPEED_BELOW:
        warnings.warn(f"deepspeed {version} is newer than the range moecl is tested with "
                      f"(>={_dotted(DEEPSPEED_MIN)},<{_dotted(DEEPSPEED_BELOW)}); moecl reaches into DeepSpeed's MoE "
                      "internals (moecl/compat.py): run pytest tests/test_compat.py before trusting results",
                      RuntimeWarning, stacklevel=2)


check_deepspeed_version()


# ---- DeepSpeed MoE -------------------------------------------------------------------------------------

#: What ``deepspeed.moe.layer.MoE.__init__`` sets besides the gate/experts container, which moecl builds itself.
MOE_INIT_ATTRIBUTES = ("use_residual", "enable_expert_tensor_parallelism", "ep_size", "expert_group_name",
                       "num_experts", "num_local_experts")


def init_moe_container(layer: torch.nn.Module, num_experts: int, ep_size: int) -> None:
    """``MoE.__init__`` without its gate and experts: ``MoE.__init__`` would build DeepSpeed's own
    ``TopKGate`` and stock ``Experts``; the caller builds its own ``MOELayer`` as ``layer.deepspeed_moe``.
    Sets what ``MoE.set_deepspeed_parallelism`` and the engine read (:data:`MOE_INIT_ATTRIBUTES`)."""
    if num_experts % ep_size:
        raise ValueError(f"moe.num_experts={num_experts} must divide over moe.ep_size={ep_size}")
    torch.nn.Module.__init__(layer)
    layer.use_residual = False
    layer.enable_expert_tensor_parallelism = False
    layer.ep_size = ep_size
    layer.expert_group_name = f"ep_size_{ep_size}"
    layer.num_experts = num_experts
    layer.num_local_experts = num_experts // ep_size


def set_gate_ep_group(gate, ep_group) -> None:
    """``TopKGate._set_ep_group`` asserts it is called once; moecl builds one engine per task over the same
    model, so ``MoE.set_deepspeed_parallelism`` sets the same group again. The gate overrides the method with
    this (``MOELayer._set_ep_group`` calls it)."""
    gate.ep_group = ep_group


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (activation checkpointing re-runs forwards there).
    torch has no public call for it: ``torch._C._current_graph_task_id`` is -1 outside a backward."""
    return torch._C._current_graph_task_id() != -1


def disable_cpu_shm_allreduce() -> None:
    """DeepSpeed's CPU backend builds a shared-memory all-reduce op when a world starts: it compiles a C++
    op at start-up and leaves ~64 MB per rank in /dev/shm that nothing frees when a process is killed, and
    serves inference only. moecl uses gloo alone. ``deepspeed.comm.torch`` is an attribute-shadowed module
    (``deepspeed.comm.torch`` resolves to torch), hence the import by name."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


#: The module-level caches of ``deepspeed.utils.groups`` that outlive a destroyed world.
DEEPSPEED_GROUP_DICTS = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                         "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")
DEEPSPEED_GROUP_HANDLES = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                           "_TENSOR_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP")


def forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached process groups of an earlier, destroyed world in this process (they would make
    the next world's collectives fail with "group is not registered"). Call only when no world exists."""
    from deepspeed.utils import groups
    for name in DEEPSPEED_GROUP_DICTS:
        cached = getattr(groups, name, None)
        if isinstance(cached, dict):
            cached.clear()
    for name in DEEPSPEED_GROUP_HANDLES:
        if hasattr(groups, name):
            setattr(groups, name, None)


def optimizer_loads_every_rank(optimizer) -> bool:
    """Whether ``optimizer.load_state_dict`` takes the list of every data-parallel rank's state (DeepSpeed's
    ZeRO and bf16 optimizers, which re-partition on load: their first parameter is ``state_dict_list``) rather
    than this rank's own state (torch optimizers, DeepSpeed's fp16/fp32 wrappers)."""
    params = list(inspect.signature(optimizer.load_state_dict).parameters)
    return bool(params) and params[0] == "state_dict_list"


def text_global_pool(x: torch.Tensor, text: torch.Tensor, pool_type: str,
                     eos_token_id: Optional[int] = None) -> torch.Tensor:
    """open_clip's pooling of the text tower's output (``argmax``: the EOT token of each prompt; ``last``,
    ``first``, ``eos``), which the prompt-length encoder calls after running the blocks itself."""
    try:
        from open_clip.transformer import text_global_pool as pool
    except ImportError as e:  # moved or renamed in a later open_clip
        raise ImportError("open_clip.transformer.text_global_pool is gone in this open_clip version; moecl's "
                          "trimmed text encoder needs it (run tests/test_compat.py after an upgrade)") from e
    return pool(x, text, pool_type, eos_token_id=eos_token_id)
