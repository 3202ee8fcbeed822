"""`moe-sft train CONFIG.yaml --dry-run`: check a whole job and plan it without loading a weight.

For every phase of a recipe (its `then:` chain) the dry run
1. validates what `moe-sft train` validates before loading weights: the YAML, the DeepSpeed JSON,
   the method blocks against the launch (`plugins.check_config` with `trainer.launch_of`), the
   output folder (a folder holding a run is a warning here: the real run needs --resume or
   --overwrite) and every data record (`build_dataset`; data files missing on this machine are a
   warning, so a recipe can be planned on a laptop);
2. builds the model on the meta device from its config.json (`AutoConfig`, no weight read),
   patches it with the YAML's blocks (a saved moe_sft checkpoint, or the previous phase, is
   patched with its own config first and extended, as `trainer.load_model` does) and wraps it
   where a method says so (LoRA: PEFT, on meta). What needs data or trained values stands in by
   a placeholder, said in the plan's notes: condensers chosen from a phase-1 bias (any r experts:
   the counts do not depend on which), an ESFT selection still to be profiled (the ceil(p*E)
   first experts per layer, the most ESFT's top-p rule can take when the scores of a layer sum
   to 1; the plan gives the range 1..ceil(p*E) per layer);
3. counts parameters (total, trainable, what the optimizer holds), each method's effect (the
   methods applied one after another in their application order), the tensors moe_sft adds,
   the MoE layers; and estimates the memory of one rank (module `Memory` terms, formulas in
   their `formula` text and in docs/scale.md).
Nothing is written: not to output_dir, not anywhere else but a temporary folder (the ESFT
placeholder selection) removed at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigError, config_class
from ..data.loader import read_records, source_specs
from ..data.records import DataError
from ..data.stats import DataStats
from ..methods import esft
from ..patching import PatchHandle, extend_patch, patch_model
from ..plugins import Launch, check_config, enabled_methods
from ..pretrained import read_saved_config
from . import deepspeed as ds_glue
from .config import TrainConfig, resolve_path
from .data import build_dataset
from .trainer import _check_output_dir, _load_kwargs, launch_of, load_launch_config, load_tokenizer, recipe_phases

logger = logging.getLogger(__name__)

GIB = 1024**3
ADAM_MIXED_BYTES = 12  # fp32 master weight + fp32 first and second moments, per optimised parameter
LOSS_FP32_COPIES = 2  # the loss upcasts the (T, V) logits to fp32 and keeps their log-softmax for the backward


# ---- the plan ----------------------------------------------------------------------------------
@dataclasses.dataclass
class MethodEffect:
    """What one method block changes, applied after the blocks listed before it."""

    name: str
    added_parameters: int
    added_buffer_elements: int
    trainable_change: int  # negative: it freezes parameters


@dataclasses.dataclass
class AddedTensor:
    """Tensors moe_sft (or a method's wrapper) adds, grouped by name with layer indices as `*`."""

    name: str
    kind: str  # parameter / buffer
    count: int
    elements: int  # summed over the group
    dtype: str


@dataclasses.dataclass
class MoELayers:
    """Consecutive MoE layers that look the same."""

    layers: str  # "3-60"
    count: int
    experts: int
    top_k: int  # the family's
    routed: int  # routed picks per token after patching
    always_active: int  # routed experts used by every token (condensers)
    disabled: int
    routing: str
    expert_parameters: int  # one routed expert
    shared_experts: int
    shared_parameters: int  # the shared experts of one layer
    router_parameters: int
    patch_parameters: int  # parameters the patch added to one layer (new experts, gates)


@dataclasses.dataclass
class MemoryTerm:
    """Bytes one rank holds for one part of the job (`transient`: briefly, at its peak)."""

    name: str
    gpu: int
    cpu: int
    formula: str
    transient: bool = False


@dataclasses.dataclass
class Memory:
    world_size: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str
    micro_batch: int
    max_length: int
    activation_checkpointing: bool
    terms: list[MemoryTerm]
    gpu_peak: int  # every kept term + the largest transient one
    cpu: int
    assumptions: list[str]


@dataclasses.dataclass
class Plan:
    """The plan of one phase of a recipe."""

    config: str
    phase: int
    phases: int
    model: str
    model_type: str
    dtype: str
    total: int
    trainable: int  # parameters training changes (an upper bound while a selection is to be profiled)
    trainable_min: int | None  # the lower bound then, else None
    optimized: int  # parameters the optimizer holds (requires_grad); more than `trainable` with ESFT
    stock_total: int
    methods: list[MethodEffect]
    added: list[AddedTensor]
    moe_layers: list[MoELayers]
    dense_layers: list[int]
    memory: Memory
    data: DataStats | None
    warnings: list[str]
    notes: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- phases, model source, placeholders ----------------------------------------------------------
@dataclasses.dataclass
class _Source:
    """What the meta model of a phase is built from."""

    label: str
    config: Any  # transformers PretrainedConfig
    kwargs: dict
    saved: Any = None  # the MoESFTConfig the checkpoint (or the previous phase) was patched with


def _dtype_of(kwargs: dict, hf_config) -> torch.dtype:
    dtype = kwargs["dtype"]
    if dtype == "auto":  # the checkpoint's own dtype, as from_pretrained(dtype="auto") loads it
        dtype = hf_config.dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _source(cfg: TrainConfig) -> _Source:
    m = cfg.model
    kwargs = _load_kwargs(cfg)
    if m.tiny is not None:
        from ..testing import tiny_config

        kwargs["dtype"] = torch.float32 if m.dtype == "auto" else kwargs["dtype"]  # as load_model builds it
        return _Source(f"tiny {m.tiny}", tiny_config(m.tiny), kwargs)
    from transformers import AutoConfig

    local = Path(m.path)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"model.path {m.path!r} has no config.json; point it at a model folder (or a hub id)")
    try:
        hf_config = AutoConfig.from_pretrained(m.path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.path {m.path!r}: no config.json could be read ({type(e).__name__}: {e}). Give a local folder holding "
            "config.json or a hub id (with network or in the local cache); a later phase of a recipe is planned from "
            "its first YAML (`moe-sft train PHASE1.yaml --dry-run`)"
        ) from None
    kwargs["dtype"] = _dtype_of(kwargs, hf_config)
    saved = config_class().load(local) if local.is_dir() and read_saved_config(local) is not None else None
    return _Source(m.path, hf_config, kwargs, saved)


def _meta_model(src: _Source) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(src.config), **src.kwargs)


def _plannable(model: nn.Module, methods, tmp: Path) -> tuple[Any, list[str], int | None]:
    """`methods` with placeholders for what only data or trained values decide (module docstring),
    the notes saying so, and the experts per layer of a placeholder ESFT selection (or None)."""
    adapter = get_adapter(model)
    layers = adapter.moe_layer_indices(model)
    E = adapter.router_spec(model.config).num_experts
    changes, notes, bound = {}, [], None
    c = methods.condenser
    if c is not None and c.condensers is not None and c.condensers.experts is None:
        disabled = (methods.routing.disabled_experts or {}) if methods.routing is not None else {}
        chosen = {i: [e for e in range(E) if e not in set(disabled.get(i, ()))][: c.condensers.num] for i in layers}
        changes["condenser"] = dataclasses.replace(c, condensers=dataclasses.replace(c.condensers, experts=chosen))
        notes.append(
            f"condenser: the {c.condensers.num} {c.condensers.source} condenser experts per layer are chosen when the run "
            f"has the trained values (longtail_from: {c.condensers.longtail_from}); placeholders stand in here (counts do not "
            "depend on which)"
        )
    e = methods.esft
    if e is not None and e.selection_file is None:
        # Scores of a layer summing to 1 (per_layer), sorted: the top n-1 hold at least (n-1)/E, and
        # they stayed below p, so n <= ceil(p E). Global normalisation bounds nothing.
        n = min(E, math.ceil(e.top_p * E - 1e-9)) if e.normalize == "per_layer" else E
        path = tmp / esft.SELECTION_NAME
        esft.save_selection(path, {i: list(range(n)) for i in layers})
        changes["esft"] = dataclasses.replace(e, selection_file=str(path))
        bound = n
        notes.append(
            f"esft: selection to be profiled on data.profile_samples examples when the run loads the model; planned as its "
            f"bound, 1..{n} of {E} experts per layer (top_p={e.top_p}, normalize={e.normalize}); memory at the upper bound"
        )
    return dataclasses.replace(methods, **changes), notes, bound


# ---- building and counting -----------------------------------------------------------------------
@dataclasses.dataclass
class _Built:
    model: nn.Module  # the model to train (a wrapper where a method wraps)
    handle: PatchHandle
    stock: frozenset[int]  # ids of the stock model's tensors
    stock_total: int  # the stock model's parameters
    shapes: list[tuple[int, int, int, int]]  # per MoE layer (E, I, H, experts run per token), read before wrapping
    moe_layers: list[MoELayers]  # read before wrapping


def _build(src: _Source, methods, tmp: Path, extend: bool) -> tuple[_Built, list[str], int | None]:
    """The meta model patched as the run patches it: `src.saved` first and `methods` extending
    it (when `extend`), else `methods` alone; then wrapped."""
    model = _meta_model(src)
    stock = frozenset(id(t) for t in [*model.parameters(), *model.buffers()])
    stock_total = sum(p.numel() for p in model.parameters())
    methods, notes, bound = _plannable(model, methods, tmp)
    if src.saved is not None and extend:
        handle = patch_model(model, src.saved)
        if methods != config_class()():
            with handle.stock_config():
                extend_patch(handle, methods)
    else:
        handle = patch_model(model, methods)
    shapes = []
    for m in handle.layers:
        E, H, I = m.block.experts.down_proj.shape  # (E, H, I)
        per_token = (m.controls.num_routed or m.controls.spec.top_k) + len(m.controls.expert_ids.get("forced", ()))
        shapes.append((E, I, H, per_token))
    layers = _moe_layers(handle)
    for method, _block in handle.methods():
        model = method.wrap(model, handle, handle.state.get(method.name))
    return _Built(model, handle, stock, stock_total, shapes, layers), notes, bound


def _counts(built: _Built) -> tuple[int, int, int, int]:
    """(total, trainable, optimised, added buffer elements)."""
    params = list(built.model.parameters())
    total = sum(p.numel() for p in params)
    optimized = sum(p.numel() for p in params if p.requires_grad)
    # ESFT trains slices of the fused expert tensors: the optimizer holds them whole.
    trainable = esft.trainable_parameters(built.model) if built.handle.config.esft is not None else optimized
    added_buffers = sum(b.numel() for b in built.model.buffers() if id(b) not in built.stock)
    return total, trainable, optimized, added_buffers


def _method_effects(src: _Source, final_config, tmp: Path, stock_total: int) -> list[MethodEffect]:
    """Each enabled block's effect: the blocks applied cumulatively, in application order."""
    effects, before = [], (stock_total, stock_total, 0)
    enabled = [m.name for m, _ in enabled_methods(final_config)]
    for k, name in enumerate(enabled):
        prefix = dataclasses.replace(final_config, **{later: None for later in enabled[k + 1 :]})
        built, _, _ = _build(src, prefix, tmp, extend=False)
        total, trainable, _, buffers = _counts(built)
        effects.append(MethodEffect(name, total - before[0], buffers - before[2], trainable - before[1]))
        before = (total, trainable, buffers)
    return effects


def _added_tensors(built: _Built) -> list[AddedTensor]:
    groups: dict[tuple[str, str, str], list[int]] = {}
    named = [("parameter", n, t) for n, t in built.model.named_parameters()]
    named += [("buffer", n, t) for n, t in built.model.named_buffers()]
    for kind, name, t in named:
        if id(t) not in built.stock:
            key = (re.sub(r"\.\d+\.", ".*.", name), kind, str(t.dtype).replace("torch.", ""))
            groups.setdefault(key, []).append(t.numel())
    return [AddedTensor(n, kind, len(v), sum(v), dtype) for (n, kind, dtype), v in sorted(groups.items())]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _moe_layers(handle: PatchHandle) -> list[MoELayers]:
    config, rows = handle.model.config, []
    for m in handle.layers:
        ctl, spec, block = m.controls, m.controls.spec, m.block
        shared = handle.adapter.shared_modules(block)
        routing = f"{spec.score_func}" + (", renormalised" if spec.norm_topk_prob else "")
        if spec.group_score != "none":
            routing += f", group-limited ({spec.topk_group} of {spec.n_group} groups)"
        if spec.routed_scaling_factor != 1.0:
            routing += f", scaled x{spec.routed_scaling_factor:g}"
        experts = block.experts
        rows.append(
            MoELayers(
                layers=str(m.layer_idx), count=1, experts=spec.num_experts, top_k=spec.top_k,
                routed=ctl.num_routed or spec.top_k, always_active=len(ctl.expert_ids.get("forced", ())),
                disabled=len(ctl.expert_ids.get("disabled", ())), routing=routing,
                expert_parameters=(experts.gate_up_proj.numel() + experts.down_proj.numel()) // spec.num_experts,
                shared_experts=int(getattr(config, "n_shared_experts", None) or (1 if shared else 0)),
                shared_parameters=sum(_numel(s) for s in shared), router_parameters=_numel(block.gate),
                patch_parameters=_numel(ctl),
            )
        )  # fmt: skip
    merged: list[MoELayers] = []
    for row in rows:
        last = merged[-1] if merged else None
        same = last is not None and dataclasses.replace(last, layers="", count=0) == dataclasses.replace(row, layers="", count=0)
        if same and int(last.layers.split("-")[-1]) + 1 == int(row.layers):
            last.layers, last.count = f"{last.layers.split('-')[0]}-{row.layers}", last.count + 1
        else:
            merged.append(row)
    return merged


# ---- memory ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Activations:
    """What the activation estimates need."""

    tokens: int  # T = micro-batch x max_length, an upper bound (rows are padded to the batch's longest)
    vocab: int
    shapes: list[tuple[int, int, int, int]]  # (E, I, H, experts run per token) per MoE layer
    act_bytes: int
    weight_bytes: int
    checkpointing: bool

    @property
    def kept_layers(self) -> int:
        """MoE layers whose saved tensors live at once: one under activation checkpointing (the
        layer being recomputed), else all of them."""
        return 1 if self.checkpointing else len(self.shapes)

    def largest(self, per_layer: Callable[[int, int, int, int], int]) -> int:
        return max((per_layer(*s) for s in self.shapes), default=0)


def _size(n: int) -> str:
    """Bytes in the largest unit that keeps a digit before the point (tiny models plan in KiB)."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _densemixer(block, a: _Activations) -> list[MemoryTerm]:
    chunk = min(block.chunk_tokens, a.tokens)
    transient = MemoryTerm(
        "densemixer: all-experts chunk (transient)", a.largest(lambda E, I, H, k: 2 * E * chunk * max(I, H) * a.act_bytes), 0,
        f"2 x E x chunk({chunk}) x max(I, H) x {a.act_bytes} B", transient=True,
    )  # fmt: skip
    if block.memory == "recompute":
        return [transient]
    kept = a.kept_layers * a.largest(lambda E, I, H, k: E * a.tokens * min(I, H) * a.act_bytes)
    where = "the layer being recomputed" if a.checkpointing else f"{len(a.shapes)} MoE layers"
    return [MemoryTerm("densemixer (fast): dense pass kept", kept, 0, f"E x T x min(I, H) x {a.act_bytes} B, {where}"), transient]


def _condenser(block, a: _Activations) -> list[MemoryTerm]:
    cc = block.condensers
    if cc is None or (cc.source == "longtail" and cc.budget == "compute_neutral"):
        return []  # bias only, or k - r routed + r condensers: as many expert evaluations as the stock model
    kept = a.kept_layers * a.largest(lambda E, I, H, k: a.tokens * cc.num * (3 * I + H) * a.act_bytes)
    return [MemoryTerm(
        f"condenser: {cc.num} extra expert evaluations per token", kept, 0,
        f"T x r x (2I + I + H) x {a.act_bytes} B (gate/up, activation, output) per "
        + ("recomputed layer" if a.checkpointing else "MoE layer"),
    )]  # fmt: skip


def _moe_bias_head(block, a: _Activations) -> list[MemoryTerm]:
    terms = [MemoryTerm(
        "moe_bias_head: gate probabilities + mixing matrix", a.tokens * block.num_experts * (4 + a.act_bytes), 0,
        f"T x E_b x (4 + {a.act_bytes}) B; no (T, V) tensor is added: the bias goes into the logits in place",
    )]  # fmt: skip
    if block.apply_to == "top_entropy":
        rows = min(a.tokens * a.vocab, 1 << 24)  # moe_bias_head's entropy chunk on accelerators
        terms.append(MemoryTerm("moe_bias_head: entropy chunk (transient)", 2 * 4 * rows, 0,
                                "2 x min(T x V, 2^24) x 4 B (log-softmax and its exp)", transient=True))  # fmt: skip
    return terms


def _lora(block, a: _Activations) -> list[MemoryTerm]:
    if not block.experts:
        return []  # attention adapters: T x r per target, negligible
    stack = a.largest(lambda E, I, H, k: E * 3 * I * H * a.weight_bytes)
    terms = [MemoryTerm(
        "lora: adapted expert stacks W + BA", a.kept_layers * stack, 0,
        f"E x 3IH x {a.weight_bytes} B per {'recomputed layer' if a.checkpointing else 'MoE layer'} (PEFT forms W + BA "
        "each forward; the grouped matmul keeps it for the backward)",
    )]  # fmt: skip
    if a.weight_bytes < 4:  # PEFT forms BA itself for low-precision weights
        terms.append(MemoryTerm("lora: BA of one layer (transient)", stack, 0, f"E x 3IH x {a.weight_bytes} B", transient=True))
    return terms


# Extra activations per method block (methods not listed add none: frozen_router, esft).
METHOD_ACTIVATIONS: dict[str, Callable[[Any, _Activations], list[MemoryTerm]]] = {
    "densemixer": _densemixer,
    "condenser": _condenser,
    "moe_bias_head": _moe_bias_head,
    "lora": _lora,
}
NO_EXTRA_ACTIVATIONS = ("frozen_router", "esft")


def _precision(cfg: TrainConfig, ds: dict | None, dtype: torch.dtype) -> tuple[str, int, int, int, int]:
    """(label, weight, gradient, optimizer and activation bytes per element)."""
    enabled = lambda key: bool(cfg.training.get(key)) or (ds or {}).get(key, {}).get("enabled") is True  # noqa: E731
    half = "bf16" if enabled("bf16") else "fp16" if enabled("fp16") else None
    b = dtype.itemsize
    name = str(dtype).replace("torch.", "")
    if half and ds is not None:
        label = f"{half} mixed precision (DeepSpeed: {half} weights and gradients, fp32 master + Adam moments)"
        return label, 2, 2, ADAM_MIXED_BYTES, 2
    if half:
        return f"{half} autocast, {name} weights; AdamW moments in {name}", b, b, 2 * b, 2
    return f"{name} throughout; AdamW moments in {name}", b, b, 2 * b, b


def _memory(cfg: TrainConfig, ds: dict | None, launch: Launch, built: _Built, dtype: torch.dtype) -> Memory:
    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    tr = {**defaults, **cfg.training}
    # transformers 5 reads activation_checkpointing, and gradient_checkpointing where that is unset
    ac = tr["activation_checkpointing"]
    checkpointing = bool(tr["gradient_checkpointing"] if ac is None else ac)
    micro = int(tr["per_device_train_batch_size"])
    label, wb, gb, ob, ab = _precision(cfg, ds, dtype)
    N, z = launch.world_size, launch.zero_stage
    model, handle = built.model, built.handle
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    opt = sum(p.numel() for p in params if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    w_div, g_div, o_div = (N if z >= 3 else 1), (N if z >= 2 else 1), (N if z >= 1 else 1)
    terms, assumptions = [], []

    weights = total * wb // w_div
    on_cpu = launch.offload_param and z == 3
    terms.append(MemoryTerm("weights", 0 if on_cpu else weights, weights if on_cpu else 0,
                            f"{total:,} x {wb} B" + (f" / {N} ranks" if w_div > 1 else "")))  # fmt: skip
    terms.append(MemoryTerm("buffers (replicated)", buffers, 0, "every buffer, on every rank"))
    if launch.offload_optimizer and z >= 1:
        gpu_grads = opt * gb if z == 1 else 0
        where = f"fp32 partition on CPU: {opt:,} x 4 B / {N}" + (f"; GPU: {opt:,} x {gb} B" if z == 1 else "")
        terms.append(MemoryTerm("gradients", gpu_grads, opt * 4 // o_div, where))
        terms.append(MemoryTerm("optimizer states", 0, opt * ob // o_div, f"{opt:,} x {ob} B / {N} ranks, on CPU"))
    else:
        for name, per, div in (("gradients", gb, g_div), ("optimizer states", ob, o_div)):
            terms.append(MemoryTerm(name, opt * per // div, 0, f"{opt:,} x {per} B" + (f" / {N} ranks" if div > 1 else "")))
    if z == 3:
        # A patched MoE block is a ZeRO-3 leaf: all its parameters are gathered at once.
        modules = [m.block for m in handle.layers]
        blocks = {id(p) for b in modules for p in b.parameters()}
        largest = max(((_numel(b), sum(p.numel() for p in b.parameters() if p.requires_grad)) for b in modules), default=(0, 0))
        single = max(((p.numel(), p.numel() if p.requires_grad else 0) for p in params if id(p) not in blocks), default=(0, 0))
        n, g = max(largest, single)
        terms.append(MemoryTerm("ZeRO-3 gather of the largest module (transient)", n * wb + g * gb, 0,
                                f"{n:,} x {wb} B gathered + {g:,} x {gb} B full gradient before reduce-scatter (a patched "
                                "MoE block is one ZeRO-3 leaf)", transient=True))  # fmt: skip

    T = micro * cfg.data.max_length
    vocab = handle.model.get_output_embeddings().weight.shape[0]
    hidden = int(handle.model.config.hidden_size)
    layers = len(handle.adapter.decoder_layers(handle.model))
    acts = _Activations(T, vocab, built.shapes, ab, wb, checkpointing)
    terms.append(MemoryTerm("logits and loss", T * vocab * (ab + 4 * LOSS_FP32_COPIES), 0,
                            f"T x V x ({ab} + 2 x 4) B: logits, their fp32 upcast and log-softmax"))  # fmt: skip
    if checkpointing:
        terms.append(MemoryTerm("checkpointed layer inputs", layers * T * hidden * ab, 0, f"L x T x H x {ab} B"))
        terms.append(MemoryTerm("recomputed MoE layer: routed experts (transient)",
                                acts.largest(lambda E, I, H, k: T * k * (3 * I + H) * ab), 0,
                                f"T x (routed + always active) x (2I + I + H) x {ab} B", transient=True))  # fmt: skip
    else:
        assumptions.append("activation checkpointing is off: every layer keeps its activations, which are not estimated "
                           "here (far more than with training.gradient_checkpointing: true)")  # fmt: skip
    for method, block in handle.methods():
        if method.name in METHOD_ACTIVATIONS:
            terms += METHOD_ACTIVATIONS[method.name](block, acts)
        elif method.name not in NO_EXTRA_ACTIVATIONS:
            assumptions.append(f"{method.name}: no estimate of its extra activations")

    assumptions += [
        f"{label}; per rank of {N}, " + (f"ZeRO stage {z}" if z else "no DeepSpeed (DDP: every rank holds everything)")
        + (", optimizer states (+ fp32 gradients) on CPU" if launch.offload_optimizer else "")
        + (", parameters on CPU" if on_cpu else ""),
        "ZeRO: stage >= 1 partitions optimizer states, >= 2 gradients, 3 parameters over the ranks (buffers stay whole)",
        f"T = per_device_train_batch_size {micro} x data.max_length {cfg.data.max_length} = {T} tokens per micro-batch "
        "(an upper bound: rows are padded to the longest in the batch)",
        "peak = every kept term + the largest transient one; not counted: attention internals, communication buckets, "
        "ZeRO-3 prefetching and small parameters kept whole (stage3_param_persistence_threshold), the allocator's "
        "fragmentation, the CUDA context",
    ]  # fmt: skip
    if launch.offload_param and z != 3:
        assumptions.append(f"offload_param applies to ZeRO-3 only; ignored at stage {z}")
    gpu = sum(t.gpu for t in terms if not t.transient) + max((t.gpu for t in terms if t.transient), default=0)
    return Memory(N, z, launch.offload_optimizer, launch.offload_param, label, micro, cfg.data.max_length, checkpointing,
                  terms, gpu, sum(t.cpu for t in terms), assumptions)  # fmt: skip


# ---- data ------------------------------------------------------------------------------------------
def _data(cfg: TrainConfig, tokenizer: Callable[[], Any]) -> tuple[DataStats | None, list[str]]:
    """The loader's statistics, or (None, a warning) when data is not on this machine."""
    resolve = lambda name: resolve_path(cfg, name)  # noqa: E731
    try:
        read_records(cfg.data, resolve, detect_formats=False)
    except DataError as e:
        absent = [s.path for s in source_specs(cfg.data, resolve) if not resolve(s.path).exists()]
        if not absent:
            raise  # the data is here and malformed
        return None, [f"data not available on this machine ({', '.join(absent)}): not validated, no statistics ({e})"]
    return build_dataset(tokenizer(), cfg.data, resolve).stats, []


# ---- one phase, a recipe ---------------------------------------------------------------------------
def _launch(cfg: TrainConfig, world_size: int) -> tuple[dict | None, Launch]:
    ds = load_launch_config(cfg)
    launch = dataclasses.replace(launch_of(cfg, ds), world_size=world_size)
    check_config(cfg.methods, launch)
    return ds, launch


def _plan_phase(cfg, index, count, src, world_size, tmp, tokenizer) -> tuple[Plan, _Source]:
    ds, launch = _launch(cfg, world_size)
    warnings = []
    try:
        _check_output_dir(cfg, False, False)
    except ConfigError as e:
        warnings.append(f"the run would stop here: {e}")
    stats, data_warnings = _data(cfg, tokenizer)
    warnings += data_warnings
    quant = getattr(src.config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", quant)
        dtype = str(src.kwargs["dtype"]).replace("torch.", "")
        warnings.append(f"the checkpoint's weights are quantized (quantization_config: {method}); moe-sft trains {dtype} "
                        "weights: dequantize them first and point model.path at that folder")  # fmt: skip

    built, notes, bound = _build(src, cfg.methods, tmp, extend=True)
    total, trainable, optimized, _ = _counts(built)
    trainable_min = None
    if bound is not None:  # at least one expert per layer
        slice_ = sum(3 * I * H for _E, I, H, _k in built.shapes)  # one expert of every MoE layer
        trainable_min = trainable - (bound - 1) * slice_
    dtype = src.kwargs["dtype"]
    plan = Plan(
        config=str(cfg.source), phase=index, phases=count, model=src.label, model_type=built.handle.model.config.model_type,
        dtype=str(dtype).replace("torch.", ""), total=total, trainable=trainable, trainable_min=trainable_min,
        optimized=optimized, stock_total=built.stock_total,
        methods=_method_effects(src, built.handle.config, tmp, built.stock_total), added=_added_tensors(built),
        moe_layers=built.moe_layers,
        dense_layers=sorted(set(range(len(built.handle.adapter.decoder_layers(built.handle.model))))
                            - {m.layer_idx for m in built.handle.layers}),
        memory=_memory(cfg, ds, launch, built, dtype), data=stats, warnings=warnings, notes=notes,
    )  # fmt: skip
    for w in warnings:
        logger.warning("dry run: %s", w)
    return plan, dataclasses.replace(src, saved=built.handle.config)


def plan_recipe(path: str | Path, overrides: list[str] | None = None, world_size: int | None = None) -> list[Plan]:
    """The plan of the YAML at `path` and of each phase its `then:` chain names (a later phase
    from the model the previous one leaves). `world_size`: default WORLD_SIZE, else 1."""
    world_size = world_size if world_size is not None else ds_glue.distributed_world_size()
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: must be at least 1 (the number of training processes)")
    phases = recipe_phases(path, overrides)
    tokenizers: list[Any] = []

    def tokenizer():  # the first phase's (later phases start from its final model, which holds it)
        if not tokenizers:
            tokenizers.append(load_tokenizer(phases[0]))
        return tokenizers[0]

    plans: list[Plan] = []
    with tempfile.TemporaryDirectory(prefix="moe_sft_plan_") as tmp:
        src = _source(phases[0])
        for i, cfg in enumerate(phases):
            plan, src = _plan_phase(cfg, i + 1, len(phases), src, world_size, Path(tmp), tokenizer)
            plans.append(plan)
    return plans


# ---- output ----------------------------------------------------------------------------------------
def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def headline(plan: Plan) -> str:
    """One line: parameters and per-rank memory (the shipped YAMLs' plan comment)."""
    m = plan.memory
    trainable = _count(plan.trainable) if plan.trainable_min is None else f"{_count(plan.trainable_min)}..{_count(plan.trainable)}"
    cpu = f", CPU {_size(m.cpu)}" if m.cpu else ""
    launch = f"ZeRO-{m.zero_stage}" if m.zero_stage else "no DeepSpeed"
    return (f"params {_count(plan.total)} total / {trainable} trainable; per rank of {m.world_size} ({launch}): "
            f"GPU {_size(m.gpu_peak)}{cpu}")  # fmt: skip


def format_plan(plan: Plan) -> str:
    """The plan as text for the terminal."""
    share = f" ({100 * plan.trainable / plan.total:.2f}%)" if plan.total else ""
    trainable = _count(plan.trainable) if plan.trainable_min is None else f"{_count(plan.trainable_min)} to {_count(plan.trainable)}"
    out = [
        f"plan of {plan.config} (phase {plan.phase} of {plan.phases}): dry run, no weight loaded",
        f"model        {plan.model} ({plan.model_type}, {plan.dtype}), built on the meta device",
        f"parameters   {_count(plan.total)} total ({plan.total:,}), {trainable} trainable{share}, "
        f"optimizer holds {_count(plan.optimized)}",
        f"  stock model            {_count(plan.stock_total)}",
    ]
    for e in plan.methods:
        out.append(f"  + {e.name:<20} {e.added_parameters:+,} parameters, {e.added_buffer_elements:+,} buffer elements, "
                   f"trainable {e.trainable_change:+,}")  # fmt: skip
    if plan.added:
        out.append("added tensors")
        out += [f"  {a.name}  {a.kind} x{a.count}, {a.elements:,} elements, {a.dtype}" for a in plan.added]
    out.append("MoE layers")
    for r in plan.moe_layers:
        active = f" + {r.always_active} always active" if r.always_active else ""
        out.append(
            f"  layers {r.layers} ({r.count}): {r.experts} experts x {_count(r.expert_parameters)}, top-{r.top_k} "
            f"{r.routing}; per token {r.routed} routed{active}" + (f", {r.disabled} disabled" if r.disabled else "")
            + (f"; {r.shared_experts} shared expert(s) {_count(r.shared_parameters)}" if r.shared_parameters else "; no shared experts")
            + f"; router {_count(r.router_parameters)}"
            + (f"; added by the patch {_count(r.patch_parameters)}" if r.patch_parameters else "")
        )  # fmt: skip
    out.append(f"  dense layers: {plan.dense_layers or 'none'}")
    m = plan.memory
    out.append(f"memory per rank  {m.precision}")
    out.append(f"  {'':<52} {'GPU':>11} {'CPU':>11}  formula")
    for t in m.terms:
        out.append(f"  {t.name:<52} {_size(t.gpu):>11} {_size(t.cpu):>11}  {t.formula}")
    out.append(f"  {'peak estimate':<52} {_size(m.gpu_peak):>11} {_size(m.cpu):>11}")
    out += [f"  assumption: {a}" for a in m.assumptions]
    out.append("data         " + (plan.data.summary(m.max_length) if plan.data is not None else "not read (see warnings)"))
    out += [f"note: {n}" for n in plan.notes]
    out += [f"warning: {w}" for w in plan.warnings]
    out.append(f"headline: {headline(plan)}")
    return "\n".join(out)


def dry_run(config: str, overrides: list[str], world_size: int | None = None, as_json: bool = False) -> int:
    """`moe-sft train ... --dry-run`: print the plans (as JSON with `as_json`)."""
    plans = plan_recipe(config, overrides, world_size)
    if as_json:
        print(json.dumps([p.to_dict() for p in plans], indent=2, default=str))
    else:
        print("\n\n".join(format_plan(p) for p in plans))
    return 0
