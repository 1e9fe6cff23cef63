"""``moecl import-reference``: the authors' released MoE-Adapters checkpoints as a normal moecl run folder.

A published ``.pth`` is ``{"state_dict": ...}`` holding the whole OpenAI-layout CLIP plus, in every residual
block of both towers, ``router_list.T`` / ``w_noise_list.T`` ([d, E] per task, pre-allocated) and
``adaptmlp_list.E.{down,up}_proj`` (the experts); the CIL variant has one ``router1`` / ``w_noise`` instead.
The autochooser file holds the AlexNet autoencoders: slot 0 = the reference domain (plain CLIP), slot 1 + t =
task t. Files are read with ``torch.load(weights_only=True)`` only. The backbone is converted with open_clip's
own OpenAI-layout loader and stored in fp32 as the run's ``model.init_checkpoint``; experts are stored by global
expert id like any moecl checkpoint. The frozen-expert set is not in the files (the authors kept it in a side
text file) and cannot be derived from weights, so the imported run has none: it only matters for training on.

Everything is checked in memory first; the run folder appears only once complete (nothing is written on error).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Config, ConfigError, load_config, parse_overrides, shipped_configs
from .errors import CheckpointError
from .runstate.files import sha256

# sequence -> the shipped config that reproduces it (base of the imported run's config)
REFERENCE_CONFIGS = {"mtil_order1": "mtil_order1_reference", "mtil_order2": "mtil_order2_reference",
                     "mtil_fewshot": "mtil_fewshot_reference", "cifar100_10": "cil_cifar100_10_reference",
                     "cifar100_20": "cil_cifar100_20_reference", "cifar100_50": "cil_cifar100_50_reference",
                     "tinyimagenet_100_5": "cil_tinyimagenet_5_reference",
                     "tinyimagenet_100_10": "cil_tinyimagenet_10_reference",
                     "tinyimagenet_100_20": "cil_tinyimagenet_20_reference"}
TOWERS = (("visual.transformer.resblocks.", "image"), ("transformer.resblocks.", "text"))
_BLOCK = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)$")
_EXPERT = re.compile(r"^adaptmlp_list\.(\d+)\.(down_proj|up_proj)\.(weight|bias)$")
_ROUTER = re.compile(r"^(router_list|w_noise_list)\.(\d+)$")
_DROPPED = ("mean", "std", "ln_3.weight", "ln_3.bias")  # published block extras that its forward never reads



def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict of a published ``.pth`` (``{"state_dict": {...}}`` or a bare state dict), weights-only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unreadable file gets the same, actionable message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {path} cannot be read as a weights-only torch file ({first}); moecl reads "
                              "tensors only and never unpickles other objects: is it a published MoE-Adapters "
                              ".pth, complete and unmodified?") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{what} {path} holds a {type(sd).__name__}, not a state dict "
                              "(expected {'state_dict': {name: tensor}})")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what} {path}: entry {bad[0]!r} is not a named tensor; expected a state dict of "
                              "tensors")
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def split_published(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(backbone state dict in OpenAI layout, per site ``image.i`` / ``text.i``: routers, noise, experts)."""
    backbone: dict[str, torch.Tensor] = {}
    sites: dict[str, dict[str, Any]] = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if not m:
            backbone[key] = value
            continue
        prefix, block, rest = m.groups()
        tower = "image" if prefix.startswith("visual") else "text"
        site = sites.setdefault(f"{tower}.{int(block)}", {"router": {}, "noise": {}, "experts": {}})
        if rest in _DROPPED:
            continue
        if (r := _ROUTER.match(rest)) is not None:
            site["router" if r.group(1) == "router_list" else "noise"][int(r.group(2))] = (key, value)
        elif rest in ("router1", "w_noise"):  # the CIL variant: one router shared by all tasks
            site["router" if rest == "router1" else "noise"][0] = (key, value)
            site["shared"] = True
        elif (e := _EXPERT.match(rest)) is not None:
            name = {"down_proj": "down", "up_proj": "up"}[e.group(2)]
            site["experts"][(int(e.group(1)), f"{name}.{e.group(3)}")] = (key, value)
        elif rest.startswith("adaptmlp.") or rest.startswith("adaptmlp_list."):
            raise CheckpointError(f"key {key!r}: a single-adapter (non-MoE) or unknown adapter layout; "
                                  "moecl imports the MoE-Adapters checkpoints (router_list / adaptmlp_list)")
        else:
            backbone[key] = value
    return backbone, {k: v for k, v in sites.items() if v["router"] or v["experts"]}


def convert_backbone(backbone: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """OpenAI-layout CLIP -> the open_clip ``model_name`` state dict (fp32), checked key by key and shape by shape."""
    from open_clip.model import build_model_from_openai_state_dict

    from .config import ModelConfig
    from .model.backbone import create_backbone
    try:  # open_clip's own reader of OpenAI state dicts: infers the architecture and maps the layout
        converted = build_model_from_openai_state_dict(dict(backbone), quick_gelu=True, cast_dtype=torch.float32)
    except KeyError as e:
        raise CheckpointError(f"not an OpenAI-layout CLIP: key {e.args[0]!r} is missing") from None
    except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as e:
        raise CheckpointError(f"not an OpenAI-layout CLIP open_clip can read: {str(e).splitlines()[0]}") from None
    target = create_backbone(ModelConfig(name=model_name)).state_dict()
    layout = converted.state_dict()
    for key, ref in target.items():
        if key not in layout:
            raise CheckpointError(f"the checkpoint has no {key!r}, which {model_name} needs: a checkpoint of "
                                  "another architecture (check --model)")
        if tuple(layout[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{key!r} has shape {tuple(layout[key].shape)} in the checkpoint but "
                                  f"{model_name} expects {tuple(ref.shape)}: a checkpoint of another model "
                                  "(check --model)")
    extra = sorted(set(layout) - set(target))
    if extra:
        raise CheckpointError(f"the checkpoint has {extra[0]!r} (and {len(extra) - 1} more keys) that {model_name} "
                              "does not: a checkpoint of another architecture (check --model)")
    # the values themselves from the file, in fp32 (open_clip's loader rounds weights to fp16 on the way)
    return {k: (backbone[k] if k in backbone else layout[k]).detach().to(torch.float32).contiguous()
            for k in target}


def adapter_tensors(sites: dict[str, dict[str, Any]], model, num_tasks: int) -> dict[str, torch.Tensor]:
    """moecl's adapter-state tensors (global expert ids) from the published per-block tensors, shape-checked."""
    from .model.state import adapter_state
    expected, _ = adapter_state(model)
    out: dict[str, torch.Tensor] = {}
    ours = dict(model.named_moe_sites())
    missing_sites = sorted(set(ours) - set(sites), key=lambda s: (s.split(".")[0], int(s.split(".")[1])))
    if missing_sites:
        tower, i = missing_sites[0].split(".")
        prefix = dict((t, p) for p, t in TOWERS)[tower]
        raise CheckpointError(f"no router or experts for block {prefix}{i}: expected {prefix}{i}.router_list.0 and "
                              f"{prefix}{i}.adaptmlp_list.E.* (a checkpoint without MoE-adapters, or of another model)")
    unknown = sorted(set(sites) - set(ours))
    if unknown:
        raise CheckpointError(f"adapters for block {unknown[0]} that {model.model_cfg.name} does not have: a "
                              "checkpoint of another model (check --model)")
    for name, site in ours.items():
        pub = sites[name]
        want_routers = 1 if model.moe_cfg.shared_router else num_tasks
        for kind in ("router", "noise"):
            have = pub[kind]
            for t in range(want_routers):
                if t not in have:
                    raise CheckpointError(f"block {name}: no {kind} for task {t} (found {sorted(have)}); the "
                                          f"sequence has {num_tasks} tasks")
                key, value = have[t]
                out[f"{name}.{kind}.{t}"] = value
        for (gid, part), (key, value) in pub["experts"].items():
            if gid >= site.num_experts:
                raise CheckpointError(f"{key!r}: expert {gid} but the model has {site.num_experts} experts")
            out[f"{name}.experts.{gid}.{part}"] = value
        out[f"{name}.counts"] = torch.zeros(site.num_experts, dtype=torch.long)
        out[f"{name}.frozen"] = torch.zeros(site.num_experts, dtype=torch.uint8)
    for key, ref in expected.items():
        if key not in out:
            raise CheckpointError(f"the checkpoint lacks the tensor moecl stores as {key!r}: an expert or router is "
                                  "missing")
        if tuple(out[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{key!r} has shape {tuple(out[key].shape)} in the checkpoint, expected "
                                  f"{tuple(ref.shape)}")
        out[key] = out[key].detach().to(ref.dtype).contiguous()
    return {k: out[k] for k in expected}


def moe_shape(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """num_experts, width and shared_router read off the published tensors."""
    first = next(iter(sites.values()), None)
    if first is None or not first["experts"]:
        raise CheckpointError("the checkpoint has no adaptmlp_list experts: not a MoE-Adapters checkpoint")
    ids = {gid for gid, _ in first["experts"]}
    (_, down) = first["experts"][(min(ids), "down.weight")] if (min(ids), "down.weight") in first["experts"] else \
        (None, None)
    if down is None:
        raise CheckpointError("the checkpoint's experts have no down_proj.weight")
    return {"num_experts": max(ids) + 1, "width": int(down.shape[0]), "shared_router": bool(first.get("shared"))}


def autochooser_selector(path: Path, cfg: Config, image_size: int, trained_tasks: int, num_tasks: int):
    """The published autoencoders as a reference selector: slot 0 -> reference domain, slot 1 + t -> task t.
    Slots of tasks not yet trained at this checkpoint are kept but marked untrained (vote only on request)."""
    from .ddas.reference import REFERENCE_SLOT, AlexNetFeatures, ReferenceAutoencoder, ReferenceSelector
    sd = read_state_dict(path, "autochooser")
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"^(\d+)\.(encoder|decoder)\.0\.(weight|bias)$", key)
        if not m:
            raise CheckpointError(f"autochooser {path}: unexpected key {key!r} (expected N.encoder.0.weight, "
                                  "N.decoder.0.weight, ...: a list of AlexNet autoencoders)")
        slots.setdefault(int(m.group(1)), {})[f"{m.group(2)}.0.{m.group(3)}"] = value
    if 0 not in slots or len(slots) < num_tasks + 1:
        raise CheckpointError(f"autochooser {path} has {len(slots)} autoencoder slots; the sequence needs "
                              f"{num_tasks + 1} (slot 0 = reference domain, then one per task)")
    dim = AlexNetFeatures().dim(image_size)
    selector = ReferenceSelector(AlexNetFeatures())  # placeholder extractor: only the state is written
    for slot in range(num_tasks + 1):
        tensors = slots[slot]
        enc = tensors.get("encoder.0.weight")
        if enc is None or len(tensors) != 4:
            raise CheckpointError(f"autochooser {path}: slot {slot} lacks encoder/decoder weights or biases")
        hidden, in_dim = enc.shape
        if in_dim != dim:
            raise CheckpointError(f"autochooser {path}: slot {slot} reads {in_dim} features but AlexNet conv5 at "
                                  f"{image_size} px gives {dim}: an autochooser of another image size")
        ae = ReferenceAutoencoder(in_dim, hidden, generator=torch.Generator())
        try:
            ae.load_state_dict({k: v.float() for k, v in tensors.items()})
        except RuntimeError as e:
            raise CheckpointError(f"autochooser {path}: slot {slot}: {str(e).splitlines()[-1].strip()}") from None
        task = REFERENCE_SLOT if slot == 0 else slot - 1
        selector.add_slot(task, ae, cfg.ddas.fixed_threshold, trained=slot == 0 or slot - 1 < trained_tasks)
    return selector


def import_reference(checkpoints: list[str | Path], model_name: str, sequence: str, out: str | Path, *,
                     autochoosers: Optional[list[str | Path]] = None, config: Optional[str] = None,
                     data_root: Optional[str] = None, overrides: Optional[list[str]] = None) -> Path:
    """Write a moecl run folder ``out`` from published checkpoints (one per task in order, or the final one)."""
    from safetensors.torch import save_file

    from .data import resolve_sequence
    from .evaluation.report import new_report, write_report
    from .model import MoECLIP, image_size_of
    from .model.backbone import create_backbone
    from .methods import get_method
    from .runstate import files as ckpt
    from .runstate import layout
    from .runstate.adapters import load_adapter_state
    from .runstate.layout import Progress

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new run folder")
    base = config or REFERENCE_CONFIGS.get(Path(sequence).stem)
    if base is not None and config is None and base not in shipped_configs():
        base = None
    if overrides:
        parse_overrides(overrides)  # unknown keys fail here, naming the key
    cfg = load_config(base, list(overrides or []) + [f"data.sequence={sequence}"]
                      + ([f"data.root={data_root}"] if data_root else []))
    seq_path = resolve_sequence(cfg.data.root, cfg.data.sequence)
    import yaml
    seq_doc = yaml.safe_load(seq_path.read_text()) or {}
    tasks = [str(t) for t in seq_doc.get("tasks", [])]
    held_out = [str(t) for t in seq_doc.get("held_out", []) or []]
    if not tasks:
        raise ConfigError(f"sequence {seq_path} names no tasks")
    n = len(checkpoints)
    if n not in (1, len(tasks)):
        raise CheckpointError(f"{n} checkpoints for a sequence of {len(tasks)} tasks: give the final one, or one "
                              f"per task in order ({', '.join(tasks)})")
    choosers = list(autochoosers or [])
    if choosers and len(choosers) not in (1, n):
        raise CheckpointError(f"{len(choosers)} autochooser files for {n} checkpoints: give one (the final) or one "
                              "per checkpoint")

    # 1. read and check everything in memory
    first_sd = read_state_dict(checkpoints[0])
    backbone_openai, sites = split_published(first_sd)
    shape = moe_shape(sites)
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"name": model_name, "pretrained": None, "init_checkpoint": None}),
        "moe": cfg.moe.model_copy(update=shape)})
    backbone = convert_backbone(backbone_openai, model_name)
    clip = create_backbone(cfg.model)
    clip.load_state_dict(backbone)
    model = MoECLIP(clip, cfg.model, cfg.moe, "moe-adapters")
    while model.num_tasks < len(tasks):
        model.add_task()
    per_ckpt = [adapter_tensors(sites, model, len(tasks))]
    hashes = [sha256(Path(checkpoints[0]))]
    del first_sd
    for path in checkpoints[1:]:
        sd = read_state_dict(path)
        other_backbone, other_sites = split_published(sd)
        for key in backbone_openai:
            if key not in other_backbone or not torch.equal(other_backbone[key], backbone_openai[key]):
                raise CheckpointError(f"{path}: backbone tensor {key!r} differs from {checkpoints[0]}'s: "
                                      "checkpoints of different runs or models")
        per_ckpt.append(adapter_tensors(other_sites, model, len(tasks)))
        hashes.append(sha256(Path(path)))
    image_size = image_size_of(model.clip)
    selectors = []
    if choosers:
        for i in range(n):
            trained = len(tasks) if n == 1 else i + 1
            chooser = Path(choosers[i] if len(choosers) == n else choosers[-1])
            selectors.append(autochooser_selector(chooser, cfg, image_size, trained, len(tasks)))
        cfg = cfg.model_copy(update={"ddas": cfg.ddas.model_copy(update={
            "enabled": True, "kind": "reference", "threshold": "fixed", "decision": "batch"})})
    else:
        cfg = cfg.model_copy(update={"ddas": cfg.ddas.model_copy(update={"enabled": False})})

    # 2. write into a staging folder, then move it into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import.", dir=out.parent))
    try:
        save_file(backbone, str(tmp / "backbone.safetensors"))
        final_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
            "init_checkpoint": str((out / "backbone.safetensors").resolve())})})
        Config.model_validate(final_cfg.model_dump())
        (tmp / "config.yaml").write_text(final_cfg.to_yaml())
        source = {"imported_from": [{"file": str(Path(p).resolve()), "sha256": h} for p, h in zip(checkpoints, hashes)],
                  "autochooser": [str(Path(c).resolve()) for c in choosers],
                  "note": "published MoE-Adapters checkpoint(s); frozen-expert set unknown (not in the files)"}
        for i, tensors in enumerate(per_ckpt):
            trained = len(tasks) if n == 1 else i + 1
            load_adapter_state(model, (tensors, {"num_tasks": len(tasks), "moe": cfg.moe.model_dump(mode="json"),
                                                 "model": cfg.model.model_dump(mode="json")}))
            name = ckpt.task_dir_name(trained - 1)
            stage = tmp / "checkpoints" / f".{name}.staging"
            stage.mkdir(parents=True)
            state = {"progress": asdict(Progress(task=trained)), "task_end": True, "world_size": 1, "ep_size": 1,
                     "imported": source}
            layout.write_shared(stage, state, model=model, method=get_method("moe-adapters"),
                                selector=selectors[i] if selectors else None, adapter_meta={"imported": source})
            ckpt.finalize(stage, tmp / "checkpoints" / name, {"task": trained, "step": 0, "task_end": True})
        write_report(tmp, new_report(tasks, held_out, config=final_cfg.model_dump(mode="json"), imported=source))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_import_reference(args) -> int:
    out = import_reference(args.checkpoints, args.model, args.sequence, args.out, autochoosers=args.autochooser,
                           config=args.config, data_root=args.data_root, overrides=args.overrides)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    print(f"wrote run {out}: {len(ckpts)} task-end checkpoint(s) ({', '.join(ckpts)}), backbone "
          f"{out / 'backbone.safetensors'}; evaluate with `moecl eval {out}`")
    return 0
