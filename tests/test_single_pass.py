"""The single-pass layout (issue 16): adapted blocks per tower as config data, DDAS read at the first adapted
image block, one image forward per test image. The default layout stays exactly what it was."""
import json

import pytest
import torch

from moecl.config import ConfigError, DDASConfig, ModelConfig, MoEConfig, load_config
from moecl.ddas import DDASSelector, TaskAutoencoder
from moecl.ddas.block import fit_scorer, single_pass
from moecl.ddas.gaussian import TaskGaussian, fit_gaussian
from moecl.model import build_model
from moecl.model.state import adapter_state

SMALL = ModelConfig(name="moecl-small")  # 4 blocks per tower, width 128


def _model(seed=0, **moe):
    torch.manual_seed(seed)
    m = build_model(SMALL, MoEConfig(num_experts=4, width=8, scale=1.0, **moe)).eval()
    for _ in range(2):
        m.add_task()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # adapters and routers as after training: nonzero, different per expert and task
        for site in m.moe_sites():
            for p in site.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _same_adapters(src, dst):
    with torch.no_grad():
        for (n1, s1), (n2, s2) in zip(src.named_moe_sites(), dst.named_moe_sites()):
            assert n1 == n2
            for p, q in zip(s1.parameters(), s2.parameters()):
                q.copy_(p)


def test_default_layout_is_every_block_as_before():
    """Default (all) = every block of both towers, sites named image.i / text.i by block, outputs bit-identical
    to the same blocks listed explicitly (both towers, mixed routes)."""
    default = _model()
    listed = _model(image_blocks=[0, 1, 2, 3], text_blocks=[3, 2, 1, 0])
    _same_adapters(default, listed)
    assert default.image_block_ids == [0, 1, 2, 3] and default.text_block_ids == [0, 1, 2, 3]
    assert [n for n, _ in default.named_moe_sites()] == [f"image.{i}" for i in range(4)] + [f"text.{i}" for i in range(4)]
    assert all(hasattr(b.mlp, "adapter") for b in default.clip.visual.transformer.resblocks)
    assert sorted(adapter_state(default)[0]) == sorted(adapter_state(listed)[0])
    x, tokens = torch.randn(5, 3, 32, 32), torch.randint(1, 400, (3, 16))
    routes = torch.tensor([0, 1, -1, 1, 0])
    with torch.no_grad():
        assert torch.equal(default.encode_image(x, routes), listed.encode_image(x, routes))
        assert torch.equal(default.encode_text(tokens, 1), listed.encode_text(tokens, 1))
        assert not torch.equal(default.encode_image(x, 0), default.encode_image(x, -1))  # adapters do act


def test_subset_layout_adapts_only_the_listed_blocks():
    m = _model(image_blocks=[2, 3], text_blocks=[1])
    assert [n for n, _ in m.named_moe_sites()] == ["image.2", "image.3", "text.1"]
    blocks = m.clip.visual.transformer.resblocks
    assert [hasattr(b.mlp, "adapter") for b in blocks] == [False, False, True, True]
    assert {".".join(k.split(".")[:2]) for k in adapter_state(m)[0]} == {"image.2", "image.3", "text.1"}
    with pytest.raises(ConfigError, match=r"moe.image_blocks=\[2, 7\].*4 blocks"):
        _model(image_blocks=[2, 7])


def test_config_refuses_a_block_feature_without_a_shared_prefix():
    with pytest.raises(ConfigError, match="first adapted image block must come after block 0"):
        load_config("tiny", ["ddas.feature=block"])
    with pytest.raises(ConfigError, match="first adapted image block must come after block 0"):
        load_config("tiny", ["ddas.feature=block", "moe.image_blocks=[0,1]"])
    with pytest.raises(ConfigError, match="list each block once"):
        load_config("tiny", ["moe.text_blocks=[1,1]"])
    cfg = load_config("tiny", ["ddas.feature=block", "moe.image_blocks=[1]"])
    assert cfg.moe.image_blocks == [1] and cfg.moe.text_blocks == "all"


def test_shipped_layout_config_is_mtil_order1_with_the_layout():
    from moecl.train.loop import config_changes
    base, layout = load_config("mtil_order1"), load_config("mtil_order1_single_pass")
    changed = {c.split(":")[0] for c in config_changes(base.model_dump(mode="json"), layout.model_dump(mode="json"))}
    assert changed == {"moe.image_blocks", "ddas.feature", "ddas.scorer"} - (
        {"ddas.scorer"} if layout.ddas.scorer == base.ddas.scorer else set())
    assert layout.moe.image_blocks == list(range(6, 12)) and layout.ddas.feature == "block"


def _selector(m, x):
    """Gaussians fitted on the block tokens of images 0-2 (task 0) and 3-4 (task 1); image 5 fits neither."""
    tok = m.image_token(x)
    cfg = DDASConfig(scorer="gaussian")
    sel = DDASSelector(feature_block=m.image_block_ids[0])
    g = torch.Generator().manual_seed(0)
    for rows in ([0, 1, 2], [3, 4]):
        feats = tok[rows].repeat(10, 1) + 0.01 * torch.randn(10 * len(rows), tok.shape[1], generator=g)
        scorer, stats = fit_scorer(feats, cfg, seed=0)
        sel.add_task(scorer, stats.threshold)
    return sel


def test_single_pass_equals_each_sample_alone_on_its_selected_route():
    m = _model(image_blocks=[2, 3])
    x = torch.randn(6, 3, 32, 32)
    sel = _selector(m, x)
    calls = [0] * 4
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(m.clip.visual.transformer.resblocks)]
    with torch.no_grad():
        feats, routes, errors = single_pass(m, x, sel)
    for h in hooks:
        h.remove()
    assert calls == [1, 1, 1, 1], "one forward: the shared prefix once, then each sample's own tail"
    assert routes.tolist() == [0, 0, 0, 1, 1, -1]
    assert errors.shape == (6, 2)
    assert torch.equal(routes, sel.select(m.image_token(x)))
    with torch.no_grad():
        # the same batch routed explicitly: bit for bit
        assert torch.equal(feats, m.encode_image(x, routes, normalize=True))
        for i in range(6):  # each sample alone on its route (batch-size rounding only)
            alone = m.encode_image(x[i:i + 1], int(routes[i]), normalize=True)
            torch.testing.assert_close(feats[i:i + 1], alone, atol=1e-6, rtol=0)
        plain = m.encode_image(x, -1, normalize=True)
    assert torch.equal(feats[5], plain[5])  # rejected by every task: exactly plain CLIP
    assert not torch.allclose(feats[:5], plain[:5], atol=1e-4)  # the routed ones took their adapters


def test_single_pass_with_no_task_routed_is_plain_clip():
    m = _model(image_blocks=[1, 2, 3])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats, routes, errors = single_pass(m, x, DDASSelector(feature_block=1))
        assert routes.tolist() == [-1] * 4 and errors.shape == (4, 0)
        assert torch.equal(feats, m.encode_image(x, -1, normalize=True))
    assert single_pass(m, x, DDASSelector()) is None  # today's selector: its own plain pass, as before
    with pytest.raises(ValueError, match="image block 2"):
        single_pass(m, x, DDASSelector(feature_block=2))


def test_image_token_is_the_input_of_the_first_adapted_block():
    m = _model(image_blocks=[2, 3])
    x = torch.randn(3, 3, 32, 32)
    seen = []
    h = m.clip.visual.transformer.resblocks[2].register_forward_pre_hook(lambda mod, a: seen.append(a[0][:, 0].clone()))
    with torch.no_grad():
        m.encode_image(x, 1)
    h.remove()
    assert torch.equal(m.image_token(x), seen[0])


def test_gaussian_scorer_and_selector_state_round_trip():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 16, generator=g) + 3, torch.randn(200, 16, generator=g) - 3
    cfg = DDASConfig(scorer="gaussian", quantile=0.99, margin=1.1)
    ga, sa = fit_gaussian(a, cfg, seed=1)
    assert 0.97 <= sa.holdout_accept_fraction <= 1.0 and sa.threshold == pytest.approx(sa.holdout_quantile_error * 1.1)
    assert float(ga(b).min()) > sa.threshold  # the other distribution is rejected
    gb, sb = fit_scorer(b, cfg, seed=2)
    sel = DDASSelector(feature_block=3)
    sel.add_task(ga, sa.threshold)
    sel.add_task(gb, sb.threshold)
    tensors, meta = sel.to_state()
    assert meta["feature_block"] == 3 and meta["scorers"] == ["gaussian", "gaussian"]
    back = DDASSelector.from_state(tensors, json.loads(json.dumps(meta)))
    assert back.feature_block == 3 and isinstance(back.autoencoders[1], TaskGaussian)
    x = torch.cat([a[:5], b[:5], torch.randn(3, 16, generator=g) * 5])
    assert torch.equal(back.errors(x), sel.errors(x)) and torch.equal(back.select(x), sel.select(x))
    assert sel.select(x).tolist() == [0] * 5 + [1] * 5 + [-1] * 3
    ae, st = fit_scorer(b, DDASConfig(hidden=8, iterations=30), seed=2)
    assert isinstance(ae, TaskAutoencoder)
    with pytest.raises(ValueError, match="same ddas.scorer"):  # errors of different scorers do not compare
        sel.add_task(ae, st.threshold)
    plain_meta = DDASSelector().to_state()[1]  # today's selector: its state carries no new keys
    assert "feature_block" not in plain_meta and "scorers" not in plain_meta
    with pytest.raises(ValueError, match="feature_block"):
        DDASSelector.from_state(tensors, dict(meta, feature_block=0))


# ---- end to end: train -> DDAS at the block -> evaluate -> predict, on the tiny config ---------------------

LAYOUT = ("moe.image_blocks=[1]", "ddas.feature=block", "ddas.scorer=gaussian")


@pytest.fixture(scope="module")
def layout_run(world, tmp_path_factory):
    from helpers import run_train
    run = tmp_path_factory.mktemp("single-pass") / "run"
    run_train(run, world, *LAYOUT)
    return world, run


@pytest.mark.slow
def test_layout_end_to_end(layout_run, tmp_path):
    from safetensors.torch import load_file

    from moecl.data import eval_batches
    from moecl.evaluation.cli import evaluate_loaded
    from moecl.evaluation.loading import load_run
    from moecl.evaluation.predict import Predictor
    world, run = layout_run
    last = run / "checkpoints" / "task-001"
    names = {".".join(k.split(".")[:2]) for k in load_file(str(last / "adapters" / "adapters.safetensors"))}
    assert names == {"image.1", "text.0", "text.1"}  # the layout reached the checkpoint
    ddas = json.loads((last / "ddas.json").read_text())
    assert ddas["feature_block"] == 1 and ddas["scorers"] == ["gaussian", "gaussian"]

    report = json.loads((run / "report.json").read_text())
    loaded = load_run(run, device="cpu")
    assert loaded.selector.feature_block == 1
    calls = []
    blocks = loaded.model.clip.visual.transformer.resblocks
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    agnostic = [m for m in loaded.eval_modes() if m.name == "agnostic"]
    results = evaluate_loaded(loaded, agnostic)["modes"]["agnostic"]
    for h in hooks:
        h.remove()
    assert calls.count(0) == calls.count(1), "the evaluator ran one image forward per batch, not a plain + a routed"
    entry = report["methods"]["moecl"]["agnostic"]
    assert results["row"] == entry["matrix"][-1]  # `moecl eval` reproduces the trainer's row
    routed = sum(n for row in results["routing_confusion"] for n in row[:-1])
    assert routed > 0, "some test images should be routed to a task"

    # the evaluator's single pass = DDAS on the block token, then the routed forward (two passes), per test set
    model, sel = loaded.model, loaded.selector
    for task, acc in zip(loaded.sequence.all_tasks(), results["row"]):
        from moecl.evaluation.evaluator import Evaluator, label_set
        ev = Evaluator(model, loaded.tokenizer, loaded.eval_tf, device=loaded.device, batch_size=64)
        correct = total = 0
        with torch.no_grad():
            for images, targets, _ in eval_batches(task, "test", batch_size=64, preprocess=loaded.eval_tf):
                routes = sel.select(model.image_token(images))
                feats = model.encode_image(images, routes, normalize=True)
                for r in routes.unique().tolist():
                    m = routes == r
                    preds = (feats[m] @ ev.head(label_set(task, loaded.cfg.eval.templates), r)).argmax(1)
                    correct += int((preds == targets[m]).sum())
                total += len(targets)
        assert 100.0 * correct / total == pytest.approx(acc, abs=1e-9)

    # moecl predict: the same routes and labels in a batch and one by one
    import tarfile
    images = tmp_path / "images"
    for domain in ("shapes", "digits", "colors"):
        with tarfile.open(world / domain / "test-000000.tar") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".png")][:6]
            tar.extractall(images / domain, members=members, filter="data")
    paths = sorted(images.rglob("*.png"))
    pred = Predictor(run, device="cpu", loaded=loaded)
    batch = pred.predict(paths)
    alone = [pred.predict([p])[0] for p in paths]
    assert [r["route"] for r in batch] == [r["route"] for r in alone]
    assert [r["top"][0]["label"] for r in batch] == [r["top"][0]["label"] for r in alone]
    assert all(set(r["ddas_error"]) == {"shapes", "digits"} for r in batch)
    assert {r["route"] for r in batch} >= {"zero-shot"} and len({r["route"] for r in batch}) >= 2


@pytest.mark.slow
def test_layout_with_experts_sharded_over_two_ranks(world, tmp_path):
    """ep_size 2 over two gloo processes: the trainer's single-pass evaluation (every rank runs the same MoE
    collectives, whatever its images' routes) gives the rows and routing that one process gets at ep_size 1."""
    from helpers import run_train

    from moecl.evaluation.cli import evaluate_loaded
    from moecl.evaluation.loading import load_run
    run = tmp_path / "run"
    run_train(run, world, *LAYOUT[:2], "moe.ep_size=2", nproc=2)
    entry = json.loads((run / "report.json").read_text())["methods"]["moecl"]["agnostic"]
    loaded = load_run(run, device="cpu")
    assert loaded.selector.feature_block == 1
    again = evaluate_loaded(loaded, [m for m in loaded.eval_modes() if m.name == "agnostic"])["modes"]["agnostic"]
    assert again["row"] == entry["matrix"][-1]
    assert again["routing_confusion"] == entry["routing_confusion"]
