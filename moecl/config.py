"""Typed configuration: YAML files validated by pydantic models, with ``section.field=value`` overrides.

Every error names the offending key (and the closest valid key), or the field, the value given and the
type expected. Shipped configs live in ``moecl/configs`` and are addressed by name or by path.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import MoeclError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(MoeclError, ValueError):
    """A configuration problem, with a message meant for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """Which open_clip backbone to adapt, and where its weights come from."""
    name: str = Field("moecl-tiny", description="open_clip model name, e.g. ViT-B-16-quickgelu")
    pretrained: Optional[str] = Field(
        None, description="open_clip pretrained tag, a local .pt/.bin/.safetensors file, or hf-hub:ORG/NAME")
    cache_dir: Optional[str] = Field(None, description="where open_clip looks for tag/hf-hub weights (offline)")
    init_checkpoint: Optional[str] = Field(
        None, description="a full-model safetensors file to start from (e.g. the demo's pretrained tiny CLIP)")
    grad_checkpointing: bool = Field(False, description="recompute backbone activations in backward")


class MoEConfig(_Section):
    """The MoE-adapter beside the MLP of every residual block."""
    num_experts: int = Field(22, ge=1, description="experts per block (one pool shared by all tasks)")
    top_k: int = Field(2, ge=1, description="experts chosen per sample")
    width: int = Field(64, ge=1, description="adapter bottleneck width r")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside each expert")
    scale: float = Field(0.1, description="expert output scale")
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

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}; "
                             "choose top_k <= num_experts")
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
    train_crop_scale: tuple[float, float] = Field((0.9, 1.0), description="RandomResizedCrop scale")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0,
                                    description="corrupt samples tolerated before a stream stops")


class TrainConfig(_Section):
    """The continual task loop."""
    method: Literal["moe-adapters", "dense-adapter", "full-ft", "zero-shot"] = Field(
        "moe-adapters", description="what is trained: MoE-adapters or a baseline")
    iterations: Union[int, list[int]] = Field(1000, description="steps per task (one value or one per task)")
    epochs: Optional[float] = Field(None, gt=0, description="if set, steps = epochs x train images / batch")
    lr: Union[float, list[float]] = Field(1e-3, description="peak learning rate (one value or one per task)")
    warmup: int = Field(100, ge=0, description="linear warmup steps, then cosine, within each task")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    label_smoothing: float = Field(0.2, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    grad_clip: float = Field(0.0, ge=0.0, description="gradient norm clip (0 = off)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    ds_config: str = Field("auto", description="ds_configs/ name or JSON path; auto = bf16 on GPU, fp32 on CPU")
    zero_stage: Optional[int] = Field(None, ge=0, le=2, description="override the DeepSpeed ZeRO stage")
    checkpoint_every: int = Field(0, ge=0, description="mid-task checkpoint interval in steps (0 = task ends only)")
    keep_checkpoints: int = Field(2, ge=1, description="mid-task checkpoints kept")
    seed: int = Field(0, description="seed of everything")
    deterministic: bool = Field(False, description="deterministic algorithms (CPU exact resume)")
    nan_policy: Literal["stop", "skip"] = Field("stop", description="on a non-finite loss: stop or skip the step")


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


class EvalConfig(_Section):
    """Evaluation after every task."""
    batch_size: int = Field(256, ge=1, description="evaluation batch per rank")
    modes: list[Literal["oracle", "agnostic"]] = Field(["oracle", "agnostic"], description="routing modes")
    templates: Literal["ensemble", "train"] = Field("ensemble", description="prompt templates of the heads")
    max_samples: Optional[int] = Field(None, ge=1, description="cap test samples per set (quick looks)")
    cil: bool = Field(False, description="class-incremental: label space = all classes seen so far")
    reference_ddas: bool = Field(False, description="also evaluate the reference DDAS (per batch, fixed threshold)")
    workers: int = Field(0, ge=0, description="loader workers per rank for evaluation")


class RuntimeConfig(_Section):
    """Where and how it runs."""
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = GPU when present")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    log_every: int = Field(10, ge=1, description="TensorBoard scalar interval in steps")
    progress: bool = Field(True, description="progress bars on rank 0")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads per process")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ddas: DDASConfig = Field(default_factory=DDASConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def per_task(self, field: str, task: int, num_tasks: int) -> Any:
        """``train.lr`` / ``train.iterations`` for task ``task`` (a list gives one value per task)."""
        value = getattr(self.train, field)
        if isinstance(value, list):
            if len(value) < num_tasks:
                raise ConfigError(f"train.{field} lists {len(value)} values but the sequence has {num_tasks} "
                                  f"tasks; give one value per task or a single value")
            return value[task]
        return value


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


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        # pydantic adds union-member tags ('int', 'list[float]', ...) to the location: keep field names only
        loc = ".".join(p for p in e["loc"] if isinstance(p, str) and p not in ("int", "float")
                       and not p.startswith(("list[", "function-")))
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"unknown key '{loc}'{_suggest(loc)}")
        elif kind == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            expected = _TYPE_WORDS.get(kind)
            if kind == "literal_error":
                expected = "one of " + e["ctx"]["expected"]
            what = f"expected {expected}" if expected else e["msg"]
            lines.append(f"{loc}: got {e.get('input')!r}, {what}")
    # Union fields report one error per member type; keep each message once.
    uniq = list(dict.fromkeys(lines))
    return f"invalid config ({source}):\n  " + "\n  ".join(uniq)


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    close = difflib.get_close_matches(str(name_or_path), list(shipped), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
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
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a shipped config by name or a YAML file by path, apply overrides, validate."""
    data: dict = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, moe, data, ...)")
        data.pop("description", None)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_description(path: Path) -> str:
    data = yaml.safe_load(path.read_text()) or {}
    return str(data.get("description", ""))


def reference_markdown() -> str:
    """The README's table of every config field: key, type, default, meaning."""
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for section_name, section_field in Config.model_fields.items():
        section = section_field.annotation
        for name, field in section.model_fields.items():
            ann = field.annotation
            type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{section_name}.{name}` | {type_name.replace('|', 'or')} | `{default!r}` | "
                         f"{field.description or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
