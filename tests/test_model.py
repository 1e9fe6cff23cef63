"""MoE-adapted CLIP invariants (METHOD.md / DESIGN.md) on the tiny backbone, CPU, single process."""
import open_clip
import pytest
import torch
import torch.nn.functional as F

from moecl.config import ConfigError, ModelConfig, MoEConfig
from moecl.model import AdapterExpert, MoEAdapter, build_model, noisy_logits, selection_counts, task_logits
from moecl.runstate.adapters import load_adapter_state, save_adapter_state

from helpers import inputs, scramble

TINY = ModelConfig(name="moecl-tiny")


def tiny(**moe):
    torch.manual_seed(0)
    return build_model(TINY, MoEConfig(**{"num_experts": 4, "width": 8, **moe}))


def test_backbone_frozen_and_every_block_adapted():
    m = tiny()
    assert not any(p.requires_grad for p in m.clip.parameters() if not _is_adapter_param(m, p))
    assert len(m.image_sites) == 2 and len(m.text_sites) == 2
    assert all(isinstance(s, MoEAdapter) for s in m.sites())


def _is_adapter_param(model, p):
    return any(p is q for s in model.sites() for q in s.parameters())


@pytest.mark.parametrize("train_mode", [False, True])
def test_adapted_equals_clip_bit_for_bit_before_training(train_mode):
    ref = open_clip.create_model("moecl-tiny")
    m = tiny()
    ref.load_state_dict(_backbone_state(m))
    ref.requires_grad_(False)  # the FROZEN CLIP (torch's attention picks its kernel by requires_grad)
    images, tokens = inputs()
    m.add_task()
    m.add_task()
    m.train(train_mode)
    ref.train(train_mode)
    with torch.no_grad():
        for ids in (0, 1, torch.tensor([0, 1, 1, 0, -1, 1])):
            assert torch.equal(m.encode_image(images, ids), ref.encode_image(images))
        assert torch.equal(m.encode_text(tokens, 1), ref.encode_text(tokens))


def _backbone_state(m):
    """The adapted model's backbone weights under open_clip's own names."""
    out = {}
    for k, v in m.clip.state_dict().items():
        if ".mlp.adapter." in k:
            continue
        k = k.replace(".mlp.ln_2.", ".ln_2.").replace(".mlp.mlp.", ".mlp.").replace(".mlp.ls_2.", ".ls_2.")
        out[k] = v
    return out


def test_task_minus_one_is_plain_clip_inside_a_mixed_batch():
    m = tiny()
    m.add_task()
    m.add_task()
    scramble(m)
    m.eval()
    images, tokens = inputs()
    ids = torch.tensor([0, -1, 1, -1, 0, 1])
    with torch.no_grad():
        plain = m.encode_image(images, -1)
        mixed = m.encode_image(images, ids)
        routed = m.encode_image(images, 1)
        assert (routed - plain).abs().max() > 1e-3  # adapters do change the output
        for i in (1, 3):
            assert torch.equal(mixed[i], plain[i])
        # per-sample results do not depend on what else is in the batch
        for i in range(6):
            alone = m.encode_image(images[i:i + 1], ids[i:i + 1])
            assert torch.allclose(alone[0], mixed[i], atol=1e-5, rtol=0)
        t_plain = m.encode_text(tokens, -1)
        t_mixed = m.encode_text(tokens, torch.tensor([1, -1, 0]))
        assert torch.equal(t_mixed[1], t_plain[1]) and not torch.allclose(t_mixed[0], t_plain[0])


def test_unknown_task_id_is_an_error():
    m = tiny()
    m.add_task()
    images, _ = inputs(2)
    with pytest.raises(ValueError, match="task id 3 but the model has 1 task"):
        m.encode_image(images, 3)


def test_training_task_t_leaves_old_routers_and_frozen_experts_untouched():
    m = tiny(dropout=0.0)
    images, tokens = inputs(8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for task in range(3):
        m.add_task()
        params = m.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        before = {k: v.clone() for k, v in m.state_dict().items() if ".adapter." in k}
        m.train()
        for _ in range(3):
            loss = F.cross_entropy(m(images, tokens, task), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = m.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(f"routers.{task}" in k for k in changed), "the current router must train"
        for k in before:
            for old in range(task):
                if k.endswith(f"routers.{old}") or k.endswith(f"noise.{old}"):
                    assert k not in changed, f"{k} changed while training task {task}"
        for name, site in m.named_moe_sites():
            tower, idx = name.split(".")
            for gid in site.frozen.nonzero().flatten().tolist():
                prefix = f"{_site_prefix(tower, idx)}.deepspeed_moe.experts.deepspeed_experts.{gid}."
                frozen_keys = [k for k in before if k.startswith(prefix)]
                assert frozen_keys and not (set(frozen_keys) & changed), f"frozen expert {name}/{gid} changed"
        frozen = m.freeze_most_selected()
        assert all(len(v) == 2 for v in frozen.values())
        assert all(int(s.counts.sum()) > 0 for s in m.moe_sites())
        m.reset_counts()


def _site_prefix(tower, idx):
    return (f"clip.visual.transformer.resblocks.{idx}.mlp.adapter" if tower == "image"
            else f"clip.transformer.resblocks.{idx}.mlp.adapter")


def test_freeze_is_union_and_frozen_experts_still_route():
    m = tiny()
    m.add_task()
    site = m.moe_sites()[0]
    site.counts.copy_(torch.tensor([5, 9, 1, 9]))
    assert site.freeze_most_selected(2) == [1, 3]  # ties -> lower id
    site.counts.copy_(torch.tensor([7, 9, 3, 0]))
    assert site.freeze_most_selected(2) == [1, 0]
    assert site.frozen.tolist() == [True, True, False, True]
    assert [p.requires_grad for p in site.local_experts[1].parameters()] == [False] * 4
    assert all(p.requires_grad for p in site.local_experts[2].parameters())


# ---- gates --------------------------------------------------------------------------------------------

def test_task_logits_pick_each_samples_router():
    feats = torch.randn(5, 6)
    routers = [torch.randn(6, 4) for _ in range(3)]
    ids = torch.tensor([2, 0, 1, 2, 0])
    expected = torch.stack([feats[i] @ routers[int(t)] for i, t in enumerate(ids)])
    assert torch.allclose(task_logits(feats, routers, ids), expected, atol=1e-6)
    assert torch.allclose(task_logits(feats, routers, torch.ones(5, dtype=torch.long), 1), feats @ routers[1])


def test_noise_scale_follows_softplus():
    clean = torch.zeros(20000, 2)
    noise_logits = torch.tensor([[0.0, 3.0]]).expand(20000, 2)
    out = noisy_logits(clean, noise_logits, 0.01, torch.Generator().manual_seed(0))
    expected = F.softplus(torch.tensor([0.0, 3.0])) + 0.01
    assert torch.allclose(out.std(0), expected, rtol=0.03)


def test_gate_topk_softmax_over_selected_and_noise_only_in_training():
    site = MoEAdapter(8, MoEConfig(num_experts=5, top_k=2, width=4))
    site.gate.add_task()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        site.gate.routers[0].copy_(torch.randn(8, 5, generator=g))
        site.gate.noise[0].copy_(torch.randn(8, 5, generator=g))
    feats = torch.randn(7, 8, generator=g)
    rows = torch.randn(7, 8, generator=g)
    from moecl.model.gate import RouteInput
    site.eval()
    _, _, _, idx, _, gates, counts = site.gate(rows, RouteInput(feats, torch.zeros(7, dtype=torch.long), 0))
    logits = feats @ site.gate.routers[0]
    top = logits.topk(2, dim=1)
    assert torch.equal(idx.t().long().sort(1).values, top.indices.sort(1).values)
    expected = torch.softmax(top.values, dim=1)  # softmax over the k selected logits only
    order = [list(r) for r in idx.t().long().tolist()]
    got = torch.stack([gates[:, i][[order[i].index(j) for j in top.indices[i].tolist()]] for i in range(7)])
    assert torch.allclose(got, expected, atol=1e-6)
    assert counts.sum() == 14
    # eval: deterministic; train: noisy, and the noise projection gets a gradient
    again = site.gate(rows, RouteInput(feats, torch.zeros(7, dtype=torch.long), 0))
    assert torch.equal(again[5], gates)
    site.train()
    torch.manual_seed(1)
    outs = [site.gate(rows, RouteInput(feats, torch.zeros(7, dtype=torch.long), 0))[5] for _ in range(3)]
    assert not torch.equal(outs[0], outs[1])
    outs[2].pow(2).sum().backward()
    assert site.gate.noise[0].grad is not None and site.gate.noise[0].grad.abs().sum() > 0
    assert site.gate.routers[0].grad.abs().sum() > 0


def test_selection_counts_ignore_inactive_and_dropped():
    idx = torch.tensor([[0, 1, -1], [2, 2, 1]])
    assert selection_counts(idx, 3).tolist() == [1, 2, 2]
    assert selection_counts(idx, 3, torch.tensor([True, False, True])).tolist() == [1, 1, 1]


def test_expert_init_outputs_zero_and_has_published_shape():
    ex = AdapterExpert(768, 64)
    assert sum(p.numel() for p in ex.parameters()) == 768 * 64 + 64 + 64 * 768 + 768
    x = torch.randn(3, 5 * 768)
    assert torch.equal(ex(x), torch.zeros_like(x))
    assert ex.down.weight.abs().sum() > 0


def test_per_token_and_eot_routing_options_run():
    for kw in ({"routing": "token"}, {"text_route_token": "eot"}):
        m = tiny(**kw)
        m.add_task()
        scramble(m)
        m.eval()
        images, tokens = inputs()
        with torch.no_grad():
            assert not torch.allclose(m.encode_text(tokens, 0), m.encode_text(tokens, -1))
            assert not torch.allclose(m.encode_image(images, 0), m.encode_image(images, -1))


def test_text_routing_on_token0_is_prompt_independent():
    m = tiny()
    m.add_task()
    scramble(m)
    m.eval()
    _, tokens = inputs()
    with torch.no_grad():
        m.encode_text(tokens, 0)
    # under the causal mask token 0 is the same start token for every prompt: all rows pick the same experts
    for site in m.text_sites:
        assert sorted(site.gate.last_counts.tolist(), reverse=True)[:2] == [3, 3]


def test_adapter_state_round_trip(tmp_path):
    m = tiny()
    m.add_task()
    m.add_task()
    scramble(m)
    m.moe_sites()[0].frozen[2] = True
    m.eval()
    images, _ = inputs()
    with torch.no_grad():
        out = m.encode_image(images, torch.tensor([0, 1, -1, 1, 0, 0]))
    path = save_adapter_state(m, tmp_path / "st")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 200_000  # adapters only, not the backbone
    fresh = tiny()
    meta = load_adapter_state(fresh, path)
    fresh.eval()
    assert meta["num_tasks"] == 2 and fresh.num_tasks == 2
    assert fresh.frozen_experts() == m.frozen_experts()
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images, torch.tensor([0, 1, -1, 1, 0, 0])), out)
    other = build_model(TINY, MoEConfig(num_experts=6, width=8))
    with pytest.raises(Exception, match="moe.num_experts=4 but the model has 6"):
        load_adapter_state(other, path)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file.*model.pretrained=/path/to/weights"):
        build_model(ModelConfig(name="moecl-tiny", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="not available offline"):
        build_model(ModelConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="did you mean"):
        build_model(ModelConfig(name="ViT-B-61"))


def test_local_weight_file_loads(tmp_path):
    from safetensors.torch import save_file
    ref = open_clip.create_model("moecl-tiny")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m = build_model(ModelConfig(name="moecl-tiny", pretrained=str(tmp_path / "w.safetensors")),
                    MoEConfig(num_experts=2, width=4))
    images, _ = inputs(2)
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(m.encode_image(images), ref.encode_image(images))


def test_vit_b16_trainable_count_matches_published_code():
    m = build_model(ModelConfig(name="ViT-B-16-quickgelu"), MoEConfig())
    for _ in range(11):
        m.add_task()
    experts = sum(p.numel() for s in m.moe_sites() for p in s.local_experts.parameters())
    routers = sum(p.numel() for s in m.moe_sites() for p in list(s.gate.routers) + list(s.gate.noise))
    # by hand: 12 image blocks (width 768) and 12 text blocks (width 512), 22 experts of rank 64 each
    # (down d x 64 + 64, up 64 x d + d), and per task and block a router and a noise projection of d x 22
    blocks, experts_per_block, r, tasks = 12, 22, 64, 11
    expert = lambda d: d * r + r + r * d + d  # noqa: E731
    assert experts == blocks * experts_per_block * (expert(768) + expert(512)) == 43_625_472
    assert routers == tasks * blocks * 2 * experts_per_block * (768 + 512) == 7_434_240
    assert experts + routers == 51_059_712  # the published code's count
    assert len(m.image_sites) == 12 and len(m.text_sites) == 12


def test_vit_l14_builds_with_36_sites():
    m = build_model(ModelConfig(name="ViT-L-14"), MoEConfig())
    assert len(m.moe_sites()) == 36


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = build_model(ModelConfig(name="moecl-tiny", grad_checkpointing=ckpt), MoEConfig(num_experts=4, width=8,
                                                                                          dropout=0.0))
        m.add_task()
        scramble(m)
        m.train()
        params = m.trainable_parameters()
        images, tokens = inputs()
        torch.manual_seed(1)
        loss = m(images, tokens, 0).logsumexp(dim=1).sum()
        loss.backward()
        grads.append([p.grad.clone() for p in params])
        assert sum(int(s.counts.sum()) for s in m.image_sites) == 2 * 6 * len(m.image_sites)  # counted once
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[1])
