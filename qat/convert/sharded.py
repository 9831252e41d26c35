"""convert under torchrun, for models too big for one host: each rank holds a slice of the model.

    torchrun --nproc_per_node 4 recipes/convert.py --checkpoint runs/qat      # or qat convert --nproc 4

The decoder blocks are split into contiguous slices, one per rank; rank 0 also owns the input
embedding, the last rank the final norm and lm_head. Every rank builds the model skeleton on the
meta device, puts a pass-through stand-in where another rank's module would be (FQNs unchanged),
materializes only its own modules, and reads only their tensors: the base weights from the HF
folder (LoRA runs) and its slice of the DCP checkpoint. Merge, cast, unfake and quantize are
per-module operations, so each rank applies exactly the single-process steps to its slice, and
writes its own safetensors shard; rank 0 writes the index, config and tokenizer. The probe
forward for verify.json runs as a pipeline: hidden states go rank to rank with send/recv, so
the report is computed from the same logits a single process would see.

Above the import baseline, a rank peaked at about twice its slice's fp32 size in
bench/convert_memory.sh: the fp32 trained slice, then the export-dtype copies (unfaked and
quantized). Multi-node runs need a filesystem that every node sees, as DCP itself does.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from qat.atomic import atomic_dir
from qat.config import TrainConfig, config_from_dict
from qat.errors import UserError
from qat.perf import peak_rss_mib
from qat.layout import decoder_blocks
from qat.model import load_model, non_persistent_buffers


@dataclass(frozen=True)
class Part:
    """The slice of the model one rank owns: decoder blocks [start, end) plus the ends."""

    rank: int
    world: int
    start: int
    end: int

    @property
    def first(self) -> bool:  # owns the input embedding
        return self.rank == 0

    @property
    def last(self) -> bool:  # owns the final norm and lm_head, and so the logits
        return self.rank == self.world - 1


def partition(n_blocks: int, world: int, rank: int) -> Part:
    """Contiguous, balanced slices; the first n_blocks % world ranks take one block more."""
    if world > n_blocks:
        raise UserError(f"convert under torchrun needs at most one rank per decoder block: the model has "
                        f"{n_blocks} blocks, the launch has {world} ranks")
    base, extra = divmod(n_blocks, world)
    sizes = [base + (i < extra) for i in range(world)]
    start = sum(sizes[:rank])
    return Part(rank, world, start, start + sizes[rank])


class Absent(nn.Module):
    """Stands in for a block, norm or lm_head that another rank owns: hidden states pass through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class AbsentEmbedding(nn.Module):
    """Stands in for the input embedding on ranks > 0: zeros of the right shape, which the
    pipeline replaces with the hidden states received from the previous rank. `pipeline` sets
    `dtype` to the slice's compute dtype, so the causal mask is built as the real model builds it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size, self.dtype = hidden_size, torch.float32

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.hidden_size, dtype=self.dtype, device=input_ids.device)


def build_part(cfg: TrainConfig, rank: int, world: int):
    """The HF model with only this rank's modules materialized (fp32, as load_model builds it).

    Returns (model, part, tied) where tied maps a tied parameter name to the one it shares (HF's
    `all_tied_weights_keys`, e.g. lm_head.weight -> model.embed_tokens.weight).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping

    model = load_model(cfg.model, on_meta=True)
    hf_config = model.config
    if get_model_conversion_mapping(model, add_legacy=False):
        # Such models rename or fuse weights between the file and the module; a slice-wise
        # writer cannot revert that, so the one-process convert is the path for them.
        raise UserError(f"{type(model).__name__} renames weights on load; convert it in one process (no torchrun)")
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {}) if hf_config.tie_word_embeddings else {}
    blocks = decoder_blocks(model)
    part = partition(len(blocks), world, rank)
    for i in range(len(blocks)):
        if not part.start <= i < part.end:
            blocks[i] = Absent()
    if not part.first:
        model.set_input_embeddings(AbsentEmbedding(hf_config.hidden_size))
    if not part.last:
        model.set_output_embeddings(Absent())
        final_norm_parent(model, blocks).norm = Absent()
    model.to_empty(device="cpu")
    for mod in {mod for mod, _, _ in non_persistent_buffers(model)}:  # RoPE inv_freq: in no file
        model._init_weights(mod)
    return model, part, tied


def final_norm_parent(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """The module that holds the decoder blocks and the final norm (model.model for HF LMs)."""
    for mod in model.modules():
        if any(child is blocks for child in mod.children()):
            if isinstance(getattr(mod, "norm", None), nn.Module):
                return mod
    raise UserError(f"{type(model).__name__}: no final `norm` next to the decoder blocks; convert it in one process")


def load_base_weights(model: nn.Module, cfg: TrainConfig, tied: dict) -> None:
    """LoRA runs: this rank's frozen base weights, read tensor by tensor from the HF folder."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    kw = dict(revision=cfg.model.revision, _raise_exceptions_for_missing_entries=False)
    index = cached_file(cfg.model.path, "model.safetensors.index.json", **kw)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        folder = Path(index).parent
        files = {k: folder / v for k, v in weight_map.items()}
    else:
        single = cached_file(cfg.model.path, "model.safetensors", **kw)
        if not single:
            raise UserError(f"model.path={cfg.model.path!r} has no safetensors weights (needed to convert a LoRA run "
                            f"under torchrun)")
        with safe_open(single, framework="pt") as f:
            files = {k: Path(single) for k in f.keys()}
    by_file: dict[Path, list] = {}
    for name, tensor in model.state_dict().items():
        key = name if name in files or name not in tied else tied[name]
        if key not in files:
            raise UserError(f"model.path={cfg.model.path!r} has no tensor {key!r}")
        by_file.setdefault(files[key], []).append((key, tensor))
    for file, wanted in by_file.items():  # each file opened once; only this slice's tensors read
        with safe_open(str(file), framework="pt") as f:
            for key, tensor in wanted:
                tensor.copy_(f.get_tensor(key))


def load_part(path: Path, rank: int, world: int):
    """This rank's slice of a trained checkpoint: base -> LoRA -> QAT, then its DCP tensors."""
    from qat import checkpoint as ckpt
    from qat.convert.transforms import load_checkpoint_weights, rebuild_as_trained

    meta = ckpt.read_meta(path)
    cfg = config_from_dict(meta["config"])
    if cfg.lora.enabled and cfg.model.init == "random":
        raise UserError("a LoRA run on a randomly initialized base has no stored base weights to convert")
    model, part, tied = build_part(cfg, rank, world)
    if cfg.lora.enabled:
        load_base_weights(model, cfg, tied)
    model, scheme = rebuild_as_trained(model, cfg, meta)
    load_checkpoint_weights(model, cfg, path, tied)
    return (model.eval(), cfg, meta, scheme), part, tied


@contextlib.contextmanager
def pipeline(model: nn.Module, part: Part):
    """During a forward, receive the hidden states before this rank's first block and send them on
    after its last. Every rank runs model(x); only the last rank's logits are real."""
    blocks = decoder_blocks(model)
    handles = []
    if not part.first:
        # plain floating parameters (norms), not quantized tensor subclasses
        model.get_input_embeddings().dtype = next(p.dtype for p in blocks[part.start].parameters()
                                                  if type(p.data) is torch.Tensor and p.is_floating_point())

        def receive(module, args, kwargs):
            buf = torch.empty_like(args[0])
            dist.recv(buf, src=part.rank - 1)
            return (buf, *args[1:]), kwargs
        handles.append(blocks[part.start].register_forward_pre_hook(receive, with_kwargs=True))
    if not part.last:
        def send(module, args, output):
            dist.send(output.contiguous(), dst=part.rank + 1)
        handles.append(blocks[part.end - 1].register_forward_hook(send))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ShardedIO:
    """ConvertIO (qat/convert/io.py) when every rank holds a slice (see the module doc)."""

    def __init__(self, part: Part, tied: dict):
        self.part, self.tied = part, tied

    @property
    def has_logits(self) -> bool:
        return self.part.last

    def record(self) -> dict:
        """Collective: the slices and every rank's peak host memory so far."""
        rows = [None] * self.part.world
        dist.all_gather_object(rows, ([self.part.start, self.part.end], peak_rss_mib()))
        return {"sharded": {"world_size": self.part.world, "blocks_per_rank": [r[0] for r in rows],
                            "peak_rss_mib_per_rank": [r[1] for r in rows]}}

    def forward(self, model: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        with pipeline(model, self.part):
            logits = model(x).logits.float()
        return logits if self.part.last else None

    def share(self, obj):
        """The last rank's object, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.part.world - 1)
        return box[0]

    def _shard_name(self, stem: str) -> str:
        return f"{stem}-{self.part.rank + 1:05d}-of-{self.part.world:05d}.safetensors"

    def _own_state_dict(self, model: nn.Module) -> dict:
        return {k: v for k, v in model.state_dict().items() if k not in self.tied}

    def _write_shard(self, folder: Path, data: dict, metadata: dict) -> None:
        """This rank's tensors to its shard; rank 0 writes the index once every shard is named."""
        from safetensors.torch import save_file

        name = self._shard_name("model")
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in data.items()}, str(folder / name), metadata=metadata)
        parts = [None] * self.part.world
        size = sum(v.numel() * v.element_size() for v in data.values())
        dist.all_gather_object(parts, ({k: name for k in data}, size))
        if self.part.first:
            weight_map = {k: v for m, _ in parts for k, v in sorted(m.items())}
            index = {"metadata": {"total_size": sum(n for _, n in parts)}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _write_config(self, model: nn.Module, folder: Path, tokenizer, dtype: torch.dtype, base_path: str,
                      quantization_config=None) -> None:
        from transformers import GenerationConfig

        config = copy.deepcopy(model.config)
        if quantization_config is not None:
            config.quantization_config = quantization_config
        config.dtype = str(dtype).split(".")[1]
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        try:  # the base folder's sampling defaults, as from_pretrained + save_pretrained keep them
            gen = GenerationConfig.from_pretrained(base_path)
        except OSError:
            gen = GenerationConfig.from_model_config(config)
        gen.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def save_hf(self, model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype, base_path: str) -> None:
        self._write_shard(folder, self._own_state_dict(model), {"format": "pt"})
        if self.part.first:
            self._write_config(model, folder, tokenizer, dtype, base_path)

    def save_adapter(self, model: nn.Module, folder: Path) -> None:
        """Adapters are small: gather them on rank 0. peft writes the folder (config, card) from
        rank 0's slice, then the weights file is rewritten with every rank's tensors."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        parts = [None] * self.part.world
        dist.all_gather_object(parts, get_peft_model_state_dict(model))
        if self.part.first:
            model.save_pretrained(folder)
            weights = {k: v.contiguous() for p in parts for k, v in p.items()}
            save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    def save_quantized(self, model: nn.Module, tokenizer, folder: Path, qcfg, dtype: torch.dtype,
                       base_path: str) -> None:
        """Flattened tensor subclasses as transformers' torchao quantizer saves them: every shard
        carries the metadata of all tensors (the loader merges the shards' metadata)."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        data, meta = flatten_tensor_state_dict(model.state_dict())
        names = json.loads(meta.pop("tensor_names"))
        parts = [None] * self.part.world
        dist.all_gather_object(parts, (meta, names))
        merged = {k: v for m, _ in parts for k, v in m.items()}
        merged["tensor_names"] = json.dumps([n for _, ns in parts for n in ns])
        merged["format"] = "pt"
        data = {k: v for k, v in data.items() if k not in self.tied}
        self._write_shard(folder, data, merged)
        if self.part.first:
            self._write_config(model, folder, tokenizer, dtype, base_path, quantization_config=qcfg)

    def reload_matches(self, quant: nn.Module, folder: Path, x: torch.Tensor, expected) -> bool:
        """Read this rank's shard back through torchao's unflatten (what from_pretrained uses),
        put the tensors into a copy of the slice, and compare the pipeline logits."""
        from safetensors import safe_open
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(str(folder / self._shard_name("model")), framework="pt") as f:
            metadata, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors, leftover = unflatten_tensor_state_dict(data, metadata)
        reloaded = copy.deepcopy(quant)
        for name, value in tensors.items():
            parent, _, leaf = name.rpartition(".")
            setattr(reloaded.get_submodule(parent), leaf, nn.Parameter(value, requires_grad=False))
        if leftover:
            raise RuntimeError(f"quantized shard holds tensors that are not in its metadata: {sorted(leftover)[:3]}")
        logits = self.forward(reloaded, x)
        ok = bool(torch.equal(logits, expected)) if self.part.last else None
        return self.share(ok)


def agree(fn, *args):
    """Call fn on every rank; if it raises UserError on any rank, raise the first rank's error on
    all of them, so rank 0 prints it and every rank exits 2 before anything is written."""
    try:
        result, failure = fn(*args), None
    except UserError as e:
        result, failure = None, str(e)
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [(rank, msg) for rank, msg in enumerate(failures) if msg]
    if failed:
        rank, msg = failed[0]
        same_everywhere = len(failed) == len(failures) and len(set(failures)) == 1
        raise UserError(msg if same_everywhere else f"rank {rank}: {msg}")
    return result


def run_in_shared_dir(out: Path, part: Part, body):
    """atomic_dir across ranks: rank 0 owns the temporary folder and renames it once all ranks
    have written; a failure that every rank sees (bad input, a failed check) removes it."""
    if part.first:
        with atomic_dir(out) as tmp:
            box = [str(tmp)]
            dist.broadcast_object_list(box, src=0)
            result = body(tmp)
            dist.barrier()
        return result
    box = [None]
    dist.broadcast_object_list(box, src=0)
    result = body(Path(box[0]))
    dist.barrier()
    return result
