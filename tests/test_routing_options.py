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
