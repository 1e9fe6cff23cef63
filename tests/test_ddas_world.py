"""DDAS on the synthetic world's real images (issue 6 "Show"), measured on frozen CLIP features.

World: the first four domains of the default order, chosen before measuring (shapes, textures, digits are
trained tasks; arrows is the untrained domain), 100 train / 25 test images per class. Features: the frozen
image tower of moecl-tiny built exactly as the trainer builds it (tiny config, seed 0), randomly initialised or
the demo's pretrained tiny CLIP (tests/data/pretrained_tiny). DDAS: ``fit_autoencoder`` with the trainer's
default DDASConfig (calibrated thresholds), one autoencoder per trained task on its training images, seeded as
the trainer seeds it. ``pytest -s`` prints the measured figures.

On random features (asserted): every autoencoder accepts its own task's unseen test images, and the lowest
reconstruction error names the right trained task; the issue's rates fail (strict xfail): the "textures"
autoencoder accepts every other domain, so untrained images are taken into "textures". On the pretrained
backbone the rates hold (measured: 96-99% of each task's test images to their task, 100% of the untrained
domain to plain CLIP).
"""
import pytest
import torch

from helpers import build_world
from moecl.config import DDASConfig, load_config
from moecl.data import eval_batches, load_sequence, make_transforms
from moecl.ddas import ZERO_SHOT, DDASSelector, fit_autoencoder
from moecl.evaluation.loading import build_run_model
from moecl.model import image_size_of
from moecl.seeding import stable_seed

DOMAINS = "shapes,textures,digits,arrows"  # the default order's first four; the last is held out
pytestmark = pytest.mark.slow  # a 4-domain world of 100 train / 25 test images per class, features of all
RIGHT_TASK, UNTRAINED_TO_ZERO_SHOT = 0.95, 0.95  # the issue's rates, met on the pretrained backbone


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("ddas-world") / "w", domains=DOMAINS, held_out=1, train=100, test=25)


@pytest.fixture(scope="module")
def measured(root):
    return _measure(root, [])


@pytest.fixture(scope="module")
def measured_pretrained(root, pretrained_tiny):
    return _measure(root, [f"model.init_checkpoint={pretrained_tiny}"])


def _measure(root, overrides):
    cfg = load_config("tiny", [f"data.root={root}", f"data.sequence={root / 'sequence.yaml'}", *overrides])
    model = build_run_model(cfg, torch.device("cpu"))
    pcfg = getattr(model.clip.visual, "preprocess_cfg", {}) or {}
    _, eval_tf = make_transforms(image_size_of(model.clip), mean=pcfg.get("mean"), std=pcfg.get("std"))
    seq = load_sequence(root, root / "sequence.yaml")
    feats = {}
    with torch.no_grad():
        for task in seq.all_tasks():
            for split in ("train", "test"):
                parts = [model.encode_image(x, -1, normalize=True).float()[y >= 0]
                         for x, y, _ in eval_batches(task, split, batch_size=256, preprocess=eval_tf)]
                feats[task.name, split] = torch.cat(parts)
    out = {"seq": seq, "feats": feats}
    for label, dcfg in (("default", DDASConfig()), ("tiny", cfg.ddas)):
        selector, stats = DDASSelector(), []
        for t, task in enumerate(seq.tasks):
            ae, st = fit_autoencoder(feats[task.name, "train"][: dcfg.max_images], dcfg,
                                     seed=stable_seed(cfg.train.seed, "ddas", t))
            selector.add_task(ae, st.threshold)
            stats.append(st)
        out[label] = (selector, stats)
    return out


def _figures(m, label="default"):
    seq, feats = m["seq"], m["feats"]
    selector, stats = m[label]
    right = {t.name: float((selector.select(feats[t.name, "test"]) == j).float().mean())
             for j, t in enumerate(seq.tasks)}
    zero_shot = {t.name: float((selector.select(feats[t.name, "test"]) == ZERO_SHOT).float().mean())
                 for t in seq.held_out}
    own = {t.name: float((selector.errors(feats[t.name, "test"])[:, j] < selector.thresholds[j]).float().mean())
           for j, t in enumerate(seq.tasks)}
    argmin = {t.name: float((selector.errors(feats[t.name, "test"]).argmin(1) == j).float().mean())
              for j, t in enumerate(seq.tasks)}
    accept = {t.name: {u.name: float((selector.errors(feats[u.name, "test"])[:, j] < selector.thresholds[j])
                                     .float().mean()) for u in seq.all_tasks()} for j, t in enumerate(seq.tasks)}
    return {"right_task": right, "untrained_to_zero_shot": zero_shot, "own_acceptance": own,
            "argmin_right": argmin, "acceptance_matrix": accept,
            "thresholds": {t.name: s.threshold for t, s in zip(seq.tasks, stats)},
            "holdout_accept": {t.name: s.holdout_accept_fraction for t, s in zip(seq.tasks, stats)}}


def _show(label, f):
    print(f"\nDDAS on moecl-tiny features, {label} DDAS config ({DOMAINS}; last untrained):")
    print("  test images routed to their own task:", {k: round(v, 3) for k, v in f["right_task"].items()})
    print("  untrained domain sent to zero-shot:  ", {k: round(v, 3) for k, v in f["untrained_to_zero_shot"].items()})
    print("  thresholds:", {k: f"{v:.5f}" for k, v in f["thresholds"].items()})
    for ae, row in f["acceptance_matrix"].items():
        print(f"  autoencoder {ae:<9} accepts (test sets):", {k: round(v, 2) for k, v in row.items()})


def test_ddas_on_random_backbone_features(measured):
    f = _figures(measured)
    _show("default", f)
    _show("tiny.yaml", _figures(measured, "tiny"))
    for name in f["right_task"]:
        assert f["holdout_accept"][name] >= 0.97, name  # calibration on held-out training images
        assert f["own_acceptance"][name] >= 0.9, (name, f["own_acceptance"])  # unseen test images of the task
        assert f["argmin_right"][name] >= 0.9, (name, f["argmin_right"])  # lowest error = right task
    # decisions are per sample: one mixed batch of every domain's test images == each image alone
    selector = measured["default"][0]
    mixed = torch.cat([measured["feats"][t.name, "test"][:40] for t in measured["seq"].all_tasks()])
    alone = torch.cat([selector.select(mixed[i:i + 1]) for i in range(len(mixed))])
    assert torch.equal(selector.select(mixed), alone)


@pytest.mark.xfail(reason="random-init CLIP features: the 'textures' autoencoder accepts every other domain, so the "
                          "untrained domain is not sent to zero-shot (the pretrained backbone below does it)",
                   strict=True)
def test_issue_thresholds_on_random_backbone_features(measured):
    f = _figures(measured)
    assert all(v >= 0.95 for v in f["right_task"].values()), f["right_task"]
    assert all(v >= 0.95 for v in f["untrained_to_zero_shot"].values()), f["untrained_to_zero_shot"]


def test_ddas_on_pretrained_backbone_features(measured_pretrained):
    """Features of the demo's pretrained tiny CLIP (tests/data/pretrained_tiny), default DDAS config: each trained
    task's test images go to their own task and the untrained domain to plain CLIP, per sample."""
    f = _figures(measured_pretrained)
    _show("default, pretrained backbone", f)
    assert all(v >= RIGHT_TASK for v in f["right_task"].values()), f["right_task"]
    assert all(v >= UNTRAINED_TO_ZERO_SHOT for v in f["untrained_to_zero_shot"].values()), f["untrained_to_zero_shot"]
