"""Reproducing the paper: published config values, the reference DDAS, gate noise / transform switches at eval,
``moecl import-reference`` (round trip and bad input) and the published row in reports. Tiny models only."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, build_world, cpu_env, run_train
from moecl.config import ConfigError, DDASConfig, ModelConfig, MoEConfig, load_config

FULL_LR = [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]
FEW_LR = [8e-3, 5e-4, 2e-4, 5e-3, 1e-3, 1e-3, 1e-2, 1e-4, 1e-2, 1e-2, 1e-2]
ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
           "StanfordCars", "SUN397"]
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
            "EuroSAT", "CIFAR100"]
ORDER_II_LR = [1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3, 5e-3, 1e-3, 1e-3, 1e-4, 5e-3]  # the published order-II list


def per_task_lr(cfg, names):
    return [cfg.per_task("lr", t, names) for t in range(len(names))]


CIL_BATCH = {"cifar100_10": 128, "cifar100_20": 128, "cifar100_50": 64, "tinyimagenet_5": 64,
             "tinyimagenet_10": 64, "tinyimagenet_20": 64}


# ---- 1. configs -------------------------------------------------------------------------------------------

def test_fewshot_configs_carry_the_published_values():
    for name in ("mtil_fewshot", "mtil_fewshot_reference"):
        cfg = load_config(name)
        assert per_task_lr(cfg, ORDER_I) == FEW_LR, name
        assert cfg.train.iterations == 500 and cfg.train.label_smoothing == 0.2, name
        assert cfg.ddas.fixed_threshold == 0.0585, name
    ref = load_config("mtil_fewshot_reference")
    assert ref.ddas.kind == "reference" and ref.ddas.iterations == 300 and ref.ddas.reference_iterations == 1000
    assert ref.ddas.lr == 3e-3 and ref.ddas.threshold == "fixed" and ref.ddas.decision == "batch"
    assert ref.data.sequence == "mtil_fewshot"  # the 5-shot shards (5 images per class)


@pytest.mark.parametrize("name", ["mtil_order1_reference", "mtil_order2_reference"])
def test_full_shot_reference_configs(name):
    cfg = load_config(name)
    assert cfg.moe.num_experts == 22 and cfg.moe.top_k == 2 and cfg.moe.width == 64 and cfg.moe.freeze_top == 2
    assert cfg.train.iterations == 1000 and cfg.train.warmup == 100 and cfg.train.label_smoothing == 0.2
    assert cfg.data.batch_size == 64
    d = cfg.ddas
    assert (d.kind, d.hidden, d.iterations, d.reference_iterations, d.lr, d.batch_size) == \
        ("reference", 100, 300, 1000, 0.01, 64)
    assert (d.threshold, d.fixed_threshold, d.decision) == ("fixed", 0.0655, "batch")
    assert cfg.eval.batch_size == 128  # the published decision is per test batch of 128
    assert cfg.train.ds_config == "fp32" and cfg.runtime.precision == "fp32"
    assert not cfg.eval.gate_noise and cfg.eval.transform == "eval"
    if name == "mtil_order1_reference":
        assert per_task_lr(cfg, ORDER_I) == FULL_LR
    else:
        assert per_task_lr(cfg, ORDER_II) == ORDER_II_LR


def test_both_mtil_orders_use_one_learning_rate_per_dataset():
    """Learning rates are keyed by dataset name: order II is order I's mapping, not a hand-permuted list."""
    from moecl.data.sequence import read_sequence_file, resolve_sequence
    for config, seq in (("mtil_order1", "mtil_order1"), ("mtil_order2", "mtil_order2"),
                        ("mtil_order1_reference", "mtil_order1"), ("mtil_order2_reference", "mtil_order2")):
        cfg = load_config(config)
        names = [str(t) for t in read_sequence_file(resolve_sequence("data/mtil", seq))["tasks"]]
        assert cfg.train.lr == dict(zip(ORDER_I, FULL_LR)), config
        assert per_task_lr(cfg, names) == (FULL_LR if seq == "mtil_order1" else ORDER_II_LR), config


@pytest.mark.parametrize("steps", sorted(CIL_BATCH))
def test_cil_configs_carry_the_published_values(steps):
    for name in (f"cil_{steps}", f"cil_{steps}_reference"):
        cfg = load_config(name)
        assert cfg.train.label_smoothing == 0.0 and cfg.train.warmup == 30 and cfg.train.lr == 1e-3, name
        assert cfg.train.epochs == 1 and cfg.data.batch_size == CIL_BATCH[steps], name
        assert cfg.moe.num_experts == 2 and cfg.moe.shared_router and cfg.moe.freeze_top == 0, name
        assert not cfg.ddas.enabled, name
        reference = name.endswith("_reference")
        assert cfg.eval.gate_noise is reference and cfg.eval.transform == ("train" if reference else "eval"), name
        if reference:
            assert cfg.train.ds_config == "fp32" and cfg.runtime.precision == "fp32"


def test_eval_switches_are_off_by_default():
    cfg = load_config(None)
    assert cfg.eval.gate_noise is False and cfg.eval.transform == "eval" and cfg.ddas.kind == "clip"
    with pytest.raises(ConfigError, match="eval.transform"):
        load_config(None, ["eval.transform=random"])


# ---- 2. reference DDAS -------------------------------------------------------------------------------------

def test_alexnet_features_are_conv5_before_relu_sigmoid_flattened(tmp_path):
    from torchvision.models import alexnet

    from moecl.ddas.reference import AlexNetFeatures, load_alexnet_features
    torch.manual_seed(0)
    net = alexnet(weights=None).eval()
    feats = AlexNetFeatures(net.state_dict())
    x = torch.randn(2, 3, 224, 224)
    out = feats(x)
    assert out.shape == (2, 43264)
    conv5 = net.features[:11](x)  # conv1 .. conv5, no ReLU / pooling after it
    assert (conv5 < 0).any()  # pre-ReLU: negative values survive
    torch.testing.assert_close(out, torch.sigmoid(conv5).flatten(1))
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(net.state_dict(), path)
    torch.testing.assert_close(load_alexnet_features(path)(x), out)
    with pytest.raises(ConfigError) as e:
        load_alexnet_features(tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth")
    assert str(tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth") in str(e.value)
    assert "ddas.alexnet_weights" in str(e.value)


def test_reference_autoencoder_recipe():
    from moecl.ddas.reference import ReferenceAutoencoder, fit_reference_autoencoder
    ae = ReferenceAutoencoder(43264, 100, generator=torch.Generator().manual_seed(0))
    assert [type(m).__name__ for m in (*ae.encoder, *ae.decoder)] == ["Linear", "ReLU", "Linear", "Sigmoid"]
    assert sum(p.numel() for p in ae.parameters()) == 8_696_164  # METHOD.md: 8.70M per autoencoder
    g = torch.Generator().manual_seed(1)
    data = torch.sigmoid(torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g) * 2)  # low rank
    batches = iter(lambda: data[torch.randint(0, 64, (16,), generator=g)], None)
    cfg = DDASConfig(hidden=8, lr=0.01)
    before = ReferenceAutoencoder(32, 8, generator=torch.Generator().manual_seed(0)).error(data).mean()
    fitted, info = fit_reference_autoencoder(lambda x: x, batches, 32, cfg, iterations=200, batches_per_epoch=4)
    assert info["iterations"] == 201  # the published loop runs iterations + 1 steps
    assert fitted.error(data).mean() < 0.5 * before


def test_reference_lr_steps_down_every_ten_epochs(monkeypatch):
    from moecl.ddas import reference
    seen = []
    real = torch.optim.Adam

    class Spy(real):
        def step(self, *a, **k):
            seen.append(self.param_groups[0]["lr"])
            assert self.param_groups[0]["weight_decay"] == 1e-4
            return super().step(*a, **k)
    monkeypatch.setattr(reference.torch.optim, "Adam", Spy)
    batches = iter(lambda: torch.rand(4, 6), None)
    reference.fit_reference_autoencoder(lambda x: x, batches, 6, DDASConfig(hidden=2, lr=0.01), 25, 2)
    assert seen[:20] == [0.01] * 20 and seen[20] == pytest.approx(0.001) and len(seen) == 26


def _const_ae(dim: int, value: float):
    """An autoencoder whose reconstruction is ``value`` everywhere (error = mean((value - x)^2))."""
    from moecl.ddas.reference import ReferenceAutoencoder
    ae = ReferenceAutoencoder(dim, 2, generator=torch.Generator())
    with torch.no_grad():
        for p in ae.parameters():
            p.zero_()
        ae.decoder[0].bias.fill_(torch.logit(torch.tensor(value)).item())
    return ae


def test_reference_selector_decisions():
    from moecl.ddas.reference import ReferenceSelector
    sel = ReferenceSelector(torch.nn.Flatten())
    sel.add_slot(-1, _const_ae(4, 0.1), 0.05)  # the reference domain: plain CLIP
    sel.add_task(_const_ae(4, 0.5), 0.05)  # task 0
    sel.add_task(_const_ae(4, 0.9), 0.05)  # task 1
    x = lambda *vals: torch.tensor([[v] * 4 for v in vals])  # noqa: E731
    assert sel.num_tasks == 2 and sel.has_reference_slot
    # per batch: one decision on the batch's mean error, for every sample
    assert sel.select(x(0.5, 0.5, 0.6)).tolist() == [0, 0, 0]
    assert sel.select(x(0.9, 0.85)).tolist() == [1, 1]
    assert sel.select(x(0.1, 0.1)).tolist() == [-1, -1]  # the reference slot wins: plain CLIP
    assert sel.select(x(0.5, 0.9), "sample").tolist() == [0, 1]
    # the threshold: above it, plain CLIP; exactly at it, accepted (published: error <= threshold)
    assert sel.select(x(0.2, 0.2)).tolist() == [-1, -1]  # best error 0.01 is the ref slot anyway
    far = sel.with_threshold(0.0)
    assert far.select(x(0.55)).tolist() == [-1]
    err = float(sel.slot_errors(x(0.55))[0, 1])
    assert sel.with_threshold(err).select(x(0.55)).tolist() == [0]
    # ties between slots go to the earlier slot (reference first, then tasks in order)
    tie = ReferenceSelector(torch.nn.Flatten())
    tie.add_task(_const_ae(4, 0.3), 1.0)
    tie.add_task(_const_ae(4, 0.7), 1.0)
    assert tie.select(x(0.5)).tolist() == [0]


def test_untrained_slots_vote_only_on_request():
    from moecl.ddas.reference import ReferenceSelector
    sel = ReferenceSelector(torch.nn.Flatten())
    sel.add_slot(-1, _const_ae(4, 0.1), 0.05)
    sel.add_slot(0, _const_ae(4, 0.5), 0.05)
    sel.add_slot(1, _const_ae(4, 0.9), 0.05, trained=False)  # a future task's random slot
    x = torch.full((2, 4), 0.9)
    assert sel.num_tasks == 1
    assert sel.select(x).tolist() == [-1, -1]
    sel.future_slots_vote = True
    assert sel.select(x).tolist() == [1, 1]
    tensors, meta = sel.to_state()
    again = ReferenceSelector.from_state(tensors, meta, torch.nn.Flatten())
    assert meta["trained"] == [True, True, False] and again.select(x).tolist() == [-1, -1]
    assert not any(k.startswith("features.") for k in tensors)


# ---- gate noise at eval ------------------------------------------------------------------------------------

def test_gate_noise_at_eval_is_a_switch_off_by_default():
    from moecl.model import build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(), MoEConfig(num_experts=4, width=8)).eval()
    model.add_task()
    for site in model.moe_sites():
        with torch.no_grad():
            site.gate.noise[0].normal_(0, 3.0)  # large noise std
            site.gate.routers[0].normal_(0, 0.01)
            for ex in site.local_experts:
                ex.up.weight.normal_(0, 0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        clean = [model.encode_image(x, 0) for _ in range(2)]
        model.set_eval_gate_noise(True)
        noisy = [model.encode_image(x, 0) for _ in range(2)]
        model.set_eval_gate_noise(False)
        back = model.encode_image(x, 0)
    assert torch.equal(clean[0], clean[1]) and torch.equal(clean[0], back)
    assert not torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], clean[0])


# ---- a full reference-mode run through `moecl train` and `moecl eval` ----------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("repro") / "world")  # shapes, digits; colors held out


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    from torchvision.models import alexnet
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alexnet") / "alexnet-owt-7be5be79.pth"
    torch.save(alexnet(weights=None).state_dict(), path)
    return path


def _moecl(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moecl", *map(str, args)], env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_reference_mode_train_then_eval(world, alexnet_file, tmp_path):
    run = tmp_path / "run"
    run_train(run, world, "ddas.kind=reference", f"ddas.alexnet_weights={alexnet_file}",
              f"ddas.reference_task={world / 'colors'}", "ddas.hidden=8", "ddas.iterations=3",
              "ddas.reference_iterations=3", "ddas.batch_size=8", "ddas.threshold=fixed",
              "ddas.fixed_threshold=1.0", "ddas.decision=batch", "eval.batch_size=16")
    last = sorted((run / "checkpoints").iterdir())[-1]
    meta = json.loads((last / "ddas.json").read_text())
    assert meta["kind"] == "reference" and meta["slots"] == [-1, 0, 1] and meta["trained"] == [True] * 3
    assert meta["dims"] == [256] * 3 and meta["hidden"] == [8] * 3  # AlexNet conv5 at 32 px: 256 x 1 x 1
    report = json.loads((run / "report.json").read_text())
    trained_row = report["methods"]["moecl"]["agnostic"]["matrix"][-1]
    confusion = report["methods"]["moecl"]["agnostic"]["routing_confusion"]
    sizes = [json.loads((world / t / "task.json").read_text())["counts"]["test"] for t in ("shapes", "digits", "colors")]
    for row, size in zip(confusion, sizes):  # per batch: all 16 images of a test batch go the same way
        assert sum(row) == size and sum(n % 16 for n in row) == size % 16
    proc = _moecl("eval", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "eval" / last.name / "results.json").read_text())
    columns = report["tasks"] + report["held_out"]
    assert results["modes"]["agnostic"]["accuracy"] == pytest.approx(dict(zip(columns, trained_row)), abs=1e-9)
    # the same run evaluated the published CIL way: gate noise on, training crop
    proc = _moecl("eval", run, "eval.gate_noise=true", "eval.transform=train")
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- 3. import-reference -----------------------------------------------------------------------------------

TOWER_PREFIX = {"image": "visual.transformer.resblocks.", "text": "transformer.resblocks."}


def _published_layout(model, backbone: dict, num_routers: int) -> dict:
    """A moecl model written the way the authors' code saves it (OpenAI CLIP + per-block MoE tensors)."""
    from moecl.model.state import adapter_state
    tensors, _ = adapter_state(model)
    sd = {k: v.clone() for k, v in backbone.items()}
    for name, site in model.named_moe_sites():
        tower, i = name.split(".")
        p = f"{TOWER_PREFIX[tower]}{i}."
        for t in range(num_routers):
            have = t < model.num_tasks
            sd[f"{p}router_list.{t}"] = tensors[f"{name}.router.{t}"] if have else torch.zeros_like(
                tensors[f"{name}.router.0"])
            sd[f"{p}w_noise_list.{t}"] = tensors[f"{name}.noise.{t}"] if have else torch.zeros_like(
                tensors[f"{name}.noise.0"])
        for e in range(site.num_experts):
            for ours, theirs in (("down", "down_proj"), ("up", "up_proj")):
                for w in ("weight", "bias"):
                    sd[f"{p}adaptmlp_list.{e}.{theirs}.{w}"] = tensors[f"{name}.experts.{e}.{ours}.{w}"]
        sd[f"{p}mean"], sd[f"{p}std"] = torch.tensor([0.0]), torch.tensor([1.0])  # never read by the forward
        sd[f"{p}ln_3.weight"], sd[f"{p}ln_3.bias"] = torch.ones(site.dim), torch.zeros(site.dim)
    return {"state_dict": sd}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A trained-looking tiny model (2 tasks) and its published-layout checkpoint + autochooser files."""
    from moecl.ddas.reference import ReferenceAutoencoder
    from moecl.model import MoECLIP
    from moecl.model.backbone import create_backbone
    torch.manual_seed(0)
    mcfg, moe = ModelConfig(name="moecl-tiny"), MoEConfig(num_experts=4, width=8)
    clip = create_backbone(mcfg)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    backbone = {k: v.clone() for k, v in clip.state_dict().items()}
    model = MoECLIP(clip, mcfg, moe)
    for _ in range(2):
        model.add_task()
    with torch.no_grad():
        for site in model.moe_sites():
            for plist in (site.gate.routers, site.gate.noise):
                for r in plist:
                    r.normal_(0, 0.5)
            for ex in site.local_experts:
                ex.up.weight.normal_(0, 0.5)
                ex.up.bias.normal_(0, 0.1)
    model.eval()
    out = tmp_path_factory.mktemp("published")
    ckpt = out / "shapes.pth"
    torch.save(_published_layout(model, backbone, num_routers=3), ckpt)
    chooser = {}
    for slot in range(4):  # reference slot + 2 tasks + 1 pre-allocated slot (the authors keep 12 for 11 tasks)
        ae = ReferenceAutoencoder(256, 10, generator=torch.Generator().manual_seed(slot))
        chooser.update({f"{slot}.{k}": v for k, v in ae.state_dict().items()})
    ac = out / "shapes_autochooser.pth"
    torch.save({"state_dict": chooser}, ac)
    return model, ckpt, ac


def _import(capsys, *args):
    from moecl.cli import main
    rc = main(["import-reference", *map(str, args)])
    return rc, capsys.readouterr()


def test_import_round_trip_gives_identical_outputs(published, world, alexnet_file, tmp_path, capsys):
    import moecl
    model, ckpt, ac = published
    run = tmp_path / "imported"
    rc, out = _import(capsys, ckpt, "--model", "moecl-tiny", "--sequence", world / "sequence.yaml", "--out", run,
                      "--autochooser", ac, "--data-root", world, f"ddas.alexnet_weights={alexnet_file}")
    assert rc == 0, out.err
    loaded = moecl.load_run(run, device="cpu")
    assert loaded.num_trained_tasks == 2 and loaded.model.num_tasks == 2
    x = torch.randn(3, 3, 32, 32)
    tokens = loaded.tokenizer(["a photo of a cat", "a square", "two"])
    with torch.no_grad():
        for t in (0, 1, -1):
            assert torch.equal(loaded.model.encode_image(x, t), model.encode_image(x, t)), t
            assert torch.equal(loaded.model.encode_text(tokens, t), model.encode_text(tokens, t)), t
    sel = loaded.selector
    assert sel.num_tasks == 2 and sel.slot_tasks.tolist() == [-1, 0, 1]
    assert loaded.cfg.ddas.kind == "reference" and loaded.cfg.ddas.fixed_threshold == 0.0655
    assert loaded.model.frozen_experts() == {n: [] for n, _ in loaded.model.named_moe_sites()}
    # the normal tools work on it as they are
    proc = _moecl("eval", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _moecl("report", run)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_one_checkpoint_per_task_then_report_the_matrix(published, world, alexnet_file, tmp_path, capsys):
    from moecl.evaluation.cli import evaluate_run
    from moecl.evaluation.report import regenerate
    _, ckpt, _ = published
    run = tmp_path / "imported"
    rc, out = _import(capsys, ckpt, ckpt, "--model", "moecl-tiny", "--sequence", world / "sequence.yaml",
                      "--out", run, "--data-root", world)
    assert rc == 0, out.err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task-000", "task-001"]
    assert not regenerate(run)["methods"]  # no row evaluated yet: nothing to show
    rows = [evaluate_run(run, name, device="cpu")[0]["modes"]["oracle"]["row"] for name in ("task-000", "task-001")]
    report = regenerate(run)
    entry = report["methods"]["moe-adapters-imported"]["oracle"]
    assert entry["matrix"] == rows and report["held_out"] == ["colors"]
    assert entry["metrics"]["last"] == pytest.approx((rows[1][0] + rows[1][1]) / 2)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["not_a_state_dict", "arbitrary_pickle", "tampered", "other_model",
                                  "no_routers"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, published, world, tmp_path, capsys):
    model, ckpt, _ = published
    bad = tmp_path / "in" / "bad.pth"
    bad.parent.mkdir()
    model_name = "moecl-tiny"
    if case == "not_a_state_dict":
        torch.save([1, 2, 3], bad)
        expect = "holds a list, not a state dict"
    elif case == "arbitrary_pickle":
        bad.write_bytes(pickle.dumps(Path("/etc/passwd")))
        expect = "cannot be read as a weights-only torch file"
    elif case == "tampered":
        data = bytearray(ckpt.read_bytes())
        bad.write_bytes(bytes(data[: len(data) // 2]))
        expect = "cannot be read as a weights-only torch file"
    elif case == "other_model":
        bad.write_bytes(ckpt.read_bytes())
        model_name = "moecl-small"
        expect = "checkpoint of another"
    else:
        sd = torch.load(ckpt, weights_only=True)["state_dict"]
        torch.save({"state_dict": {k: v for k, v in sd.items() if "router_list" not in k}}, bad)
        expect = "no router for task 0"
    out_dir = tmp_path / "out" / "run"
    before = _files(tmp_path)
    rc, out = _import(capsys, bad, "--model", model_name, "--sequence", world / "sequence.yaml", "--out", out_dir,
                      "--data-root", world)
    assert rc == 2
    assert expect in out.err and "Traceback" not in out.err
    assert not out_dir.exists() and _files(tmp_path) == before


# ---- 4. published rows in reports ---------------------------------------------------------------------------

def test_report_prints_the_published_row_for_published_sequences():
    from moecl.evaluation.report import build_method_entry, new_report, summary_table
    tasks = ["a", "b"]
    entry = build_method_entry([[80.0, 50.0], [79.0, 90.0]], "mtil", names=tasks)
    report = new_report(tasks, config={"data": {"sequence": "mtil_order1"}})
    report["methods"]["moecl"] = {"oracle": entry}
    table = summary_table(report)
    line = [ln for ln in table.splitlines() if ln.startswith("MoE-Adapters (published)")]
    assert line and line[0].split()[2:5] == ["68.9", "76.7", "85.0"]
    cil = new_report(["s0"], config={"data": {"sequence": "/x/cifar100_10.yaml"}})
    cil["methods"]["moecl"] = {"oracle": build_method_entry([90.0, 80.0], "cil")}
    assert "85.2" in summary_table(cil) and "77.5" in summary_table(cil)
    report["config"]["data"]["sequence"] = "synthetic"
    assert "published" not in summary_table(report)


def test_import_reference_is_a_subcommand(capsys):
    from moecl.cli import main
    with pytest.raises(SystemExit) as e:
        main(["import-reference", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: moecl import-reference" in out and "--autochooser" in out
