"""One typed config tree per run: frozen dataclasses loaded from YAML, with `key.sub=value` overrides from the CLI.

Every check of how settings interact lives in `validate` (one place), every DeepSpeed "auto" value is filled in
`deepspeed_config` (one place). Unknown keys fail naming the key; a value is never rewritten silently: a conflict
fails with the reason instead. Each field is documented once, here.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from data.template import FormatConfig
from inference.modeling import HeadConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns in the message."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str | None = None  # what from_pretrained takes: a local HF model dir, or a hub id (HF cache/download)
    architecture: str | None = None  # named preset for the memory plan ("gemma2-9b", "llama3-8b"); informational
    tiny: dict | None = None  # HF config kwargs incl. model_type: a randomly initialised model built from config
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bfloat16" or "float32"
    gradient_checkpointing: bool = True  # recompute activations in backward: ~30% slower, far less memory
    attn_implementation: str | None = None  # None: eager for Gemma2 / on CPU-unsafe cases, flash-attn 2 or sdpa else
    head: HeadConfig = field(default_factory=HeadConfig)  # classifier head (inference.modeling.HeadConfig)
    # multi-stage training: an earlier run's export dir (output_dir/final: merged weights, not a LoRA adapter) whose
    # backbone (architecture, weights) and tokenizer this run starts from; name_or_path and tiny stay unset
    init_from: str | None = None
    init_head: str = "keep"  # with init_from: "keep" the export's head (same shape required) or "reset" a fresh one


@dataclass(frozen=True)
class DataConfig:
    train_csv: str = ""  # competition-format train.csv
    valid_csv: str | None = None  # labelled validation file; None: hold out `valid_fold` of the training file
    valid_fold: int | None = 0  # fold (of num_folds, prompt-grouped) held out when valid_csv is None; None: no eval
    num_folds: int = 5
    fold_seed: int = 0
    tokenizer: str | None = None  # path, "train_bpe" (train one from train_csv), or None: model.name_or_path / init_from's
    bpe_vocab_size: int = 2048  # vocabulary of the train_bpe tokenizer
    format: FormatConfig = field(default_factory=FormatConfig)  # template and truncation (data.template)
    micro_batch_size: int = 1  # examples per rank per forward pass (padded batching); full swap doubles the rows
    eval_batch_size: int | None = None  # rows per evaluation forward pass; None: 2 x micro_batch_size
    packing: bool = False  # pack several examples into one row (data.packing) instead of padding
    max_tokens: int = 0  # tokens per packed row (packing only); at least format.max_length
    full_swap: bool = False  # train on every example and its A/B swap in the same step (labels A<->B swapped)
    cache_dir: str | None = None  # tokenized-dataset cache; None: $ARENA_CACHE/datasets
    soft_labels: str | None = None  # submission-format CSV (id + 3 probabilities, e.g. teachers' out-of-fold) joined by id
    soft_labels_missing: str = "error"  # training ids absent from soft_labels: "error", or "hard" (train on CE alone)


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 0.0  # weight of the soft term for rows with both targets (0: hard labels only, today's loss)
    temperature: float = 1.0  # T of softmax(logits / T) in the soft term, which is scaled by T^2 (training/losses.py)
    cosine: bool = False  # add 1 - cosine(softmax(logits / T), soft target) to the soft term (as 1st place LMSYS)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; None: epochs x steps per epoch (if set, the run stops there)
    gradient_accumulation_steps: int = 1
    lr: float = 1e-5  # peak learning rate of the backbone (and LoRA adapters)
    head_lr: float | None = None  # peak learning rate of the head; None: same as lr
    weight_decay: float = 0.0  # AdamW decoupled decay; never applied to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from 0; exclusive with warmup_ratio
    warmup_ratio: float = 0.0  # warmup as a fraction of the total optimizer steps
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    label_smoothing: float = 0.0
    distill: DistillConfig = field(default_factory=DistillConfig)  # soft targets: data.soft_labels, soft rows
    log_every: int = 1  # optimizer steps between metrics.jsonl rows
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end)
    save_every: int = 0  # optimizer steps between checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    export: str = "best"  # what final/ holds: "best" (lowest val log loss) or "last"
    temperature_scaling: bool = True  # fit a temperature on the validation logits, stored in arena.json
    eval_at_start: bool = False  # evaluate before the first update: metrics row of step 0, val_predictions_start.npz
    stop_after_steps: int | None = None  # debug: end the process after this step without exporting (as if killed)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    qlora: bool = False  # load the frozen base in 4-bit NF4 (bitsandbytes); ZeRO stage <= 2
    merge_on_export: bool = True  # final/ holds merged weights; False: final/adapter + base_model in arena.json


@dataclass(frozen=True)
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero3.json"  # ZeRO JSON; relative paths: from the cwd, else the project root
    zero_stage: int | None = None  # None: taken from the JSON; set: must agree with it
    offload_optimizer: bool | None = None  # None: taken from the JSON; set: must agree with it
    offload_params: bool | None = None  # None: taken from the JSON; set: must agree with it
    param_persistence_threshold: int | None = None  # fills "auto" stage3_param_persistence_threshold (None: 10*hidden)


@dataclass(frozen=True)
class HardwareConfig:
    gpu_memory_gb: float = 80.0  # per-GPU memory the plan checks against
    check_memory: bool = True  # on GPU, refuse to start when the memory plan (training/plan.py) does not fit


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False  # wandb is imported only when enabled (WANDB_MODE=offline works)
    project: str = "arena-pref"
    entity: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = ""
    resume: str = "auto"  # "auto": continue from output_dir's latest checkpoint if any; "never"; or a checkpoint dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# Keys that may differ between a checkpoint's config and the resuming run's (they do not change the loss curve).
RESUMABLE_CHANGES = ("resume", "train.stop_after_steps", "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.eval_at_start", "wandb.", "hardware.")


# ---------------------------------------------------------------------------------------------------- parsing


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` as type `tp`, or ConfigError. Only parses (e.g. "1e-5" -> 1e-5, which YAML reads as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for k in d:
        if k not in known:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(known)})")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a nested dataclass's own __post_init__ check
        raise ConfigError(f"{prefix[:-1] or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able dict of a config (tuples become lists)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key part")
    node = raw
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem if hasattr(e, 'problem') else e})") from None


def load_config(path: str | Path | None, overrides: list[str] = (), check_files: bool = True) -> RunConfig:
    """Parse a YAML preset plus overrides into a validated RunConfig (DeepSpeed JSON fields resolved)."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item)
    cfg = _from_dict(RunConfig, raw)
    cfg = resolve_deepspeed_fields(cfg)
    validate(cfg, check_files=check_files)
    return cfg


def config_diff(a: RunConfig | dict, b: RunConfig | dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = (to_dict(a) if is_dataclass(a) else a), (to_dict(b) if is_dataclass(b) else b)
    out = []
    for k in sorted(set(da) | set(db)):
        va, vb = da.get(k), db.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "tiny":
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


# ---------------------------------------------------------------------------------------------------- DeepSpeed JSON


def resolve_path(p: str) -> Path:
    """A relative path from the cwd if it exists there, else from the project root (for installed entry points)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = PROJECT_ROOT / path
    return alt if alt.exists() else path


def read_deepspeed_json(cfg: RunConfig) -> dict:
    path = resolve_path(cfg.deepspeed.config)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: {cfg.deepspeed.config} not found (looked in the cwd and {PROJECT_ROOT})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({e})") from None


def _offload_of(zero: dict, key: str) -> bool | str:
    dev = (zero.get(key) or {}).get("device", "none")
    return "auto" if dev == "auto" else dev not in (None, "none")


def resolve_deepspeed_fields(cfg: RunConfig) -> RunConfig:
    """Fill deepspeed.zero_stage / offload_* left as None from the JSON; fail when a set value contradicts it."""
    zero = read_deepspeed_json(cfg).get("zero_optimization", {})
    ds = cfg.deepspeed
    updates = {}
    for name, from_json in (("zero_stage", zero.get("stage", 0)),
                            ("offload_optimizer", _offload_of(zero, "offload_optimizer")),
                            ("offload_params", _offload_of(zero, "offload_param"))):
        mine = getattr(ds, name)
        if from_json == "auto":
            if mine is None:
                raise ConfigError(f"deepspeed.{name}: {ds.config} leaves it 'auto', so set it in the run config")
        elif mine is None:
            updates[name] = from_json
        elif mine != from_json:
            raise ConfigError(f"deepspeed.{name}={mine} contradicts {ds.config} ({from_json}); "
                              f"pick the JSON that matches (configs/deepspeed/zero3_offload.json offloads, zero2.json is stage 2)")
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(ds, **updates)) if updates else cfg


def deepspeed_config(cfg: RunConfig, world_size: int, hidden_size: int, bf16: bool) -> dict:
    """The DeepSpeed config dict: the JSON file with every "auto" filled from the run config (the only place that
    does it). A concrete JSON value that disagrees with the run config fails instead of being overwritten."""
    ds = read_deepspeed_json(cfg)
    t, d = cfg.train, cfg.data
    micro = 1 if d.packing else d.micro_batch_size
    zero_stage = cfg.deepspeed.zero_stage
    persistence = cfg.deepspeed.param_persistence_threshold
    # dotted key -> (value, required): a required key is added when missing and must agree with a concrete JSON
    # value; the others (bucket sizes, offload devices) are only filled where the JSON says "auto".
    fills: dict[str, tuple[Any, bool]] = {
        "train_micro_batch_size_per_gpu": (micro, True),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, True),
        "train_batch_size": (micro * t.gradient_accumulation_steps * world_size, True),
        "gradient_clipping": (t.max_grad_norm, True),
        "bf16.enabled": (bf16, True),
        "fp16.enabled": (False, True),  # fp16 needs loss scaling; bf16 or fp32 only
        "zero_optimization.stage": (zero_stage, True),
        "zero_optimization.reduce_bucket_size": (hidden_size * hidden_size, False),
        "zero_optimization.stage3_prefetch_bucket_size": (int(0.9 * hidden_size * hidden_size), False),
        # small parameters below the threshold are never partitioned; tiny test models set 0 so that they are
        "zero_optimization.stage3_param_persistence_threshold": (
            10 * hidden_size if persistence is None else persistence, persistence is not None and zero_stage == 3),
        "zero_optimization.offload_optimizer.device": ("cpu" if cfg.deepspeed.offload_optimizer else "none", False),
        "zero_optimization.offload_param.device": ("cpu" if cfg.deepspeed.offload_params else "none", False),
    }
    for key, (value, required) in fills.items():
        *parents, leaf = key.split(".")
        node = ds
        for p in parents:
            node = node.get(p) if isinstance(node.get(p), dict) else (node.setdefault(p, {}) if required else None)
            if node is None:
                break
        if node is None:
            continue
        if node.get(leaf) == "auto" or (required and leaf not in node):
            node[leaf] = value
        elif required and node[leaf] != value:
            raise ConfigError(f"{cfg.deepspeed.config}: {key}={node[leaf]!r} but the run config implies {value!r}; "
                              f"set it to \"auto\" in the JSON or change the run config")
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ConfigError(f"{cfg.deepspeed.config}: no run-config value fills 'auto' for {', '.join(left)}")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{cfg.deepspeed.config}: remove 'optimizer'/'scheduler'; the run config's train.* defines them")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


# ---------------------------------------------------------------------------------------------------- validation


def pretrained_json(name_or_path: str | None, filename: str) -> dict | None:
    """A JSON file of a pretrained model (config.json, tokenizer_config.json) from its local directory or, for a hub
    id, the HF cache; None when it is not on this machine."""
    from data.tokenizer import cached_pretrained_file

    p = cached_pretrained_file(name_or_path, filename)
    return json.loads(p.read_text()) if p is not None else None


def pretrained_source(cfg: RunConfig) -> str | None:
    """Where the backbone's config, weights and (by default) tokenizer come from: model.name_or_path, or the export
    of model.init_from (an HF model directory too); None for a model built from model.tiny."""
    return cfg.model.name_or_path or cfg.model.init_from


def model_type_of(cfg: RunConfig) -> str | None:
    """The HF model_type, from model.tiny or the pretrained config.json (None if unknown without loading)."""
    if cfg.model.tiny:
        return cfg.model.tiny.get("model_type")
    return (pretrained_json(pretrained_source(cfg), "config.json") or {}).get("model_type")


def position_limits(cfg: RunConfig) -> dict[str, int]:
    """The longest sequence the model and its tokenizer take, by source (what is known without loading)."""
    limits = {}
    model_cfg = cfg.model.tiny or pretrained_json(pretrained_source(cfg), "config.json") or {}
    text_cfg = model_cfg.get("text_config") or model_cfg
    if isinstance(text_cfg.get("max_position_embeddings"), int):
        limits["max_position_embeddings"] = text_cfg["max_position_embeddings"]
    tok_src = cfg.data.tokenizer if cfg.data.tokenizer not in (None, "train_bpe") else pretrained_source(cfg)
    n = (pretrained_json(tok_src, "tokenizer_config.json") or {}).get("model_max_length")
    if isinstance(n, (int, float)) and 0 < n < 1e8:  # HF writes a huge sentinel when there is no limit
        limits["tokenizer model_max_length"] = int(n)
    return limits


def validate(cfg: RunConfig, check_files: bool = True) -> None:
    """Every cross-field check, in one place. Raises ConfigError naming the key and the reason."""
    m, d, t, lo, ds = cfg.model, cfg.data, cfg.train, cfg.lora, cfg.deepspeed
    err = lambda key, why: ConfigError(f"{key}: {why}")  # noqa: E731
    if not cfg.output_dir:
        raise err("output_dir", "required (where checkpoints, metrics and the export go)")
    if not d.train_csv:
        raise err("data.train_csv", "required")
    if check_files:
        for key, p in (("data.train_csv", d.train_csv), ("data.valid_csv", d.valid_csv), ("data.soft_labels", d.soft_labels)):
            if p and not Path(p).exists():
                raise err(key, f"file not found: {p}")
    if m.init_from is not None:
        check_init_from(cfg, check_files)
    elif m.init_head != "keep":
        raise err("model.init_head", "only used with model.init_from")
    elif bool(m.name_or_path) == bool(m.tiny):
        raise err("model", "set exactly one of model.name_or_path (pretrained) and model.tiny (built from config)")
    if m.tiny is not None and "model_type" not in m.tiny:
        raise err("model.tiny", "needs model_type (e.g. llama, gemma2)")
    if m.tiny is not None and "vocab_size" in m.tiny:
        raise err("model.tiny.vocab_size", "is taken from the tokenizer; remove it")
    if m.tiny is not None and d.tokenizer is None:
        raise err("data.tokenizer", "a tiny model has no tokenizer of its own: give a path or train_bpe")
    for source, limit in position_limits(cfg).items():
        if d.format.max_length > limit:
            raise err("data.format.max_length", f"{d.format.max_length} is beyond the model's position limit: "
                      f"{source} = {limit}; set data.format.max_length <= {limit}")
    if m.dtype not in ("auto", "bfloat16", "float32"):
        raise err("model.dtype", f"must be auto, bfloat16 or float32, got {m.dtype!r}")
    mtype = model_type_of(cfg)
    if mtype == "gemma2" and m.attn_implementation not in (None, "eager", "flash_attention_2", "arena_varlen"):
        raise err("model.attn_implementation", f"{m.attn_implementation} cannot apply Gemma2's attention soft-capping; "
                                               "use eager (or flash_attention_2 on GPU)")
    if m.attn_implementation == "flex_attention":
        raise err("model.attn_implementation", "flex_attention has no CPU backward and mis-handles packed rows")
    for key in ("epochs", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
        if getattr(t, key) < 1:
            raise err(f"train.{key}", "must be >= 1")
    for key in ("eval_every", "save_every", "warmup_steps"):
        if getattr(t, key) < 0:
            raise err(f"train.{key}", "must be >= 0")
    if t.max_steps is not None and t.max_steps < 1:
        raise err("train.max_steps", "must be >= 1 (or null for epochs x steps per epoch)")
    if t.stop_after_steps is not None and t.stop_after_steps < 1:
        raise err("train.stop_after_steps", "must be >= 1")
    if t.lr <= 0 or (t.head_lr is not None and t.head_lr <= 0):
        raise err("train.lr", "learning rates must be > 0")
    if t.warmup_steps and t.warmup_ratio:
        raise err("train.warmup_steps", "set warmup_steps or warmup_ratio, not both")
    if not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise err("train.warmup_ratio", "warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
    if t.max_grad_norm < 0 or not 0 <= t.label_smoothing < 1:
        raise err("train.max_grad_norm", "max_grad_norm must be >= 0 and label_smoothing in [0, 1)")
    if not 0.0 <= t.distill.alpha <= 1.0:
        raise err("train.distill.alpha", f"must be in [0, 1], got {t.distill.alpha}")
    if not t.distill.temperature > 0:
        raise err("train.distill.temperature", f"must be > 0, got {t.distill.temperature}")
    if d.soft_labels_missing not in ("error", "hard"):
        raise err("data.soft_labels_missing", f"must be error or hard, got {d.soft_labels_missing!r}")
    if t.export not in ("best", "last"):
        raise err("train.export", f"must be best or last, got {t.export!r}")
    has_valid = d.valid_csv is not None or d.valid_fold is not None
    if t.eval_at_start and not has_valid:
        raise err("train.eval_at_start", "evaluation needs data.valid_csv or data.valid_fold")
    if t.export == "best" and not has_valid:
        raise err("train.export", "best needs a validation set (data.valid_csv or data.valid_fold); use last")
    if t.eval_every and not has_valid:
        raise err("train.eval_every", "evaluation needs data.valid_csv or data.valid_fold")
    if d.valid_csv is None and d.valid_fold is not None and not 0 <= d.valid_fold < d.num_folds:
        raise err("data.valid_fold", f"must be in [0, {d.num_folds})")
    if d.micro_batch_size < 1 or (d.eval_batch_size is not None and d.eval_batch_size < 1):
        raise err("data.micro_batch_size", "micro_batch_size and eval_batch_size must be >= 1")
    if d.packing and d.max_tokens < d.format.max_length * (2 if d.full_swap else 1):
        raise err("data.max_tokens", f"packing needs max_tokens >= format.max_length"
                                     f"{' x 2 (full swap packs both orders together)' if d.full_swap else ''}")
    if not d.packing and d.max_tokens:
        raise err("data.max_tokens", "only used with data.packing=true")
    if d.packing and m.head.pooling == "first":
        raise err("data.packing", "packed rows pool each example's last token; first-token pooling needs padding")
    if lo.qlora and not lo.enabled:
        raise err("lora.qlora", "QLoRA needs lora.enabled=true")
    if lo.qlora and ds.zero_stage == 3:
        raise err("lora.qlora", "4-bit weights cannot be partitioned by ZeRO-3 here; use deepspeed.config="
                                "configs/deepspeed/zero2.json")
    if lo.enabled and (lo.r < 1 or not lo.target_modules):
        raise err("lora.r", "LoRA needs r >= 1 and at least one target module")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise err("deepspeed.zero_stage", f"must be 0..3, got {ds.zero_stage}")
    if ds.offload_params and ds.zero_stage != 3:
        raise err("deepspeed.offload_params", "parameter offload needs ZeRO stage 3")
    if cfg.resume not in ("auto", "never") and check_files and not Path(cfg.resume).exists():
        raise err("resume", f"must be auto, never or an existing checkpoint directory, got {cfg.resume!r}")
    if cfg.hardware.gpu_memory_gb <= 0:
        raise err("hardware.gpu_memory_gb", "must be > 0")


def check_init_from(cfg: RunConfig, check_files: bool = True) -> None:
    """model.init_from excludes the other backbone sources and a freshly trained tokenizer (the export's embeddings
    belong to its own); with check_files, the export itself is checked (training.init_from.check_source)."""
    m = cfg.model
    if m.init_head not in ("keep", "reset"):
        raise ConfigError(f"model.init_head: must be keep or reset, got {m.init_head!r}")
    for key, value, hint in (("model.tiny", m.tiny, "model.tiny=null"),
                             ("model.name_or_path", m.name_or_path, "model.name_or_path=null")):
        if value:
            raise ConfigError(f"{key}: conflicts with model.init_from={m.init_from} (the export defines the backbone: "
                              f"its architecture and weights); set {hint}")
    if cfg.data.tokenizer == "train_bpe":
        raise ConfigError("data.tokenizer: train_bpe conflicts with model.init_from (the export's embeddings belong to "
                          "its own tokenizer); set data.tokenizer=null to use the export's tokenizer")
    if check_files:
        from .init_from import check_source

        check_source(cfg)
