"""Shared pieces of the performance harness: flags, device and precision, models, inputs, timing, records.

Every benchmark script runs on CUDA when a GPU is visible and on the CPU otherwise, measures its
variants side by side in ONE process and ONE run (interleaved rounds, so drift hits every variant alike),
prints a table with ratios and one JSON line, and writes the JSON record with ``--out FILE``.

The record carries what is needed to compare runs: device (GPU name or CPU model, threads), versions
(torch, deepspeed, open_clip, CUDA), git commit, shapes, batch, precision, per-variant timings.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

import torch

SOT, EOT = 49406, 49407  # open_clip's start / end-of-text token ids


# --------------------------------------------------------------------------------------------------------
# flags

def base_parser(description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every script shares; ``defaults`` overrides per script (e.g. batch=64)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults.get("model", "moecl-small"),
                   help="open_clip model name (random weights): moecl-tiny, moecl-small, ViT-B-16-quickgelu, ViT-L-14")
    p.add_argument("--batch", type=int, default=defaults.get("batch", 64), help="images per step")
    p.add_argument("--image-size", type=int, default=None,
                   help="must equal the model's native size (checked); default: native")
    p.add_argument("--experts", type=int, default=defaults.get("experts", 22), help="experts per block")
    p.add_argument("--top-k", type=int, default=defaults.get("top_k", 2), help="experts per sample")
    p.add_argument("--width", type=int, default=64, help="adapter bottleneck r")
    p.add_argument("--classes", type=int, default=defaults.get("classes", 100),
                   help="class prompts encoded through the adapted text tower every step")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=defaults.get("steps", 20), help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=defaults.get("warmup", 3), help="untimed steps per variant")
    p.add_argument("--rounds", type=int, default=defaults.get("rounds", 2),
                   help="timed steps are split in this many interleaved rounds over the variants")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON record here")
    return p


# --------------------------------------------------------------------------------------------------------
# device, precision, distributed

@dataclass
class Ctx:
    device: torch.device
    precision: str  # "bf16" | "fp32"
    args: argparse.Namespace

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self, enabled: bool = True):
        if self.precision == "bf16" and enabled:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def setup(args: argparse.Namespace) -> Ctx:
    """Threads, DeepSpeed accelerator + torch.distributed (a world of one unless under torchrun), device."""
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if want_cuda else "cpu")
    from moecl.runtime import init_distributed
    info = init_distributed("cuda" if want_cuda else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if info.device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed + info.rank)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference's precision)
        torch.backends.cudnn.allow_tf32 = False
    return Ctx(info.device, precision, args)


def quiet() -> None:
    """Silence open_clip's 'no pretrained weights' warning and DeepSpeed's info chatter."""
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------------
# models and inputs

def moe_config(args: argparse.Namespace, **over: Any):
    from moecl.config import MoEConfig
    kw = dict(num_experts=args.experts, top_k=args.top_k, width=args.width)
    kw.update(over)
    return MoEConfig(**kw)


def build(args: argparse.Namespace, ctx: Ctx, method: str, *, grad_checkpointing: bool = False, tasks: int = 1,
          **moe_over: Any):
    """A frozen backbone with adapters, ``tasks`` tasks added (routers for task 0..tasks-1), on the device."""
    from moecl.config import ModelConfig
    from moecl.model import build_model, image_size_of
    model = build_model(ModelConfig(name=args.model, grad_checkpointing=grad_checkpointing),
                        moe_config(args, **moe_over), method=method)
    native = image_size_of(model.clip)
    if args.image_size is None:
        args.image_size = native
    elif args.image_size != native:
        raise SystemExit(f"--image-size {args.image_size}: {args.model} is built for {native} px")
    if method == "moe-adapters":
        model.setup_expert_parallel()
    for _ in range(tasks):
        model.add_task()
    return model.to(ctx.device)


def context_length(model) -> int:
    clip = model.clip if hasattr(model, "clip") else model
    return int(getattr(clip, "context_length", None) or clip.positional_embedding.shape[0])


def make_inputs(args: argparse.Namespace, ctx: Ctx, model, batch: Optional[int] = None):
    """Random images [B, 3, S, S], C class prompts (SOT, 4-10 word tokens, EOT, padding) and labels."""
    g = torch.Generator().manual_seed(args.seed)
    b = batch or args.batch
    images = torch.randn(b, 3, args.image_size, args.image_size, generator=g)
    ctx_len = context_length(model)
    tokens = torch.zeros(args.classes, ctx_len, dtype=torch.long)
    for i in range(args.classes):
        n = int(torch.randint(4, min(11, ctx_len - 1), (1,), generator=g))
        tokens[i, 0] = SOT
        tokens[i, 1:n + 1] = torch.randint(1, 49000, (n,), generator=g)
        tokens[i, n + 1] = EOT
    labels = torch.randint(0, args.classes, (b,), generator=g)
    return images.to(ctx.device), tokens.to(ctx.device), labels.to(ctx.device)


def make_optimizer(params, ctx: Ctx, lr: float = 1e-3):
    """Fused AdamW on every device: one operator per step, whatever the number of parameter tensors (the
    CPU's foreach AdamW loops per tensor, which would make the count of tensors, not the work, the cost)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)


def nonzero_adapters(model, seed: int = 0) -> None:
    """Give every expert / adapter and router small random weights (zero-init would make the up-projection
    gradients the only non-zero ones on step 1 and routing uniform); timing is unaffected either way."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(model):
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def adapter_params(model) -> list[torch.nn.Parameter]:
    out = []
    for site in model.sites():
        out.extend(site.parameters())
    return out


def classify(feats: torch.Tensor, routes: torch.Tensor, heads: dict[int, torch.Tensor]) -> torch.Tensor:
    """Argmax per image against its route's class head (what the evaluator and predict do per route)."""
    preds = torch.empty(feats.shape[0], dtype=torch.long, device=feats.device)
    for r in routes.unique().tolist():
        m = routes == r
        preds[m] = (feats[m] @ heads[int(r)]).argmax(dim=1)
    return preds


def threshold_cases(selector, feats: torch.Tensor, tasks: int) -> dict[str, torch.Tensor]:
    """The DDAS thresholds the inference benchmarks time: every image routed (``in``), about half of them (the
    median of each image's lowest error: ``half``), none (``out``)."""
    errors = selector.errors(feats)  # [N, T]
    return {"in": torch.full((tasks,), float("inf")),
            "half": errors.min(dim=1).values.median().repeat(tasks).cpu() * 1.0000001,
            "out": torch.zeros(tasks)}


def set_thresholds(selector, cases: dict[str, torch.Tensor], kind: str, device) -> None:
    selector.thresholds = cases[kind].to(device, torch.float32)


def routed_fractions(selector, feats: torch.Tensor, cases: dict[str, torch.Tensor], device) -> dict[str, float]:
    """Share of ``feats`` the selector routes to a task under each of ``cases`` (left at the last case)."""
    out = {}
    for kind in cases:
        set_thresholds(selector, cases, kind, device)
        out[kind] = float((selector.select(feats) >= 0).float().mean())
    return out


def zero_shot_predict(model, images: torch.Tensor, heads: dict[int, torch.Tensor], ctx: "Ctx") -> torch.Tensor:
    """Plain CLIP's prediction: the untouched backbone's features against the zero-shot head."""
    from moecl.routes import ZERO_SHOT
    with torch.no_grad(), ctx.autocast():
        f = model.encode_image(images, ZERO_SHOT, normalize=True).float()
    return (f @ heads[ZERO_SHOT]).argmax(dim=1)


def count(params) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------------------
# timing

@dataclass
class Timing:
    times_ms: list[float]  # wall clock per call
    cpu_ms: Optional[list[float]] = None  # this process's CPU time per call (all threads), robust to a busy host

    @property
    def primary(self) -> float:
        """The figure ratios are taken of: wall-clock median on GPU; on CPU the median CPU time per call
        (run with --threads 1 on a shared host: then it counts work, not waiting for a core)."""
        return self.cpu_median if self.cpu_ms else self.median

    @property
    def primary_name(self) -> str:
        return "cpu_median_ms" if self.cpu_ms else "median_ms"

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")

    def as_dict(self) -> dict[str, Any]:
        out = {"median_ms": round(self.median, 3), "mean_ms": round(self.mean, 3), "min_ms": round(self.min, 3),
               "stdev_ms": round(self.stdev, 3), "n": len(self.times_ms),
               "times_ms": [round(t, 3) for t in self.times_ms]}
        out["primary"] = self.primary_name
        if self.cpu_ms:
            out["cpu_median_ms"] = round(self.cpu_median, 3)
            out["cpu_ms"] = [round(t, 3) for t in self.cpu_ms]
        return out


def time_variants(fns: dict[str, Callable[[], Any]], ctx: Ctx, steps: int, warmup: int, rounds: int = 2,
                  log: bool = True) -> dict[str, Timing]:
    """Warm every variant up, then time ``steps`` calls of each, split into ``rounds`` interleaved rounds.

    Each call is timed on its own, between device synchronisations (CUDA), with ``time.perf_counter``; on the
    CPU the process's CPU time per call is recorded too (on a shared host, wall time includes waiting for
    cores that other processes hold; CPU time does not)."""
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        ctx.sync()
        if log:
            print(f"  warmed up {name} ({warmup} steps, {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max(1, min(rounds, steps))
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for name, fn in fns.items():
            for _ in range(n):
                ctx.sync()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                ctx.sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    return {name: Timing(times[name], None if ctx.cuda else cpu[name]) for name in fns}


# --------------------------------------------------------------------------------------------------------
# memory

def reset_peak_memory(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    else:
        try:  # Linux: "5" resets the process's peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_now(ctx: Ctx) -> dict[str, float]:
    """Current and peak memory in MiB: CUDA allocator figures on GPU, process RSS on CPU."""
    if ctx.cuda:
        return {"allocated_mib": torch.cuda.memory_allocated(ctx.device) / 2**20,
                "peak_allocated_mib": torch.cuda.max_memory_allocated(ctx.device) / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved(ctx.device) / 2**20}
    rss, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    return {"rss_mib": (rss or 0) / 1024, "peak_rss_mib": (hwm or 0) / 1024}


# --------------------------------------------------------------------------------------------------------
# records

def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "moecl"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty(moecl)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(ctx: Ctx) -> dict[str, Any]:
    import deepspeed
    import open_clip
    env: dict[str, Any] = {
        "device": str(ctx.device),
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "open_clip": open_clip.__version__, "cuda": torch.version.cuda if ctx.cuda else None,
        "git_commit": _git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def shapes(args: argparse.Namespace, model=None) -> dict[str, Any]:
    out = {"model": args.model, "batch": args.batch, "image_size": args.image_size, "experts": args.experts,
           "top_k": args.top_k, "width": args.width, "classes": args.classes}
    if model is not None:
        clip = model.clip
        out["image_tokens"] = int(clip.visual.positional_embedding.shape[0])
        out["image_width"] = int(clip.visual.transformer.width)
        out["image_blocks"] = len(clip.visual.transformer.resblocks)
        out["text_tokens"] = context_length(model)
        out["text_width"] = int(clip.transformer.width)
        out["text_blocks"] = len(clip.transformer.resblocks)
    return out


def emit(bench: str, ctx: Ctx, args: argparse.Namespace, results: dict[str, Any], ratios: dict[str, float],
         extra: Optional[dict[str, Any]] = None, model=None) -> dict[str, Any]:
    """Print the one-line JSON record (prefixed ``JSON``) and write it to ``--out``."""
    record = {"bench": bench, "env": environment(ctx), "precision": ctx.precision,
              "shapes": shapes(args, model), "steps": args.steps, "warmup": args.warmup,
              "results": results, "ratios": {k: round(v, 4) for k, v in ratios.items()}}
    if extra:
        record.update(extra)
    record["argv"] = sys.argv[1:]
    line = json.dumps(record, sort_keys=False)
    print("JSON " + line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return record


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(ctx: Ctx, args: argparse.Namespace) -> str:
    where = torch.cuda.get_device_name(ctx.device) if ctx.cuda else f"CPU ({_cpu_model()}, {torch.get_num_threads()} threads)"
    return (f"{args.model} {args.image_size}px batch {args.batch}, {args.experts} experts top-{args.top_k}, "
            f"{args.classes} class prompts, {ctx.precision}, on {where}")
