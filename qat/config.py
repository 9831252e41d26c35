"""Typed recipe configuration: dataclass schemas + OmegaConf structured merge.

    cfg = load_config("configs/tiny/qat.yaml", ["optimizer.lr=1e-3", "qat.scheme=8da2w"])

The schema is the single source of truth for keys and types. A misspelled key or a value of the
wrong type fails with the key's full name, before any process group or weights are touched.
Each component receives only its own section (`apply_fsdp(model, mesh, cfg.fsdp)`), never the
whole config.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qat.validation import check_fields, rule
from qat.errors import UserError, is_rank0

@dataclass
class ModelConfig:
    path: str = MISSING  # local HF folder or hub id (resolved through the HF cache)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    init: str = rule("pretrained", choices=("pretrained", "random"))  # "random" is for benchmarks only
    # null: transformers picks (sdpa where the architecture supports it; eager for Gemma 2)
    attn_implementation: Optional[str] = None


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = rule(16, ge=1)
    alpha: float = rule(32.0, gt=0, why="the adapter output is scaled by alpha / rank; 0 trains adapters that do nothing")
    dropout: float = rule(0.0, ge=0, lt=1)
    # null: every nn.Linear inside the decoder blocks, resolved per model and logged
    # (q_proj ... down_proj on Llama, qkv_proj and gate_up_proj on Phi-3, ...)
    target_modules: Optional[list[str]] = None


@dataclass
class FakeQuantConfig:
    """The `qat` section (named apart from torchao's QATConfig, which convert also uses)."""
    enabled: bool = False
    scheme: str = "8da4w"  # a name from qat.schemes (`qat schemes` lists them)
    group_size: Optional[int] = rule(32, ge=1, why="null for per output channel")
    embedding: bool = False  # also fake-quantize the input embedding (intx weight-only, untied models)
    embedding_bits: Optional[int] = rule(None, ge=2, le=8, why="null: the scheme's weight bits (intx), else 8")
    embedding_group_size: Optional[int] = rule(32, ge=1, why="along the embedding width; null for per row")
    fake_quant_after_n_steps: int = rule(0, ge=0)  # train this many steps in bf16 before fake quantization
    # "qatlinear": our QATLinear (torchao numerics, a backward that recomputes instead of saving);
    # "torchao": torchao's FakeQuantizedLinear; auto: qatlinear
    backend: str = rule("auto", choices=("auto", "qatlinear", "torchao"))
    lora_merged: bool = False  # LoRA: fake-quantize W + s*B@A, exactly what the merged export computes
    # LoRA (default mode): fake-quantize each frozen base weight once, when fake quantization
    # starts, instead of in every forward and backward; the same numbers, bit for bit. Skipped
    # where it cannot hold: merged mode, learned scales, distill.teacher=base, nvfp4.
    quantize_frozen_once: bool = True
    # intx schemes: the weight scales become parameters, initialised by the dynamic rule when fake
    # quantization starts and trained with the LSQ estimator (qat/learned_scales.py)
    learn_scales: bool = False
    scale_lr_multiplier: float = rule(1.0, gt=0, why="the scales' lr is optimizer.lr times this")
    # Weight tensors of the decoder blocks that are neither nn.Linear nor MoE experts (GPT-2's
    # Conv1D) get no fake quantization; training refuses unless this is true. MoE routers stay
    # high precision by rule (qat/moe.py) and never trigger the refusal.
    allow_unquantized: bool = False


@dataclass
class DistillConfig:
    """Quantization-aware distillation (qat/distill.py): a KL loss from a high-precision teacher."""
    enabled: bool = False
    # "base": the starting model (in a LoRA run, the student itself with adapters and fake
    # quantization off: no second copy); or a path / hub id of an HF model with the same vocabulary
    teacher: str = "base"
    temperature: float = rule(1.0, gt=0)
    # loss = weight * KL + (1 - weight) * cross-entropy; 1.0 = KL only
    weight: float = rule(1.0, ge=0, le=1, why="the KL share of the loss")
    chunk_size: int = rule(512, ge=1)  # positions whose teacher logits exist at once


@dataclass
class DataSource:
    path: str = MISSING  # local .json/.jsonl/.parquet file or folder, or a hub dataset name
    kind: str = rule("text", choices=("text", "chat"))  # packed plain text, or a conversations column
    # default: "text" for text; for chat "messages", or "conversations" (ShareGPT) when there is no "messages"
    column: Optional[str] = None
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    max_rows: Optional[int] = rule(None, ge=1)  # use only the first N rows (before tokenization)
    max_samples: Optional[int] = rule(None, ge=1)  # cap on packed sequences taken from this source
    revision: Optional[str] = None  # hub dataset revision (part of the cache key; pin it)
    data_files: list[str] = field(default_factory=list)  # hub: only these files/globs, e.g. a few C4 shards
    weight: Optional[float] = rule(None, gt=0, why="a sampling proportion; set it on every source or on none")
    streaming: bool = False  # read as a stream, tokenized and packed on the fly (qat/data/stream.py)


@dataclass
class ChatConfig:
    """How chat rows are read, for every chat source (qat/data/chat.py)."""
    # other role names onto the roles of the tokenizer's chat template, e.g. ShareGPT's
    # {human: user, gpt: assistant}; a role the template does not take is refused
    roles: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    chat: ChatConfig = field(default_factory=ChatConfig)
    seq_len: int = rule(2048, ge=1)
    shuffle: bool = True
    # streaming sources with shuffle: the documents held by datasets' shuffle buffer, per source
    shuffle_buffer: int = rule(10_000, ge=1, why="documents held in memory to shuffle each stream")
    # "documents": positions restart and attention stops at each document; "concat": plain
    # concatenation; "pad": one sample per row, padded (chat SFT)
    packing: str = rule("documents", choices=("documents", "concat", "pad"))
    cache_dir: Optional[str] = None  # tokenized cache; default $QAT_DATA_CACHE or ~/.cache/qat-recipes/data
    # tokenizer processes of a cache build; null: the usable CPUs, at most 32
    num_proc: Optional[int] = rule(None, ge=1)


@dataclass
class OptimizerConfig:
    lr: float = rule(2e-5, gt=0)
    weight_decay: float = rule(0.0, ge=0)
    betas: list[float] = rule(factory=lambda: [0.9, 0.95], ge=0, lt=1)
    eps: float = rule(1e-8, gt=0)


@dataclass
class SchedulerConfig:
    warmup_steps: int = rule(0, ge=0)
    decay: str = rule("cosine", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = rule(0.0, ge=0, le=1)  # final lr = lr * min_lr_ratio


@dataclass
class TrainingConfig:
    steps: int = rule(1000, ge=1)
    batch_size: int = rule(1, ge=1)  # per rank, per micro-step
    gradient_accumulation_steps: int = rule(1, ge=1)
    max_grad_norm: Optional[float] = rule(1.0, gt=0, why="null disables clipping")
    seed: int = rule(0, ge=0)
    # compute dtype: "bf16" or "fp32" (CPU tests)
    dtype: str = rule("bf16", choices=("bf16", "fp32"))
    # the stored weights and AdamW state: fp32 (the default) keeps small updates that bf16 rounds
    # away; bf16 halves weight and optimizer memory, as a plain bf16 loop does (docs/training.md)
    master_dtype: str = rule("fp32", choices=("fp32", "bf16"))
    stop_after_steps: Optional[int] = rule(None, ge=1)  # checkpoint and exit early; the schedule is unchanged


@dataclass
class FSDPConfig:
    device: str = rule("auto", choices=("auto", "cuda", "cpu"))  # auto: cuda if available
    reshard_after_forward: bool = True
    activation_checkpointing: str = rule("none", choices=("none", "full"))
    compile: bool = False  # torch.compile each decoder block
    # Ranks > 0 build the model on the meta device and receive rank 0's weights after sharding:
    # one full copy in host memory per job instead of one per rank (8 per node).
    init_from_rank0: bool = True


@dataclass
class DistributedConfig:
    """How long a rank waits in a collective for the others before the job stops (qat/distributed.py).

    A peer whose process dies is noticed at once on gloo (its sockets close). A peer that hangs,
    a node that vanishes without closing its sockets, and a lost peer on NCCL are noticed only
    when a collective times out, and all the other ranks wait that long."""
    # steady training steps: the ranks arrive within a step's skew (a data stall, a slow disk)
    timeout_s: int = rule(300, ge=1, why="seconds a collective waits for the other ranks between steady steps")
    # set-up (rank 0 loading the weights the others receive, a data cache built on one node,
    # a cold torch.compile in the first steps), a step where fake quantization switches on (a
    # recompile), and every checkpoint save
    setup_timeout_s: int = rule(3600, ge=1, why="seconds a collective waits during set-up and saves")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <output_dir>/checkpoints
    every_n_steps: int = rule(0, ge=0)  # 0: only at the end
    keep_last: int = rule(2, ge=1)
    resume: Optional[str] = None  # null, "auto" (newest complete checkpoint) or a step-NNNNNN path
    # false: no checkpoint at the last step (benchmarks, throwaway runs); a stop request still saves
    save_final: bool = True


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
    log_every_n_steps: int = rule(1, ge=1)
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    output_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    qat: FakeQuantConfig = field(default_factory=FakeQuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class EvalConfig:
    tasks: str = "hub"  # "hub", "local" or a comma list of lm-eval task names
    data_dir: Optional[str] = None  # local task files (tasks=local)
    limit: Optional[float] = rule(None, gt=0, why="examples per task, or a fraction below 1")
    batch_size: int = rule(8, ge=1)
    num_fewshot: Optional[int] = rule(None, ge=0)
    device: str = rule("auto", choices=("auto", "cuda", "cpu"))
    dtype: str = rule("auto", choices=("auto", "bfloat16", "float16", "float32"))


@dataclass
class CompareConfig:
    """recipes/compare.py: the bf16 vs PTQ vs QAT experiment in one command."""
    output_dir: str = MISSING
    train_config: str = MISSING  # the training YAML both arms start from
    train_overrides: list[str] = field(default_factory=list)  # applied to every arm
    # applied after train_overrides to the quantization-aware arms only: with qat_from=bf16 the
    # recovery stage's own length, lr or LoRA rank (the report's header names them)
    qat_overrides: list[str] = field(default_factory=list)
    nproc_per_node: int = rule(1, ge=1)
    scheme: str = "8da4w"  # QAT scheme of the QAT arms, and PTQ scheme of the bf16 arms
    group_size: Optional[int] = rule(32, ge=1, why="null for per output channel")
    full: bool = True  # bf16 and QAT arms with full fine-tuning
    lora: bool = False  # bf16-LoRA and QAT+LoRA arms
    lora_merged: bool = False  # the QAT+LoRA arm fake-quantizes W + s*B@A (qat.lora_merged)
    # Also a QAD arm: QAT trained on the KL from the fine-tuned bf16 arm's export (distill.teacher)
    qad: bool = False  # an arm distilling the fine-tuned bf16 arm into the QAT model (QAD)
    learn_scales: bool = False  # an arm with learned scales (qat_ls), and qad_ls when qad is on
    # Where the quantization-aware arms start. "base": train_config's model, like the bf16 arm
    # (one fine-tuning, with fake quantization from the start). "bf16": the fine-tuned bf16 arm
    # (fine-tune, then quantization-aware training from it: ModelOpt's QAD recipe), whose QAD
    # teacher is then the model it starts from (distill.teacher=base: no second copy with LoRA).
    qat_from: str = rule("base", choices=("base", "bf16"))
    skip_train: bool = False  # compare the checkpoints already in output_dir/<arm>/
    # GGUF schemes (q4_0, q8_0): also export gguf/ with the rest in this dtype, and report llama.cpp's
    # own bits per byte on gguf_texts (a JSONL file of {"text": ...} rows) for bf16, PTQ and each arm
    gguf: Optional[str] = rule(None, choices=(None, "f16", "f32"))
    gguf_texts: str = ""
    gguf_ctx: int = rule(512, ge=2)  # llama.cpp's context: longer texts are scored in windows of this many tokens
    # Held-out text (JSONL "text" rows or plain lines): also export every arm's quantized model as an
    # ExecuTorch .pte (XNNPACK; scheme 8da4w) and report bits/byte from ExecuTorch's own logits.
    pte_text: Optional[str] = None
    title: str = ""
    data_description: str = ""
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def validate(cfg: TrainConfig) -> None:
    """Cross-field rules; each field's own range or choices is declared on the field (rule(...))."""
    weighted = [src.weight is not None for src in cfg.data.sources]
    if any(weighted) and not all(weighted):
        raise UserError(f"data.sources: weight is set on sources {[i for i, w in enumerate(weighted) if w]} "
                        f"only; set it on every source (proportions) or on none (concatenation)")
    if not cfg.data.sources:
        raise UserError("data.sources is empty: give at least one dataset")
    if cfg.qat.enabled:
        from qat.schemes import get_scheme

        get_scheme(cfg.qat.scheme)
    if cfg.qat.lora_merged and not (cfg.lora.enabled and cfg.qat.enabled):
        raise UserError("qat.lora_merged=true needs lora.enabled=true and qat.enabled=true")
    if cfg.qat.learn_scales and not cfg.qat.enabled:
        raise UserError("qat.learn_scales=true needs qat.enabled=true")
    if cfg.qat.learn_scales:
        from qat.learned_scales import check_learnable
        from qat.schemes import get_scheme

        check_learnable(get_scheme(cfg.qat.scheme), True)
    if cfg.training.master_dtype == "bf16" and cfg.training.dtype != "bf16":
        raise UserError("training.master_dtype=bf16 needs training.dtype=bf16 (weights stored in bf16 cannot "
                        "compute in fp32 any more precisely); set training.dtype=bf16 or master_dtype=fp32")
    if cfg.qat.learn_scales and cfg.qat.backend == "torchao":
        raise UserError("qat.learn_scales=true needs qat.backend=qatlinear (or auto): torchao's fake quantizers "
                        "compute their scales")
    if cfg.qat.lora_merged and cfg.lora.dropout:
        raise UserError("qat.lora_merged=true needs lora.dropout=0 (dropout only applies to the adapter path)")
    if cfg.lora.enabled and cfg.lora.target_modules is not None and not cfg.lora.target_modules:
        raise UserError("lora.target_modules is empty; null targets every Linear of the decoder blocks")
    if cfg.checkpoint.resume not in (None, "auto") and not Path(cfg.checkpoint.resume).name.startswith("step-"):
        raise UserError(f"checkpoint.resume={cfg.checkpoint.resume!r}: expected null, 'auto' or a step-NNNNNN folder")
    if cfg.scheduler.warmup_steps >= cfg.training.steps:
        warn(f"scheduler.warmup_steps={cfg.scheduler.warmup_steps} >= training.steps={cfg.training.steps}: the "
             f"learning rate never reaches optimizer.lr")
    if cfg.qat.enabled and cfg.qat.fake_quant_after_n_steps >= cfg.training.steps:
        warn(f"qat.fake_quant_after_n_steps={cfg.qat.fake_quant_after_n_steps} >= training.steps="
             f"{cfg.training.steps}: no step trains with fake quantization")


def warn(msg: str) -> None:
    """A legal value that is surely unintended: one line, and the run goes on."""
    if is_rank0():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _merge(schema, path: Optional[str], overrides: list[str]):
    base = OmegaConf.structured(schema)
    try:
        layers = [base]
        if path is not None:
            layers.append(_load_yaml(path))
        layers.append(_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(_describe(e, path)) from None
    except TypeError:  # OmegaConf: a list where the schema has a mapping, or the reverse
        raise UserError(_container_mismatch(base, path, overrides)) from None


def _container_mismatch(base, path: Optional[str], overrides: list[str]) -> str:
    """The one-line reason a merge failed on a container type: the first override (or the YAML)
    that gives a list where the schema holds a mapping, or the reverse."""
    for item in overrides:
        try:
            OmegaConf.merge(base, _dotlist([item]))
        except (TypeError, OmegaConfBaseException):
            key, _, value = item.partition("=")
            want = "a mapping ({k: v, ...})" if isinstance(OmegaConf.select(base, key), DictConfig) else "a list"
            return f"{key}: expected {want}, got {value!r}"
    return f"{path}: a value is a list where the schema expects a mapping, or the reverse"


def _dotlist(overrides) -> DictConfig:
    """key=value arguments; a value that does not parse as YAML names its key."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. optimizer.lr=1e-4)")
        try:
            yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"override {key}: the value {value!r} does not parse (quote it, or close its brackets)") from None
    return OmegaConf.from_dotlist(list(overrides))


def _load_yaml(path: str):
    """The YAML file as a mapping, or one line saying where it does not parse."""
    import yaml

    if not Path(path).is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path} must hold a mapping of config keys (key: value), not a {type(loaded).__name__}")
    return loaded


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
    check_fields(cfg)
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
