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


@pytest.mark.parametrize("drop,factor,expected", [("none", 1.0, list(range(8))), ("probs", 1.0, [5, 7]),
                                                  ("position", 1.0, [0, 1]), ("probs", 2.0, [4, 5, 6, 7])])
def test_capacity_and_drop_policy_decide_which_samples_keep_their_expert(drop, factor, expected):
    """8 samples, 4 experts, top-1, all routed to expert 0. moe.drop_tokens=false (the reference) drops nothing;
    drop_tokens=true with capacity_factor 1.0 keeps ceil(8 / 4 x 1.0 x 1) = 2 of them: the 2 of highest gate value
    (drop_policy=probs: samples 5 and 7, given the largest logits) or the first 2 (position: samples 0 and 1);
    capacity_factor 2.0 keeps 4 (probs: 4, 5, 6, 7).
    A dropped sample gets no adapter output and is not counted for activate-freeze."""
    over = {"top_k": 1, "num_experts": 4, "capacity_factor": factor}
    if drop != "none":
        over.update(drop_tokens=True, drop_policy=drop)
    torch.manual_seed(0)
    site = MoEAdapter(32, MoEConfig(**{"width": 8, "dropout": 0.0, "scale": 1.0, **over}))
    site.set_deepspeed_parallelism()
    site.gate.add_task()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ex in site.deepspeed_moe.experts.deepspeed_experts:  # non-zero experts (their init outputs 0)
            for p in ex.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        site.gate.routers[0].zero_()
        site.gate.routers[0][0, 0] = 1.0  # logit of expert 0 = feature 0 of the route token; others 0
    x = torch.randn(8, 3, 32, generator=g)
    route = torch.zeros(8, 32)
    route[:, 0] = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 6.0, 3.5, 5.0])  # expert 0 wins everywhere
    site.train()  # (counts are kept in training)
    with torch.no_grad():
        site.gate.noise[0].fill_(-30.0)  # softplus(-30 x feature) ~ 0: only the eps noise (std 0.01) is left
    site.counts.zero_()
    torch.manual_seed(5)
    out = site(x, route, torch.zeros(8, dtype=torch.long))
    kept = [i for i in range(8) if out[i].abs().max() > 0]
    assert kept == expected
    assert site.counts.tolist() == [len(expected), 0, 0, 0]


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


@pytest.mark.parametrize("train", [False, True])
def test_site_equals_the_published_layer_on_identical_weights(train):
    """moecl's MoE site (the gathered path every training and evaluation step runs) against the published
    layer as METHOD.md describes it (``benchmarks/reference_path.py``: Shazeer's noisy top-k gate with a softmax
    over the k selected logits, a Python loop over the experts, scatter-add): on the same weights and the same
    noise draw, outputs and every gradient agree. The published gate renormalises differently (softmax of the
    selected logits vs the selected probabilities over their sum): equal up to rounding."""
    from benchmarks.reference_path import ReferenceMoE
    site = _site()
    site.train(train)
    ref = ReferenceMoE(32, 6, 2, 8, 0.0, site.local_experts[0].scale, tasks=2).train(train)
    with torch.no_grad():
        for mine, theirs in zip(site.local_experts, ref.experts):
            theirs.load_state_dict(mine.state_dict())
        for t in range(2):
            ref.w_gate[t].copy_(site.gate.routers[t])
            ref.w_noise[t].copy_(site.gate.noise[t])
    x0 = torch.randn(9, 5, 32, generator=torch.Generator().manual_seed(5))
    results = []
    for layer in (site, ref):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(11)  # the same gate noise
        out = layer(x, x[:, 0], torch.full((9,), 1), 1)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad))
    (o1, gx1), (o2, gx2) = results
    assert o1.abs().max() > 1e-2 and gx1.abs().max() > 1e-2
    assert torch.allclose(o1, o2, atol=1e-6, rtol=0) and torch.allclose(gx1, gx2, atol=1e-6, rtol=0)
    mine = {"routers.1": site.gate.routers[1].grad, "noise.1": site.gate.noise[1].grad}
    theirs = {"routers.1": ref.w_gate[1].grad, "noise.1": ref.w_noise[1].grad}
    for i, (a, b) in enumerate(zip(site.local_experts, ref.experts)):
        for n, p in a.named_parameters():
            mine[f"{i}.{n}"], theirs[f"{i}.{n}"] = p.grad, dict(b.named_parameters())[n].grad
    used = [n for n, g in mine.items() if g is not None and g.abs().max() > 0]
    assert len(used) >= 2 * 4 + (2 if train else 1)  # two experts at least, the router (and the noise when noisy)
    for n in mine:
        a, b = mine[n], theirs[n]
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), n
        else:
            assert torch.allclose(a, b, atol=1e-6, rtol=0), n


def test_route_counts_and_balance_loss_are_the_plain_formulas():
    """The gate's small functions the gathered path records its routes with: counts per expert of the active
    rows' routes (a scatter-add with the output size known, so no host sync), and DeepSpeed's top-k balance loss."""
    from moecl.model.gate import balance_loss, route_counts
    idx = torch.tensor([[0, 3], [3, 1], [3, 0], [2, 1]])
    active = torch.tensor([True, False, True, True])
    assert route_counts(idx, 5).tolist() == [2, 2, 1, 3, 0]
    assert route_counts(idx, 5, active).tolist() == [2, 1, 1, 2, 0]
    probs = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    chosen = torch.zeros(4, 5)
    for s, (a, b) in enumerate(idx.tolist()):
        chosen[s, a] = chosen[s, b] = 1.0
    expected = sum(probs[:, e].mean() * chosen[:, e].mean() for e in range(5)) / 5 * 5 * 5 / 2
    assert torch.allclose(balance_loss(probs, idx, 5, 2), expected, atol=1e-7)
