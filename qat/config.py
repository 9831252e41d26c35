"""Typed recipe configuration: dataclass schemas + OmegaConf structured merge.

    cfg = load_config("configs/tiny/qat.yaml", ["optimizer.lr=1e-3", "qat.scheme=8da2w"])

The schema is the single source of truth for keys and types. A misspelled key or a value of the
wrong type fails with the key's full name, before any process group or weights are touched.
Each component receives only its own section (`apply_fsdp(model, mesh, cfg.fsdp)`), never the
whole config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qat.errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    path: str = MISSING  # local HF folder or hub id (resolved through the HF cache)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    init: str = "pretrained"  # "pretrained" loads weights; "random" is for benchmarks only
    attn_implementation: str = "sdpa"


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))


@dataclass
class QATConfig:
    enabled: bool = False
    scheme: str = "8da4w"  # a name from qat.schemes (qat-recipes schemes --list)
    group_size: Optional[int] = 32  # null = per output channel
    embedding: bool = False  # also fake-quantize the input embedding (weight-only)
    fake_quant_after_n_steps: int = 0  # train this many steps in bf16 before fake quantization
    backend: str = "auto"  # "ours" (lean STE backward), "torchao" (FakeQuantizedLinear); auto: ours for intx
    lora_merged: bool = False  # LoRA: fake-quantize W + s*B@A, exactly what the merged export computes


@dataclass
class DataSource:
    path: str = MISSING  # local .json/.jsonl/.parquet file or folder, or a hub dataset name
    kind: str = "text"  # "text" (packed plain text) or "chat" (a messages column)
    column: Optional[str] = None  # default: "text" for text, "messages" for chat
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    max_rows: Optional[int] = None  # use only the first N rows (before tokenization)
    max_samples: Optional[int] = None  # cap on packed sequences taken from this source
    revision: Optional[str] = None  # hub dataset revision (part of the cache key; pin it)
    data_files: list[str] = field(default_factory=list)  # hub: only these files/globs, e.g. a few C4 shards
    weight: Optional[float] = None  # sampling proportion; set on every source or on none


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    seq_len: int = 2048
    shuffle: bool = True
    # "documents": positions restart and attention stops at each document; "concat": plain
    # concatenation; "pad": one sample per row, padded (chat SFT)
    packing: str = "documents"
    cache_dir: Optional[str] = None  # tokenized cache; default $QAT_DATA_CACHE or ~/.cache/qat-recipes/data
    num_proc: Optional[int] = None  # tokenizer processes of a cache build; default: the usable CPUs, at most 32


@dataclass
class OptimizerConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine", "linear" or "constant"
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio


@dataclass
class TrainingConfig:
    steps: int = 1000
    batch_size: int = 1  # per rank, per micro-step
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0  # null disables clipping
    seed: int = 0
    dtype: str = "bf16"  # compute dtype: "bf16" or "fp32" (CPU tests); master weights are fp32
    stop_after_steps: Optional[int] = None  # checkpoint and exit early; the schedule is unchanged


@dataclass
class FSDPConfig:
    device: str = "auto"  # "auto" (cuda if available), "cuda" or "cpu"
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"  # "none" or "full"
    compile: bool = False  # torch.compile each decoder block
    # Ranks > 0 build the model on the meta device and receive rank 0's weights after sharding:
    # one full copy in host memory per job instead of one per rank (8 per node).
    init_from_rank0: bool = True


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <output_dir>/checkpoints
    every_n_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: Optional[str] = None  # null, "auto" (newest complete checkpoint) or a step-NNNNNN path


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "qat-recipes"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 1
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    output_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class EvalConfig:
    tasks: str = "hub"  # "hub", "local" or a comma list of lm-eval task names
    data_dir: Optional[str] = None  # local task files (tasks=local)
    limit: Optional[float] = None
    batch_size: int = 8
    num_fewshot: Optional[int] = None
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class CompareConfig:
    """recipes/compare.py: the bf16 vs PTQ vs QAT experiment in one command."""
    output_dir: str = MISSING
    train_config: str = MISSING  # the training YAML both arms start from
    train_overrides: list[str] = field(default_factory=list)  # applied to every arm
    nproc_per_node: int = 1
    scheme: str = "8da4w"  # QAT scheme of the QAT arms, and PTQ scheme of the bf16 arms
    group_size: Optional[int] = 32
    full: bool = True  # bf16 and QAT arms with full fine-tuning
    lora: bool = False  # bf16-LoRA and QAT+LoRA arms
    lora_merged: bool = False  # the QAT+LoRA arm fake-quantizes W + s*B@A (qat.lora_merged)
    skip_train: bool = False  # compare the checkpoints already in output_dir/<arm>/
    title: str = ""
    data_description: str = ""
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES = {
    "model.init": ("pretrained", "random"),
    "training.dtype": ("bf16", "fp32"),
    "scheduler.decay": ("cosine", "linear", "constant"),
    "fsdp.device": ("auto", "cuda", "cpu"),
    "fsdp.activation_checkpointing": ("none", "full"),
    "qat.backend": ("auto", "ours", "torchao"),
    "data.packing": ("documents", "concat", "pad"),
}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Checks that need more than a type: choices, ranges and cross-field rules."""
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise UserError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(choices)}")
    for i, src in enumerate(cfg.data.sources):
        if src.kind not in ("text", "chat"):
            raise UserError(f"data.sources[{i}].kind={src.kind!r} is not one of text, chat")
        if src.weight is not None and not src.weight > 0:
            raise UserError(f"data.sources[{i}].weight={src.weight} must be positive")
    weighted = [src.weight is not None for src in cfg.data.sources]
    if any(weighted) and not all(weighted):
        raise UserError(f"data.sources: weight is set on sources {[i for i, w in enumerate(weighted) if w]} "
                        f"only; set it on every source (proportions) or on none (concatenation)")
    if cfg.data.num_proc is not None and cfg.data.num_proc < 1:
        raise UserError(f"data.num_proc={cfg.data.num_proc} must be at least 1, or null for the usable CPUs")
    if not cfg.data.sources:
        raise UserError("data.sources is empty: give at least one dataset")
    positive = ["training.steps", "training.batch_size", "training.gradient_accumulation_steps",
                "data.seq_len", "checkpoint.keep_last", "lora.rank"]
    for key in positive:
        if _get(cfg, key) < 1:
            raise UserError(f"{key}={_get(cfg, key)} must be at least 1")
    if cfg.qat.group_size is not None and cfg.qat.group_size < 1:
        raise UserError(f"qat.group_size={cfg.qat.group_size} must be positive, or null for per-channel")
    if cfg.qat.lora_merged and not (cfg.lora.enabled and cfg.qat.enabled):
        raise UserError("qat.lora_merged=true needs lora.enabled=true and qat.enabled=true")
    if cfg.qat.lora_merged and cfg.lora.dropout:
        raise UserError("qat.lora_merged=true needs lora.dropout=0 (dropout only applies to the adapter path)")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise UserError("lora.target_modules is empty")
    if cfg.checkpoint.resume not in (None, "auto") and not Path(cfg.checkpoint.resume).name.startswith("step-"):
        raise UserError(f"checkpoint.resume={cfg.checkpoint.resume!r}: expected null, 'auto' or a step-NNNNNN folder")


def _merge(schema, path: Optional[str], overrides: list[str]):
    base = OmegaConf.structured(schema)
    try:
        layers = [base]
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(_describe(e, path)) from None


def _describe(e: OmegaConfBaseException, path: Optional[str]) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    where = f" (in {path} or the overrides)" if path else ""
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'{where}"
    if "missing mandatory value" in msg.lower():
        return f"config key '{key}' is required but not set{where}"
    return f"config key '{key}': {msg}{where}" if key else f"bad config{where}: {msg}"


def load_config(path: Optional[str], overrides: list[str] = (), schema=TrainConfig):
    """YAML file, then `key=value` overrides, merged onto the schema and validated."""
    cfg = _merge(schema, path, overrides)
    if schema is TrainConfig:
        validate(cfg)
    return cfg


def config_from_dict(d: dict, schema=TrainConfig):
    """Rebuild a typed config from its dict form (as stored in a checkpoint's meta.json)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), d))
    except OmegaConfBaseException as e:
        raise UserError(_describe(e, None)) from None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
