"""The gathered-weights path of MoEAdapter (ep_size 1, the training and inference default) computes what
DeepSpeed's dispatch path computes: outputs, every gradient, the routes counted, the load-balancing loss."""
import pytest
import torch

from moecl.config import MoEConfig
from moecl.model import MoEAdapter


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """DeepSpeed's dispatch all-reduces the capacity over the expert group: a process group of one."""
    import torch.distributed as dist
    from moecl.runtime import init_distributed
    created = not dist.is_initialized()
    init_distributed("cpu")
    yield
    if created:
        dist.destroy_process_group()


def _site(**over):
    torch.manual_seed(0)
    site = MoEAdapter(32, MoEConfig(**{"num_experts": 6, "width": 8, "dropout": 0.0, **over}))
    site.set_deepspeed_parallelism()
    site.gate.add_task()
    site.gate.add_task()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in site.parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return site


def _run(site, gathered: bool, x, tokens, ids, single):
    site.counts.zero_()
    torch.manual_seed(11)  # the gate noise: the same draw in both paths
    if gathered:
        out = site._run_gathered(x, tokens, ids, single)
    else:  # DeepSpeed's MOELayer (what ep_size > 1, token routing and drop_tokens run)
        out = site._run(x, tokens, ids, single, torch.ones_like(ids, dtype=torch.bool))
    return out


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("single", [None, 1])
@pytest.mark.parametrize("aux_weight", [0.0, 0.5])
def test_gathered_path_equals_deepspeed_dispatch(train, single, aux_weight):
    site = _site(aux_loss_weight=aux_weight)
    site.train(train)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(9, 5, 32, generator=g)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1]) if single is None else torch.full((9,), single)
    results = []
    for gathered in (True, False):
        site.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = _run(site, gathered, x, x[:, 0], ids, single)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        if aux_weight:
            loss = loss + aux_weight * site.l_aux
        loss.backward()
        grads = {n: p.grad.clone() for n, p in site.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad.clone(), grads, site.counts.clone(), float(site.l_aux.detach())))
    (o1, gx1, g1, c1, a1), (o2, gx2, g2, c2, a2) = results
    assert o1.abs().max() > 1e-2
    assert torch.allclose(o1, o2, atol=1e-6, rtol=0)
    assert torch.allclose(gx1, gx2, atol=1e-6, rtol=0)
    assert set(g1) == set(g2) and len(g1) >= 4 * 6  # every expert tensor (and the routers) got a gradient
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=0), name
    if train:
        assert torch.equal(c1, c2) and int(c1.sum()) == 2 * 9
    assert abs(a1 - a2) < 1e-6


@pytest.mark.parametrize("gathered", [True, False])
def test_both_paths_route_with_the_gate_logits_method(gathered, monkeypatch):
    """One definition of the routing logits: a change to ``TaskRouterGate.logits`` reaches both paths."""
    from moecl.model.gate import TaskRouterGate
    site = _site()
    site.train(True)
    original = TaskRouterGate.logits
    calls = []

    def reversed_preference(self, features, task_ids, single_task=None):
        calls.append(features.shape[0])
        return -original(self, features, task_ids, single_task)

    x = torch.randn(9, 5, 32, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    before = _run(site, gathered, x, x[:, 0], ids, None)
    counts = site.counts.clone()
    monkeypatch.setattr(TaskRouterGate, "logits", reversed_preference)
    after = _run(site, gathered, x, x[:, 0], ids, None)
    assert calls == [9]
    assert not torch.equal(site.counts, counts) and not torch.allclose(before, after)
