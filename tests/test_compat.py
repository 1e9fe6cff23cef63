"""Each private DeepSpeed / torch API moecl relies on (all in moecl/compat.py) still behaves as relied on.

An upgrade that breaks one fails here, by name, rather than deep inside a training run."""
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from moecl import compat
from moecl.config import MoEConfig


@pytest.fixture(scope="module")
def world_of_one():
    import torch.distributed as dist
    from moecl.runtime import init_distributed
    created = not dist.is_initialized()
    init_distributed("cpu")
    yield
    if created:
        dist.destroy_process_group()


def test_installed_deepspeed_is_in_the_supported_range_and_setup_py_pins_the_same():
    import deepspeed
    v = compat._version_tuple(deepspeed.__version__)
    assert compat.DEEPSPEED_MIN <= v < compat.DEEPSPEED_BELOW, deepspeed.__version__
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    pin = re.search(r'"deepspeed>=([0-9.]+),<([0-9.]+)"', setup)
    assert pin, "setup.py must pin deepspeed with a floor and an upper bound"
    assert compat._version_tuple(pin.group(1)) == compat.DEEPSPEED_MIN
    assert compat._version_tuple(pin.group(2)) == compat.DEEPSPEED_BELOW


def test_version_check_names_the_problem():
    with pytest.raises(ImportError, match=r"deepspeed 0\.16\.5 .*no sparse routes.*4-tuple.*pip install"):
        compat.check_deepspeed_version("0.16.5")
    with pytest.raises(ImportError, match="0.19.3"):
        compat.check_deepspeed_version("0.19.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_deepspeed_version("0.19.4")
    with pytest.warns(RuntimeWarning, match="tests/test_compat.py"):
        compat.check_deepspeed_version("0.20.0rc1")


def test_the_gate_gets_sparse_routes_and_returns_seven_values():
    """The floor's reason: moecl's gate calls topkgating(sparse_routes=True) and MOELayer unpacks 7 values."""
    from deepspeed.moe.sharded_moe import MOELayer, topkgating
    assert "sparse_routes" in inspect.signature(topkgating).parameters
    src = inspect.getsource(MOELayer.forward)
    assert re.search(r"l_aux, \w+, \w+, \w+, \w+, \w+, self\.exp_counts = self\.gate\(", src), \
        "MOELayer.forward no longer unpacks TaskRouterGate's 7-tuple"


def test_moe_init_bypass_sets_everything_deepspeed_moe_init_sets(world_of_one):
    from deepspeed.moe.layer import MoE
    stock = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=4, ep_size=1, k=1)
    bare = nn.Module()
    ours = nn.Module()
    compat.init_moe_container(ours, num_experts=4, ep_size=1)
    built = {"deepspeed_moe"}  # the container moecl builds itself (TaskRouterGate, GroupedExperts)
    stock_attrs = set(vars(stock)) - set(vars(bare)) - built
    missing = stock_attrs - set(vars(ours))
    assert not missing, f"deepspeed.moe.layer.MoE.__init__ now sets {sorted(missing)}: add them to compat.init_moe_container"
    assert set(compat.MOE_INIT_ATTRIBUTES) == stock_attrs
    for name in compat.MOE_INIT_ATTRIBUTES:
        assert getattr(ours, name) == getattr(stock, name), name


def test_moe_adapter_sets_its_ep_group_again_for_a_second_engine(world_of_one):
    from moecl.model import MoEAdapter
    site = MoEAdapter(16, MoEConfig(num_experts=4, width=4))
    site.set_deepspeed_parallelism()
    group = site.gate.ep_group
    assert group is not None and site.deepspeed_moe.ep_group is group
    site.set_deepspeed_parallelism()  # DeepSpeed's own TopKGate asserts here
    assert site.gate.ep_group is group
    src = inspect.getsource(type(site.deepspeed_moe)._set_ep_group)
    assert "self.gate._set_ep_group(" in src, "MOELayer no longer hands its group to the gate"


def test_in_backward_is_true_only_inside_a_backward():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", compat.in_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", compat.in_backward()))
            return g * 2

    x = torch.ones(3, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]
    assert compat.in_backward() is False


def test_checkpoint_recomputation_counts_as_backward():
    """The MoE sites count selections only outside a backward, so checkpointed blocks count each sample once."""
    from torch.utils.checkpoint import checkpoint
    flags = []

    def block(x):
        flags.append(compat.in_backward())
        return x.sin()

    x = torch.ones(3, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert flags == [False, True]


def test_shm_switch_reaches_the_op_deepspeed_builds_at_start():
    import importlib
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    assert hasattr(ds_torch, "build_shm_op"), "deepspeed.comm.torch.build_shm_op is gone: compat's switch does nothing"
    assert "build_shm_op()" in inspect.getsource(ds_torch.TorchBackend.__init__), \
        "TorchBackend no longer builds the shm op at start: compat.disable_cpu_shm_allreduce may go"
    original = ds_torch.build_shm_op
    try:
        compat.disable_cpu_shm_allreduce()
        assert ds_torch.build_shm_op() is None
    finally:
        ds_torch.build_shm_op = original


def test_deepspeed_group_caches_exist_where_forget_clears_them():
    from deepspeed.utils import groups
    for name in compat.DEEPSPEED_GROUP_DICTS:
        assert isinstance(getattr(groups, name, None), dict), f"deepspeed.utils.groups.{name} is no longer a dict"
    for name in compat.DEEPSPEED_GROUP_HANDLES:
        assert hasattr(groups, name), f"deepspeed.utils.groups.{name} is gone"
    assert groups._get_expert_parallel_group_dict() is groups._EXPERT_PARALLEL_GROUP  # what MoE reads


def test_which_optimizers_load_every_ranks_state():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        assert compat.optimizer_loads_every_rank(cls.__new__(cls)), cls.__name__
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    assert not compat.optimizer_loads_every_rank(opt)
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    assert not compat.optimizer_loads_every_rank(FP16_Optimizer.__new__(FP16_Optimizer))


def test_shipped_backbones_resolve_through_open_clips_public_registry():
    import open_clip
    import moecl.model  # noqa: F401  (registers moecl-tiny / moecl-small)
    from moecl.backbones import tiny_model_names
    assert set(tiny_model_names()) <= set(open_clip.list_models())
    assert callable(open_clip.add_model_config)


def test_text_pooling_takes_each_prompts_end_of_text_token():
    """The trimmed text encoder pools through open_clip's ``text_global_pool`` (``compat.text_global_pool``)."""
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    text = torch.tensor([[1, 7, 9, 0, 0], [1, 4, 5, 6, 9]])  # EOT (the largest id) at 2 and 4
    pooled = compat.text_global_pool(x, text, "argmax")
    assert torch.equal(pooled, torch.stack([x[0, 2], x[1, 4]]))
