"""Typed configuration: YAML files validated by pydantic models, with ``section.field=value`` overrides.

Every error names the offending key (and the closest valid key), or the field, the value given and the
type expected. Shipped configs live in ``moecl/configs`` and are addressed by name or by path.
"""
from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import MoeclError
from .methods import NAMES as METHOD_NAMES, get_method
from .shipped import find, folder, shipped

CONFIG_DIR = folder("config")
# top-level keys of a config file that are not run settings: its one-line description, and the demo command's
# world and pretraining recipe (moecl/configs/demo.yaml; read by moecl.demo)
NOT_RUN_SETTINGS = ("description", "demo")


class ConfigError(MoeclError, ValueError):
    """A configuration problem, with a message meant for the person who wrote the config."""


class _Section(BaseModel):
    # allow_inf_nan=False: every float (also inside lists and pairs) must be finite: nan/inf are refused by key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
UnitFraction = Annotated[float, Field(ge=0.0, lt=1.0)]  # [0, 1), e.g. Adam betas
CropFraction = Annotated[float, Field(gt=0.0, le=1.0)]  # (0, 1], RandomResizedCrop scale
MAX_SEED = 2**63 - 1  # the trainer derives per-task seeds modulo 2**63
BlockList = Union[Literal["all"], list[Annotated[int, Field(ge=0)]]]  # residual blocks of one tower, 0-based


class ModelConfig(_Section):
    """Which open_clip backbone to adapt, and where its weights come from."""
    name: str = Field("moecl-tiny", description="open_clip model name, e.g. ViT-B-16-quickgelu")
    pretrained: Optional[str] = Field(
        None, description="open_clip pretrained tag, a local .pt/.bin/.safetensors file, or hf-hub:ORG/NAME")
    cache_dir: Optional[str] = Field(None, description="where open_clip looks for tag/hf-hub weights (offline)")
    init_checkpoint: Optional[str] = Field(
        None, description="a full-model safetensors file to start from, or demo: the demo's pretrained moecl-tiny "
                          "(built into the cache on first use)")
    grad_checkpointing: bool = Field(False, description="recompute backbone activations in backward")


class MoEConfig(_Section):
    """The MoE-adapter beside the MLP of every residual block."""
    num_experts: int = Field(22, ge=1, description="experts per block (one pool shared by all tasks)")
    top_k: int = Field(2, ge=1, description="experts chosen per sample")
    width: int = Field(64, ge=1, description="adapter bottleneck width r")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside each expert")
    scale: float = Field(0.1, ge=0.0, description="expert output scale")
    ep_size: int = Field(1, ge=1, description="expert-parallel ranks the experts are sharded over")
    ep_mode: Literal["gather", "all-to-all"] = Field(
        "gather", description="with ep_size > 1: all-gather each block's expert weights (gather) or send the "
                              "activations to the experts' ranks (all-to-all, DeepSpeed); docs/expert_parallelism.md")
    routing: Literal["sample", "token"] = Field("sample", description="route per sample (token 0) or per token")
    text_route_token: Literal["first", "eot"] = Field(
        "first", description="text token the router reads: first (reference) or the EOT token")
    noise_eps: float = Field(0.01, ge=0.0, description="added to softplus(noise) std in training")
    capacity_factor: float = Field(1.0, gt=0.0, description="expert capacity factor when drop_tokens")
    drop_tokens: bool = Field(False, description="drop routes over capacity (reference: never)")
    drop_policy: Literal["probs", "position"] = Field("probs", description="which routes to drop")
    aux_loss_weight: float = Field(0.0, ge=0.0, description="load-balancing loss weight (reference: 0)")
    freeze_top: int = Field(2, ge=0, description="experts frozen per block at each task end (activate-freeze)")
    towers: Literal["both", "image", "text"] = Field("both", description="towers that get adapters")
    shared_router: bool = Field(False, description="one router for all tasks (the CIL variant)")
    image_blocks: BlockList = Field(
        "all", description="image blocks (0-based) that get adapters: all, or a list such as [6, 7, 8, 9, 10, 11]; "
                           "with ddas.feature=block the blocks before the first share one forward for every route")
    text_blocks: BlockList = Field("all", description="text blocks (0-based) that get adapters: all, or a list")

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        for key in ("image_blocks", "text_blocks"):
            blocks = getattr(self, key)
            if blocks != "all" and (not blocks or len(set(blocks)) != len(blocks)):
                raise ValueError(f"moe.{key}={blocks}: list each block once (at least one), or all; for no adapters "
                                 "in a tower use moe.towers")
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}; "
                             "choose top_k <= num_experts")
        if self.freeze_top > self.num_experts:
            raise ValueError(f"moe.freeze_top={self.freeze_top} exceeds moe.num_experts={self.num_experts}; "
                             "choose freeze_top <= num_experts")
        if self.num_experts % self.ep_size:
            raise ValueError(f"moe.ep_size={self.ep_size} does not divide moe.num_experts={self.num_experts}; "
                             "choose an ep_size that divides the number of experts")
        return self


class DataConfig(_Section):
    """Where the task shards live and how they stream."""
    root: str = Field("data/synthetic", description="folder holding <task>/task.json and shards")
    sequence: str = Field("synthetic", description="sequence file: shipped name or path to a YAML")
    batch_size: int = Field(64, ge=1, description="global training batch (split over data-parallel ranks)")
    workers: int = Field(2, ge=0, description="loader worker processes per rank")
    shuffle_buffer: int = Field(1000, ge=0, description="sample shuffle buffer of the train stream")
    resampled: bool = Field(True, description="train shards drawn with replacement (infinite stream)")
    train_crop_scale: tuple[CropFraction, CropFraction] = Field((0.9, 1.0), description="RandomResizedCrop scale")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0,
                                    description="corrupt samples tolerated before a stream stops")
    max_member_bytes: int = Field(64 << 20, ge=1, description="largest file of a sample (image) read from a "
                                  "shard; bigger ones are skipped and counted as bad")
    max_shard_bytes: int = Field(16 << 30, ge=1, description="most bytes one shard may decompress to; the rest is "
                                 "cut off and counted as bad")
    shard_url_template: Optional[str] = Field(
        None, description="read shards from this URL instead of ROOT/TASK/SHARD, e.g. 'pipe:aws s3 cp "
                          "s3://b/{task}/{shard} -' (placeholders {root} {task} {split} {shard}); also "
                          "MOECL_SHARD_URL_TEMPLATE. Never taken from a data folder")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        lo, hi = self.train_crop_scale
        if lo > hi:
            raise ValueError(f"data.train_crop_scale=[{lo}, {hi}]: the first value (smallest crop) must not exceed "
                             "the second")
        return self


class TrainConfig(_Section):
    """The continual task loop."""
    method: Literal[METHOD_NAMES] = Field(  # type: ignore[valid-type]  (moecl/methods.py)
        "moe-adapters", description="what is trained: MoE-adapters or a baseline")
    iterations: Union[PositiveInt, Annotated[list[PositiveInt], Field(min_length=1)]] = Field(
        1000, description="steps per task (one value or one per task)")
    epochs: Optional[float] = Field(None, gt=0, description="if set, steps = epochs x train images / batch")
    lr: Union[PositiveFloat, Annotated[list[PositiveFloat], Field(min_length=1)],
              Annotated[dict[str, PositiveFloat], Field(min_length=1)]] = Field(
        1e-3, description="peak learning rate (one value, one per task, or a mapping task name -> value)")
    warmup: int = Field(100, ge=0, description="linear warmup steps, then cosine, within each task")
    betas: tuple[UnitFraction, UnitFraction] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    label_smoothing: float = Field(0.2, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    grad_clip: float = Field(0.0, ge=0.0, description="gradient norm clip (0 = off)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    ds_config: str = Field("auto", description="ds_configs/ name or JSON path; auto = bf16 on GPU, fp32 on CPU")
    zero_stage: Optional[int] = Field(None, ge=0, le=2, description="override the DeepSpeed ZeRO stage")
    checkpoint_every: int = Field(0, ge=0, description="mid-task checkpoint interval in steps (0 = task ends only)")
    keep_checkpoints: int = Field(2, ge=1, description="mid-task checkpoints kept")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of everything")
    deterministic: bool = Field(False, description="deterministic algorithms (CPU exact resume)")
    nan_policy: Literal["stop", "skip"] = Field("stop", description="on a non-finite loss: stop or skip the step")
    max_consecutive_skips: int = Field(10, ge=1, description="nan_policy=skip: stop after this many skips in a row")


class DDASConfig(_Section):
    """The distribution discriminative auto-selector."""
    enabled: bool = Field(True, description="fit one autoencoder per task for task-agnostic routing")
    hidden: int = Field(64, ge=1, description="autoencoder bottleneck")
    iterations: int = Field(300, ge=1, description="autoencoder training steps")
    lr: float = Field(1e-2, gt=0.0, description="autoencoder learning rate (Adam)")
    batch_size: int = Field(256, ge=1, description="autoencoder batch")
    max_images: int = Field(5000, ge=1, description="task training images the autoencoder sees")
    holdout_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="images held out for calibration")
    threshold: Literal["calibrated", "fixed"] = Field("calibrated", description="how the threshold is set")
    quantile: float = Field(0.99, gt=0.0, le=1.0, description="calibration quantile of held-out errors")
    margin: float = Field(1.1, ge=1.0, description="calibrated threshold = quantile x margin")
    fixed_threshold: float = Field(0.0655, gt=0.0, description="threshold when threshold=fixed")
    decision: Literal["sample", "batch"] = Field("sample", description="decide per sample or per batch (reference)")
    kind: Literal["clip", "reference"] = Field(
        "clip", description="clip: autoencoders on CLIP features; reference: the published AlexNet selector")
    alexnet_weights: Optional[str] = Field(
        None, description="kind=reference: local torchvision AlexNet weights (default: torch hub checkpoints dir)")
    reference_task: Optional[str] = Field(
        None, description="kind=reference: task folder (path or name under data.root) of the plain-CLIP slot")
    reference_iterations: int = Field(1000, ge=1, description="kind=reference: steps of the reference-domain slot")
    future_slots_vote: bool = Field(
        False, description="kind=reference: stored untrained slots vote too (the published code's behaviour)")
    feature: Literal["output", "block"] = Field(
        "output", description="what the selector reads: the frozen CLIP's image embedding (a plain pass before the "
                              "routed one) or the CLS token entering the first adapted image block (one pass; needs "
                              "moe.image_blocks to start after block 0)")
    scorer: Literal["autoencoder", "gaussian"] = Field(
        "autoencoder", description="per-task model of the feature: autoencoder (reconstruction error) or gaussian "
                                   "(mean squared z-score under the task's per-dimension mean and std)")


class EvalConfig(_Section):
    """Evaluation after every task."""
    batch_size: int = Field(256, ge=1, description="evaluation batch per rank")
    modes: list[Literal["oracle", "agnostic"]] = Field(["oracle", "agnostic"], min_length=1,
                                                       description="routing modes")
    templates: Literal["ensemble", "train"] = Field("ensemble", description="prompt templates of the heads")
    max_samples: Optional[int] = Field(None, ge=1, description="cap test samples per set (quick looks)")
    cil: bool = Field(False, description="class-incremental: label space = all classes seen so far")
    reference_ddas: bool = Field(False, description="also evaluate the reference DDAS (per batch, fixed threshold)")
    workers: int = Field(0, ge=0, description="loader workers per rank for evaluation")
    gate_noise: bool = Field(False, description="keep the gates' training noise on at test time (published CIL eval)")
    transform: Literal["eval", "train"] = Field(
        "eval", description="test-image transform: eval (center crop) or train (random crop, published CIL eval)")
    frozen_cache: Literal["disk", "memory", "none"] = Field(
        "disk", description="reuse the frozen backbone's test features across rows: disk (also under RUN/cache, "
                            "for resume and moecl eval), memory, none (every mode re-encodes every set, as published)")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"eval.modes={self.modes} names a mode twice; list each mode once")
        return self


class RuntimeConfig(_Section):
    """Where and how it runs."""
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = GPU when present")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    log_every: int = Field(10, ge=1, description="TensorBoard scalar interval in steps")
    progress: bool = Field(True, description="progress bars on rank 0 (when its stderr is a terminal)")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads per process")
    collective_timeout_s: float = Field(
        300.0, gt=0, description="seconds a rank waits in a collective for the others before the run stops, "
                                 "naming the rank that stopped answering")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ddas: DDASConfig = Field(default_factory=DDASConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _check_single_pass(self) -> "Config":
        """ddas.feature=block reads the CLS token entering the first adapted image block: that block must exist
        and come after block 0 (the CLS token entering block 0 is the same for every image)."""
        if self.ddas.feature != "block" or not self.ddas.enabled or self.train.method != "moe-adapters":
            return self
        if self.ddas.kind != "clip":
            raise ValueError(f"ddas.feature=block needs ddas.kind=clip (got {self.ddas.kind!r})")
        if self.moe.towers == "text":
            raise ValueError("ddas.feature=block reads an adapted image block, but moe.towers=text adapts none")
        if self.moe.image_blocks == "all" or min(self.moe.image_blocks) == 0:
            raise ValueError(f"ddas.feature=block with moe.image_blocks={self.moe.image_blocks!r}: the first adapted "
                             "image block must come after block 0, e.g. moe.image_blocks=[6,7,8,9,10,11] for ViT-B/16")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def per_task(self, field: str, task: int, names: Union[int, list[str]]) -> Any:
        """``train.lr`` / ``train.iterations`` for task ``task`` of a sequence whose training tasks are
        ``names`` (or their number): a list gives one value per position, a mapping one per task name."""
        value = getattr(self.train, field)
        num_tasks = names if isinstance(names, int) else len(names)
        if isinstance(value, dict):
            if isinstance(names, int):
                raise ConfigError(f"train.{field} is a mapping by task name; the task names are needed")
            if names[task] not in value:
                raise ConfigError(f"train.{field} has no value for task {names[task]!r} (it names "
                                  f"{', '.join(map(repr, value))}); add one, or give a single value")
            return value[names[task]]
        if isinstance(value, list):
            if len(value) < num_tasks:
                raise ConfigError(f"train.{field} lists {len(value)} values but the sequence has {num_tasks} "
                                  f"tasks; give one value per task or a single value")
            return value[task]
        return value


def check_per_task(cfg: Config, names: list[str]) -> None:
    """A per-task mapping (``train.lr``) names exactly the sequence's training tasks: a missing task or a name
    that is not one (a typo, another sequence's task) is refused before anything trains."""
    for key in ("lr",):
        value = getattr(cfg.train, key)
        if isinstance(value, dict):
            unknown = [k for k in value if k not in names]
            if unknown:
                raise ConfigError(f"train.{key} names {', '.join(map(repr, unknown))}, not a training task of the "
                                  f"sequence ({', '.join(names)})")
            for t in range(len(names)):
                cfg.per_task(key, t, names)


def check_batch_fits(cfg: Config, tasks: Any) -> None:
    """Refuse a ``data.batch_size`` larger than a training task's train split (each batch would repeat
    images); needs the data, so the trainer calls it at start, before any training. ``tasks``: TaskInfos."""
    if not get_method(cfg.train.method).trains_anything:
        return
    for task in tasks:
        n = task.count("train")
        if cfg.data.batch_size > n:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the train split of task "
                              f"'{task.name}' ({n} images, {task.root / 'task.json'}); choose data.batch_size "
                              f"<= {n}")


# ---------------------------------------------------------------------------------------------------------
# Loading and overrides

def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.append(prefix + name)
            keys.extend(valid_keys(ann, prefix + name + "."))
        else:
            keys.append(prefix + name)
    return keys


def _suggest(key: str) -> str:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # try the last component alone (a typo in the field, right section)
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f"; did you mean '{close[0]}'?" if close else ""


_TYPE_WORDS = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
               "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
               "bool_type": "true or false", "string_type": "a string", "literal_error": None,
               "list_type": "a list", "tuple_type": "a pair [a, b]", "dict_type": "a mapping"}


_BOUND_WORDS = {"greater_than": "a value > {gt}", "greater_than_equal": "a value >= {ge}",
                "less_than": "a value < {lt}", "less_than_equal": "a value <= {le}",
                "finite_number": "a finite number (not nan or inf)", "too_short": "at least {min_length} item(s)"}


def _loc(parts: tuple) -> str:
    """``('train', 'betas', 0)`` -> ``train.betas[0]``; pydantic's union-member tags ('int', 'list[float]',
    'constrained-float', ...) are dropped so the key reads as the user wrote it."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in ("int", "float") and not p.startswith(("list[", "tuple[", "function-", "constrained-")):
            out += ("." if out else "") + p
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    found = []  # (loc, is a type mismatch, line)
    for e in err.errors():
        loc = _loc(e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            found.append((loc, False, f"unknown key '{loc}'{_suggest(loc)}"))
        elif kind == "value_error":
            found.append((loc, False, str(e["msg"]).removeprefix("Value error, ")))
        elif kind in _BOUND_WORDS:
            expected = _BOUND_WORDS[kind].format(**e.get("ctx", {}))
            found.append((loc, False, f"{loc}: got {e.get('input')!r}, expected {expected}"))
        else:
            expected = _TYPE_WORDS.get(kind)
            if kind == "literal_error":
                expected = "one of " + e["ctx"]["expected"]
            what = f"expected {expected}" if expected else e["msg"]
            found.append((loc, kind in _TYPE_WORDS, f"{loc}: got {e.get('input')!r}, {what}"))
    # A union field (a value or a list) reports one error per member: when the value had the right shape for
    # one member and broke a bound there, the other member's "wrong type" is noise.
    bounded = [loc for loc, is_type, _ in found if not is_type]
    lines = [line for loc, is_type, line in found
             if not (is_type and any(b == loc or b.startswith(loc + "[") for b in bounded))]
    uniq = list(dict.fromkeys(lines))
    return f"invalid config ({source}):\n  " + "\n  ".join(uniq)


# ---------------------------------------------------------------------------------------------------------
# YAML from people: duplicate keys refused, alias expansion bounded, binary files refused

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a larger file is not a config
MAX_YAML_VALUES = 100_000  # values after alias expansion (an "alias bomb" expands to billions)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and documents whose aliases expand beyond
    MAX_YAML_VALUES values; the expanded size is counted on the composed node graph (linear in the file)
    before anything is constructed, so a refused document costs no memory."""

    def construct_document(self, node):
        _expanded_size(node, {})
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _YamlRefused(f"duplicate key {key!r} at line {line} (first at line {seen[key]}); "
                                       "keep one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _YamlRefused(Exception):
    pass


def _expanded_size(node, memo: dict) -> int:
    """Values in ``node`` with every alias expanded (memoised per node; a recursive alias is refused)."""
    key = id(node)
    if key in memo:
        if memo[key] is None:
            raise _YamlRefused(f"recursive alias at line {node.start_mark.line + 1}")
        return memo[key]
    memo[key] = None
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        n = 1
    if n > MAX_YAML_VALUES:
        raise _YamlRefused(f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; write the "
                           "values out instead of nesting aliases")
    memo[key] = n
    return n


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass: safe tags only)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML written by a person: safe tags only, no duplicate keys, bounded alias expansion.
    Errors are ConfigErrors naming ``source`` (a file or an override)."""
    try:
        return _parse_yaml(text)
    except _YamlRefused as e:
        raise ConfigError(f"{source} refused: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None


def read_config_file(path: Path) -> Any:
    """A config file's parsed YAML; a directory, a binary, an oversized or an empty file is refused by name."""
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory; pass a YAML file (or a shipped config name, see "
                          "`moecl configs`)")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"config path {path} is not a regular file; pass a YAML file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {size:,} bytes; a config is a small YAML file "
                              f"(at most {MAX_CONFIG_BYTES:,} bytes)")
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is binary, not YAML text (byte {e.start}); pass a YAML file") \
            from None
    data = load_yaml(text, f"config file {path}")
    if data is None:
        raise ConfigError(f"config file {path} is empty; write at least one section (model, moe, data, train, "
                          "...), or pass a shipped config name (see `moecl configs`)")
    return data


def shipped_configs() -> dict[str, Path]:
    return shipped("config")


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    found, hint = find("config", str(name_or_path))
    if found is not None:
        return found
    raise ConfigError(f"no shipped config named '{name_or_path}'{hint} (run `moecl configs` to list them, "
                      "or pass a path to a YAML file)")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["moe.num_experts=4", "train.lr=[1e-3,5e-4]"]`` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid_keys():
            raise ConfigError(f"unknown key '{key}' in override '{item}'{_suggest(key)}")
        try:
            value = _parse_yaml(raw) if raw.strip() else ""
        except _YamlRefused as e:
            raise ConfigError(f"override '{item}' refused: {e}") from None
        except (yaml.YAMLError, RecursionError):  # not YAML: the text itself (validation says if it fits)
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaf_types(annotation: Any) -> set:
    """The scalar types a field can hold, through Optional / Union / list / tuple / Annotated."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return {annotation}
    found: set = set()
    for arg in typing.get_args(annotation):
        found |= _leaf_types(arg)
    return found


def _refuse_bools_for_numbers(data: dict, source: str) -> None:
    """pydantic reads ``true`` as 1 for a number (``train.lr=true`` would train at lr 1.0): refuse it by key."""
    for section, sfield in Config.model_fields.items():
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        for name, field in sfield.annotation.model_fields.items():
            leaves = _leaf_types(field.annotation)
            if bool in leaves or not leaves & {int, float}:
                continue
            value = values.get(name)
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, bool) for v in items):
                shown = json.dumps(value if not isinstance(value, tuple) else list(value), default=str)
                raise ConfigError(f"invalid config ({source}):\n  {section}.{name}: got {shown}, expected a number")


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a shipped config by name or a YAML file by path, apply overrides, validate."""
    data: dict = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, moe, data, ...)")
        for key in NOT_RUN_SETTINGS:
            data.pop(key, None)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    _refuse_bools_for_numbers(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_description(path: Path) -> str:
    data = read_config_file(path)
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def _plain_type(ann: Any) -> Any:
    """``ann`` without its Annotated bounds (``Union[Annotated[int, Ge(1)], ...]`` -> ``Union[int, ...]``)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return _plain_type(args[0])
    if origin is None or origin is Literal or not args:
        return ann
    plain = tuple(_plain_type(a) for a in args)
    if plain == args:
        return ann
    return (Union if origin is Union else ann.__origin__)[plain if len(plain) > 1 else plain[0]]


def reference_markdown() -> str:
    """The README's table of every config field: key, type, default, meaning."""
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for section_name, section_field in Config.model_fields.items():
        section = section_field.annotation
        for name, field in section.model_fields.items():
            ann = _plain_type(field.annotation)
            type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{section_name}.{name}` | {type_name.replace('|', 'or')} | `{default!r}` | "
                         f"{field.description or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
