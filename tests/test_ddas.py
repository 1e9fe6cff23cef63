"""DDAS on synthetic feature clusters: right task for trained clusters, zero-shot for an unseen one."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moecl.config import DDASConfig
from moecl.ddas import ZERO_SHOT, DDASSelector, TaskAutoencoder, fit_autoencoder

D = 64
CFG = DDASConfig(hidden=16, iterations=300, batch_size=256, max_images=2000)


class World:
    """Clusters on a sphere sharing a common direction (CLIP features all point roughly one way).

    Within a cluster the cosine similarity is about 0.83, across clusters about 0.43. Features are
    scaled by an arbitrary factor: DDAS must not care about the norm.
    """

    def __init__(self, clusters: int = 4, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.common = F.normalize(torch.randn(D, generator=self.g), dim=0)
        self.means = [F.normalize(torch.randn(D, generator=self.g), dim=0) for _ in range(clusters)]

    def sample(self, k: int, n: int) -> torch.Tensor:
        noise = 0.6 * torch.randn(n, D, generator=self.g) / D ** 0.5
        return 3.7 * (self.common + self.means[k] + noise)


@pytest.fixture(scope="module")
def world_and_selector():
    world = World()
    selector = DDASSelector()
    stats = []
    for k in range(3):  # clusters 0..2 are trained tasks, cluster 3 is never trained
        ae, st = fit_autoencoder(world.sample(k, 1000), CFG, seed=k)
        assert selector.add_task(ae, st.threshold) == k
        stats.append(st)
    return world, selector, stats


def test_accepts_trained_rejects_unseen(world_and_selector):
    world, selector, stats = world_and_selector
    rates = {}
    for k in range(4):
        route = selector.select(world.sample(k, 1000))  # fresh samples: held out from fitting and calibration
        expected = k if k < 3 else ZERO_SHOT
        rates[k] = (route == expected).float().mean().item()
    print("DDAS synthetic acceptance (task 0..2 -> right task, 3 -> zero-shot):", rates)
    assert all(rate >= 0.95 for rate in rates.values()), rates
    for st in stats:
        assert st.threshold_kind == "calibrated" and st.n_train == 900 and st.n_holdout == 100
        assert st.threshold == pytest.approx(st.holdout_quantile_error * CFG.margin)
        assert st.holdout_accept_fraction >= 0.99
        json.dumps(st.as_dict())


def test_per_sample_decisions_do_not_depend_on_the_batch(world_and_selector):
    world, selector, _ = world_and_selector
    x = torch.cat([world.sample(k, 16) for k in range(4)])
    x = x[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    mixed = selector.select(x)
    single = torch.cat([selector.select(x[i: i + 1]) for i in range(64)])
    assert torch.equal(mixed, single)
    assert set(mixed.tolist()) == {ZERO_SHOT, 0, 1, 2}


def test_batch_mode_makes_one_decision(world_and_selector):
    world, selector, _ = world_and_selector
    assert selector.select(world.sample(1, 64), decision="batch").tolist() == [1] * 64
    assert selector.select(world.sample(3, 64), decision="batch").tolist() == [ZERO_SHOT] * 64
    mixed = selector.select(torch.cat([world.sample(k, 16) for k in range(4)]), decision="batch")
    assert mixed.unique().numel() == 1
    with pytest.raises(ValueError):
        selector.select(world.sample(0, 2), decision="token")


def test_errors_shape_dtype_and_precision(world_and_selector):
    world, selector, _ = world_and_selector
    x = world.sample(0, 8)
    err = selector.errors(x)
    assert err.shape == (8, 3) and err.dtype == torch.float32
    # inputs of any dtype are cast to fp32; the argmin task agrees
    assert torch.equal(selector.select(x.double()), selector.select(x))
    assert selector.select(x[:0]).shape == (0,)


def test_state_round_trip_through_safetensors(tmp_path, world_and_selector):
    world, selector, _ = world_and_selector
    tensors, meta = selector.to_state()
    save_file(tensors, str(tmp_path / "ddas.safetensors"))
    (tmp_path / "ddas.json").write_text(json.dumps(meta))
    loaded = DDASSelector.from_state(load_file(str(tmp_path / "ddas.safetensors")),
                                     json.loads((tmp_path / "ddas.json").read_text()))
    x = torch.cat([world.sample(k, 50) for k in range(4)])
    assert torch.equal(loaded.errors(x), selector.errors(x))
    assert torch.equal(loaded.select(x), selector.select(x))
    assert torch.equal(loaded.select(x, "batch"), selector.select(x, "batch"))
    assert loaded.thresholds.tolist() == selector.thresholds.tolist()
    with pytest.raises(RuntimeError):
        DDASSelector.from_state({k: v for k, v in tensors.items() if k != "thresholds"}, meta)


def test_no_trained_task_means_zero_shot():
    sel = DDASSelector()
    assert sel.select(torch.randn(5, D)).tolist() == [ZERO_SHOT] * 5
    assert sel.select(torch.randn(5, D), decision="batch").tolist() == [ZERO_SHOT] * 5
    assert sel.errors(torch.randn(5, D)).shape == (5, 0)


def test_fit_is_deterministic_and_leaves_global_rng_alone():
    x = World(seed=3).sample(0, 300)
    cfg = DDASConfig(hidden=8, iterations=20, batch_size=64)
    state = torch.random.get_rng_state()
    ae1, st1 = fit_autoencoder(x, cfg, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():  # callers usually hold features from no-grad code
        ae2, st2 = fit_autoencoder(x, cfg, seed=5)
    for p1, p2 in zip(ae1.parameters(), ae2.parameters()):
        assert torch.equal(p1, p2)
    assert st1 == st2
    ae3, _ = fit_autoencoder(x, cfg, seed=6)
    assert not torch.equal(ae3.encoder.weight, ae1.encoder.weight)


def test_fit_in_inference_mode_and_fixed_threshold():
    with torch.inference_mode():
        x = World(seed=4).sample(1, 200)
        cfg = DDASConfig(hidden=8, iterations=10, threshold="fixed", fixed_threshold=0.0655, max_images=50)
        ae, st = fit_autoencoder(x, cfg, seed=0)
    assert st.threshold == 0.0655 and st.threshold_kind == "fixed"
    assert st.n_train + st.n_holdout == 50
    with pytest.raises(ValueError):
        fit_autoencoder(torch.randn(1, D), cfg)


def test_autoencoder_is_scale_invariant_and_fp32():
    ae = TaskAutoencoder(D, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, D)
    torch.testing.assert_close(ae(x), ae(10 * x))
    assert ae(x.to(torch.bfloat16)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ae(x).dtype == torch.float32


def test_mismatched_feature_dim_is_refused():
    sel = DDASSelector()
    sel.add_task(TaskAutoencoder(D, 4), 0.1)
    with pytest.raises(ValueError):
        sel.add_task(TaskAutoencoder(D + 1, 4), 0.1)


def test_reference_setting_really_uses_the_fixed_threshold():
    from moecl.ddas import DDASSelector, TaskAutoencoder
    from moecl.evaluation.loading import fixed_threshold
    sel = DDASSelector()
    sel.add_task(TaskAutoencoder(8, 4, generator=torch.Generator().manual_seed(0)), 0.123)
    sel.add_task(TaskAutoencoder(8, 4, generator=torch.Generator().manual_seed(1)), 0.456)
    fixed = fixed_threshold(sel, 0.5)
    assert fixed.thresholds.tolist() == [0.5, 0.5] and sel.thresholds.tolist() == pytest.approx([0.123, 0.456])
