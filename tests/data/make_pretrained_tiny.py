"""Make tests/data/pretrained_tiny/: the demo's pretrained moecl-tiny CLIP, compacted to ~1 MB, with provenance.

Tests that need a backbone which has learned something (learning, DDAS on image features) use it instead of a
random tiny CLIP, whose image features barely differ between images. How it is made (the demo's own recipe):

1. the demo's synthetic world (``moecl.demo.WORLD``: 7 domains, seed 0) is built in a temporary folder;
2. ``moecl.pretrain.pretrain_clip`` trains moecl-tiny from scratch, contrastively, on the world's ``pretrain``
   image-caption split with the demo's parameters (``moecl.demo.PRETRAIN``); the tests' worlds draw their
   train/test images from the same generator but never from the ``pretrain`` split;
3. the token embedding (49,408 x 64, 12 MB of the 13 MB) is stored only for the rows pretraining changed plus
   every token of every domain's class names and prompt templates (``token_embedding.rows`` /
   ``token_embedding.values``); :func:`expand` restores the full open_clip state dict with zeros for the
   other rows, which no prompt of the synthetic world uses.

    python tests/data/make_pretrained_tiny.py            # a few minutes on a 2-core CPU
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "pretrained_tiny"
WEIGHTS = "model.safetensors"
PROVENANCE = "provenance.json"
EMBED = "token_embedding.weight"


def expand(compact: dict, vocab: int) -> dict:
    """The full open_clip state dict from the compact file (rows not stored are zeros)."""
    import torch
    state = {k: v for k, v in compact.items() if not k.startswith("token_embedding.")}
    rows, values = compact["token_embedding.rows"], compact["token_embedding.values"]
    full = torch.zeros(vocab, values.shape[1], dtype=values.dtype)
    full[rows] = values
    state[EMBED] = full
    return state


def write_full(path: Path) -> Path:
    """Write the expanded state dict to ``path`` (a file ``model.init_checkpoint`` can name); returns it."""
    from safetensors.torch import load_file, save_file
    info = json.loads((OUT / PROVENANCE).read_text())
    save_file(expand(load_file(str(OUT / WEIGHTS)), info["vocab_size"]), str(path))
    return path


def _prompt_tokens(world: Path, tokenizer) -> set[int]:
    from moecl.data import fill_template, load_sequence
    seq = load_sequence(world, str(world / "sequence.yaml"))
    texts = []
    for task in seq.all_tasks():
        for template in {task.train_template, *task.eval_templates}:
            texts += [fill_template(template, c) for c in task.classnames]
    return set(tokenizer(texts).unique().tolist())


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(HERE.parents[1]))
    import open_clip
    import torch
    from safetensors.torch import load_file, save_file

    from data_tools.synthetic import build_world
    from moecl import backbones
    from moecl.demo import PRETRAIN, WORLD
    from moecl.pretrain import pretrain_clip
    from moecl.seeding import seed_all

    backbones.register_backbones()
    tic = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world", workers=1, **WORLD)
        res = pretrain_clip(world, Path(tmp) / "cache", PRETRAIN, workers=1, progress=False, threads=1)
        state = load_file(str(res.weights))
        seed_all(PRETRAIN.seed)  # the initial weights pretraining started from (same seed, same order)
        init = open_clip.create_model(PRETRAIN.model, pretrained=None).state_dict()[EMBED]
        tokenizer = open_clip.get_tokenizer(PRETRAIN.model)
        changed = (state[EMBED] != init).any(dim=1).nonzero().flatten().tolist()
        rows = sorted(set(changed) | _prompt_tokens(world, tokenizer))
        info = dict(res.info)
    compact = {k: v for k, v in state.items() if k != EMBED}
    compact["token_embedding.rows"] = torch.tensor(rows, dtype=torch.long)
    compact["token_embedding.values"] = state[EMBED][rows].contiguous()
    OUT.mkdir(exist_ok=True)
    save_file(compact, str(OUT / WEIGHTS))
    digest = hashlib.sha256((OUT / WEIGHTS).read_bytes()).hexdigest()
    provenance = {
        "what": "moecl-tiny pretrained from scratch, contrastively, on the demo's synthetic world (pretrain split)",
        "made_by": "python tests/data/make_pretrained_tiny.py",
        "world": WORLD, "pretrain": PRETRAIN.as_dict(),
        "vocab_size": int(state[EMBED].shape[0]), "stored_embedding_rows": len(rows),
        "changed_embedding_rows": len(changed),
        "zero_shot_on_demo_world_test": info.get("zero_shot"), "chance": info.get("chance"),
        "final_loss": info.get("final_loss"), "logit_scale": info.get("logit_scale"),
        "sha256": digest, "seconds": round(time.time() - tic, 1),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    (OUT / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
    print(json.dumps(provenance, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
