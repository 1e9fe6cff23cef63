"""Training learns (README: "it learns each new task"), on a backbone that has learned something: the demo's
pretrained tiny CLIP (tests/data/pretrained_tiny, see its provenance.json). A random tiny CLIP cannot show this:
its image features barely differ between images, and tens of steps move nothing.

Settings: tiny.yaml with the demo's adapter scale (moe.scale=1.0) and a 5e-3 learning rate.
"""
import json

import pytest
import torch

from helpers import build_world, run_train
from moecl.config import load_config
from moecl.data import eval_batches, load_sequence, make_transforms
from moecl.model import build_model, image_size_of, tokenizer_for
from moecl.train.loop import class_tokens, task_loss

LEARN = ["moe.scale=1.0", "train.lr=5e-3"]


def _accuracy(model, images, tokens, labels) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(images, tokens, 0).argmax(dim=1) == labels).float().mean())
    model.train()
    return acc


def test_adapters_fit_a_fixed_batch_with_the_trainers_loss(world, pretrained_tiny):
    """64 training images of one task, 40 AdamW steps on the trainer's own prompts (class_tokens) and loss
    (task_loss, label smoothing 0.2): the loss falls by at least 0.5 and the batch accuracy reaches 90%."""
    torch.manual_seed(0)
    cfg = load_config("tiny", [f"data.root={world}", f"data.sequence={world / 'sequence.yaml'}",
                               f"model.init_checkpoint={pretrained_tiny}", *LEARN])
    model = build_model(cfg.model, cfg.moe, "moe-adapters")
    model.add_task()
    params = model.trainable_parameters(0)
    task = load_sequence(world, world / "sequence.yaml").tasks[1]
    assert task.name == "digits"
    pcfg = getattr(model.clip.visual, "preprocess_cfg", {}) or {}
    _, eval_tf = make_transforms(image_size_of(model.clip), mean=pcfg.get("mean"), std=pcfg.get("std"))
    images, labels, _ = next(iter(eval_batches(task, "train", batch_size=64, preprocess=eval_tf)))
    tokens = class_tokens(tokenizer_for(cfg.model), task)
    before = _accuracy(model, images, tokens, labels)
    # the prompts are the task's class names in label order: the pretrained CLIP already gets most right
    assert before >= 0.6, before
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()
    losses = []
    for _ in range(40):
        loss = task_loss(model(images, tokens, 0), labels, cfg.train.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    after = _accuracy(model, images, tokens, labels)
    print(f"\nfixed batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy {before:.3f} -> {after:.3f}")
    assert losses[-1] <= losses[0] - 0.5, losses
    assert after >= 0.9 and after > before, (before, after)


@pytest.mark.slow
def test_a_trained_task_beats_its_zero_shot_accuracy(pretrained_tiny, tmp_path):
    """`moecl train` end to end on a world of digits then clocks (100 train / 20 test images per class; clocks is
    the domain the pretrained CLIP knows least, 68% zero-shot on the demo world): after 150 steps on clocks its test
    accuracy (oracle route) is at least 5 points above row 0's (clocks not yet trained: routed to plain CLIP)
    (150 steps per task, demo adapter width and scale, no label smoothing).

    Measured 66.7 -> 76.7 (seed 0). The 5-point margin is set by the seed-to-seed spread, not by one lucky seed:
    over train.seed=0..4 clocks ends at 76.7, 74.2, 75.0, 75.8, 77.5 on this code and at 80.0, 74.2, 74.2, 77.5,
    81.7 on the code that first wrote this test (whose 80.0 at seed 0 suggested an 8-point margin). The change
    between them, bisected to 2ae0964 (class prompts trimmed to their last EOT token), is exact in evaluation
    (logits equal to 4e-6) and with expert dropout 0 (one step's gradients equal to 1e-7); with dropout 0.1 the text
    experts draw their masks over fewer tokens, so the RNG stream and the whole run are a different random draw.
    Fragile: with 1 step on digits first (2 of 4 experts per block frozen near their initial weights) clocks ended
    at 65.8."""
    world = build_world(tmp_path / "w", domains="digits,clocks", held_out=0, train=100, test=20)
    run = tmp_path / "run"
    run_train(run, world, f"model.init_checkpoint={pretrained_tiny}", *LEARN, "moe.width=16",
              "train.label_smoothing=0.0", "train.iterations=150", "train.warmup=10", "data.batch_size=32",
              "ddas.iterations=20")
    matrix = json.loads((run / "report.json").read_text())["methods"]["moecl"]["oracle"]["matrix"]
    (_, clocks0), (_, clocks1) = matrix
    print(f"\nclocks: zero-shot {clocks0:.1f} -> trained {clocks1:.1f}")
    assert clocks1 >= clocks0 + 5, matrix
