"""Class prompts encoded up to the longest prompt's EOT token equal the full-context encoding (causal text
tower): features, routing and gradients, for every shipped backbone family (moecl-tiny, moecl-small, and a
ViT-B/16-shaped CLIP with random weights)."""
import open_clip
import pytest
import torch

from moecl.config import ModelConfig, MoEConfig
from moecl.model import build_model

PROMPTS = ["a photo of a cat", "a dog", "an aircraft carrier seen from above, in the rain", "q"]


def _model(name, route_token="first", checkpointing=False, dropout=0.0):
    torch.manual_seed(0)
    m = build_model(ModelConfig(name=name, grad_checkpointing=checkpointing),
                    MoEConfig(num_experts=4, width=8, dropout=dropout, text_route_token=route_token))
    m.add_task()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial experts and routers, so routing and adapters change the features
        for site in m.moe_sites():
            for p in site.parameters():
                if p.dtype.is_floating_point:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _tokens(name):
    return open_clip.get_tokenizer(name)(PROMPTS)


@pytest.mark.parametrize("name", ["moecl-tiny", "moecl-small",
                                  pytest.param("ViT-B-16-quickgelu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("route_token", ["first", "eot"])
def test_trimmed_prompts_give_the_same_features(name, route_token):
    m = _model(name, route_token)
    full = _tokens(name)
    short = m.trim_prompts(full)
    longest = int(full.argmax(dim=-1).max()) + 1
    assert short.shape == (len(PROMPTS), longest) and longest < full.shape[1]
    assert torch.equal(short, full[:, :longest])
    m.eval()
    with torch.no_grad():
        for task in (-1, 0, torch.tensor([0, -1, 0, 0])):
            a = m.encode_text(full, task)
            b = m.encode_text(short, task)
            assert (a - b).abs().max() <= 1e-6 * max(1.0, float(a.abs().max())), (name, task)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trimmed_prompts_give_the_same_gradients(checkpointing):
    """Training mode (gate noise drawn with the same seed; dropout off, its mask has the context's shape)."""
    name = "moecl-small"
    grads = []
    for trim in (False, True):
        m = _model(name, "first", checkpointing)
        params = m.trainable_parameters(0)
        m.train()
        tokens = _tokens(name)
        if trim:
            tokens = m.trim_prompts(tokens)
        torch.manual_seed(7)
        feats = m.encode_text(tokens, 0, normalize=True)
        (feats * torch.linspace(-1, 1, feats.shape[1])).sum().backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        counts = [s.counts.clone() for s in m.text_sites]
        grads.append(counts)
    g_full, c_full, g_trim, c_trim = grads
    assert any(g.abs().sum() > 0 for g in g_full)
    for a, b in zip(g_full, g_trim):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, float(a.abs().max()))
    for a, b in zip(c_full, c_trim):  # the same routes were taken (and counted once each, also when recomputed)
        assert torch.equal(a, b) and int(a.sum()) == 2 * len(PROMPTS)


def test_untrimmable_input_is_returned_as_is():
    m = _model("moecl-tiny")
    full = open_clip.get_tokenizer("moecl-tiny")(["a prompt long enough to fill every position of the context " * 3])
    assert int(full.argmax(dim=-1)) == full.shape[1] - 1  # truncated: EOT at the last position
    assert m.trim_prompts(full) is full
