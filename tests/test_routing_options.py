"""moe.routing=token and moe.text_route_token=eot change what the routers see (tests that fail if ignored)."""
import torch

from moecl.config import ModelConfig, MoEConfig
from moecl.model import build_model, tokenizer_for

PROMPTS = [f"a photo of a {c}." for c in ("cat", "dog", "car", "ship", "tree", "cup", "hat", "fish")]


def _model(**moe):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="moecl-tiny"), MoEConfig(num_experts=4, top_k=2, width=4, **moe))
    model.add_task()
    return model


def test_token_routing_counts_every_token():
    """Per-token routing selects top_k experts for every token: counts = samples x tokens x k per site
    (per-sample routing would count samples x k)."""
    model = _model(routing="token")
    model.train()
    tokens = tokenizer_for(ModelConfig(name="moecl-tiny"))(PROMPTS[:2])
    model(torch.randn(3, 3, 32, 32), tokens, 0)
    image_tokens = (32 // 8) ** 2 + 1  # 16 patches + the class token
    for name, site in model.named_moe_sites():
        per_sample = image_tokens if name.startswith("image") else tokens.shape[1]
        samples = 3 if name.startswith("image") else 2
        assert int(site.counts.sum()) == samples * per_sample * 2, (name, site.counts.tolist())


def test_eot_route_token_differs_from_the_first_token():
    """Every prompt starts with the same start-of-text token, and causal attention keeps token 0 identical across
    prompts: routed by token 0 all prompts take the same experts; routed by their EOT token they do not."""
    tokens = tokenizer_for(ModelConfig(name="moecl-tiny"))(PROMPTS)
    chosen = {}
    for where in ("first", "eot"):
        model = _model(text_route_token=where)
        with torch.no_grad():
            for site in model.moe_sites():
                site.gate.routers[0].normal_()
        model.eval()
        with torch.no_grad():
            model.encode_text(tokens, 0)
        chosen[where] = [int((site.gate.last_counts > 0).sum()) for site in model.text_sites]
    assert chosen["first"] == [2, 2], chosen  # top-2 of one shared feature: the same 2 experts for every prompt
    assert max(chosen["eot"]) > 2, chosen


def _scrambled(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for site in model.moe_sites():
            for p in site.parameters():
                if p.dtype.is_floating_point:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    return model


def test_towers_option_adapts_only_the_named_tower():
    """moe.towers=image: the text tower is the backbone's (features equal route -1's exactly) and the image
    tower is adapted; towers=text the other way round; both: both adapted."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer_for(ModelConfig(name="moecl-tiny"))(PROMPTS[:3])
    for towers in ("image", "text", "both"):
        model = _scrambled(_model(towers=towers))
        sites = {name.split(".")[0] for name, _ in model.named_moe_sites()}
        assert sites == ({"image", "text"} if towers == "both" else {towers}), towers
        with torch.no_grad():
            adapted = {"image": not torch.equal(model.encode_image(images, 0), model.encode_image(images, -1)),
                       "text": not torch.equal(model.encode_text(tokens, 0), model.encode_text(tokens, -1))}
        assert adapted == {"image": towers != "text", "text": towers != "image"}, towers


def test_shared_router_is_one_router_for_every_task():
    """moe.shared_router=true (the CIL variant): adding tasks adds no router, and every task id routes through
    router 0 (task 1's features equal task 0's); without it task 1 gets its own (zero-initialised) router."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for shared in (True, False):
        model = _model(shared_router=shared)
        model.add_task()
        model = _scrambled(model)
        assert all(len(site.gate.routers) == (1 if shared else 2) for site in model.moe_sites()), shared
        with torch.no_grad():
            same = torch.equal(model.encode_image(images, 0), model.encode_image(images, 1))
        assert same == shared
