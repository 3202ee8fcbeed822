"""Expert parallelism for `moe-sft train`: the `parallel:` block on transformers' own engine.

    parallel: {ep_size: 8}                 # FSDP2 + EP: experts split over 8 ranks, the rest FSDP2
    parallel: {ep_size: 2, tp_size: 2}     # TP + EP: attention tensor-parallel, experts split

transformers shards the model while it loads (`from_pretrained(..., distributed_config=...)`:
built on the meta device, each rank reads only its shard; the model's `base_model_ep_plan` puts
whole experts on each rank, `base_model_tp_plan` splits attention, FSDP2 shards the rest). The
Trainer then leaves placement and gradient reduction to the model. moe_sft patches the sharded
model as any other: the patched block calls the experts module with global expert ids, which is
what transformers' expert-parallel dispatch takes.

Everything here is checked before any weight loads: the sizes against the world size and the
model's config.json, the launch (no DeepSpeed, no optimizer-state checkpoints, no resume) and
the method blocks. A method that reads the weights of every expert on every rank cannot run
when each rank holds only its own experts; it is refused with the reason and the alternative.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from ..adapters import adapter_for
from ..config import ConfigError
from ..plugins import enabled_methods, resolve_config
from .deepspeed import distributed_world_size

logger = logging.getLogger(__name__)

# Methods checked under expert parallelism (tests/test_parallel_ep.py, scripts/ep_gpu_check.py).
# A method not named here (a plug-in) is refused: nothing says it reads only local experts.
_WORKS = ("condenser", "frozen_router", "moe_bias_head", "lora")
_ZERO = "train it with DeepSpeed ZeRO (drop `parallel:`, set `deepspeed: configs/deepspeed/zero3.json`)"


@dataclasses.dataclass
class ParallelConfig:
    """The `parallel:` block (transformers' `DistributedConfig` sizes).

    ep_size    ranks that split the routed experts (each holds num_experts / ep_size whole
               experts); required, at least 2
    tp_size    ranks that split attention (tensor parallelism) and share one batch; a
               divisor of ep_size. 1: FSDP2 + EP
    fsdp_size  data-parallel (FSDP2) ranks; null: WORLD_SIZE // tp_size, so the YAML is the
               same on one node and on many. ep_size must divide fsdp_size * tp_size; the
               ranks that hold the same experts (fsdp_size * tp_size / ep_size of them)
               FSDP-shard them
    """

    ep_size: int | None = None
    tp_size: int = 1
    fsdp_size: int | None = None

    def __post_init__(self):
        if self.ep_size is None:
            raise ConfigError(
                "parallel.ep_size is required: the number of ranks the routed experts are split over (e.g. 8 on "
                "one 8-GPU node); without expert parallelism leave `parallel:` out"
            )
        for key in ("ep_size", "tp_size", "fsdp_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"parallel.{key} = {value}: must be >= 1")
        if self.ep_size < 2:
            raise ConfigError(
                f"parallel.ep_size = {self.ep_size}: `parallel:` is for expert parallelism (ep_size >= 2); for data "
                "parallelism alone leave it out (torchrun / DeepSpeed ZeRO replicate or partition the model)"
            )
        if self.ep_size % self.tp_size:
            raise ConfigError(
                f"parallel.ep_size = {self.ep_size} is not a multiple of parallel.tp_size = {self.tp_size} "
                "(transformers splits the experts over whole tensor-parallel groups); "
                f"use ep_size = {-(-self.ep_size // self.tp_size) * self.tp_size} or a tp_size dividing {self.ep_size}"
            )
        if self.fsdp_size is not None and (self.fsdp_size * self.tp_size) % self.ep_size:
            raise ConfigError(
                f"parallel.ep_size = {self.ep_size} does not divide fsdp_size * tp_size = {self.fsdp_size} * "
                f"{self.tp_size} = {self.fsdp_size * self.tp_size}: every rank must hold the same number of experts. "
                "Use an ep_size that divides it, or leave fsdp_size out (WORLD_SIZE // tp_size)"
            )

    def resolve(self, world_size: int) -> ParallelConfig:
        """The sizes for `world_size` ranks: fsdp_size filled in, the mesh checked to cover it."""
        if world_size % self.tp_size:
            raise ConfigError(
                f"parallel.tp_size = {self.tp_size} does not divide the world size {world_size}; launch a multiple "
                f"of {self.tp_size} processes or change tp_size"
            )
        fsdp = self.fsdp_size if self.fsdp_size is not None else world_size // self.tp_size
        if fsdp * self.tp_size != world_size:
            raise ConfigError(
                f"parallel: fsdp_size * tp_size = {fsdp} * {self.tp_size} = {fsdp * self.tp_size} ranks, but the "
                f"launch has {world_size}; set fsdp_size = {world_size // self.tp_size} (or leave it out), or launch "
                f"{fsdp * self.tp_size} processes"
            )
        return dataclasses.replace(self, fsdp_size=fsdp)


# ---- before any weight loads -------------------------------------------------------------------
def check_model(parallel: ParallelConfig, model_config) -> None:
    """transformers has a plan for this model at these sizes (config.json only)."""
    model_type = model_config.model_type
    if not getattr(model_config, "base_model_ep_plan", None):
        raise ConfigError(
            f"parallel: transformers has no expert-parallel plan (base_model_ep_plan) for model_type "
            f"{model_type!r}; train it without `parallel:`"
        )
    experts = adapter_for(model_type, "parallel").router_spec(model_config).num_experts
    if experts % parallel.ep_size:
        divisors = [d for d in range(2, experts + 1) if experts % d == 0]
        raise ConfigError(
            f"parallel.ep_size = {parallel.ep_size} does not divide the {experts} routed experts of this "
            f"{model_type} model (each rank holds whole experts); use one of {divisors}"
        )
    if parallel.tp_size > 1:
        if not getattr(model_config, "base_model_tp_plan", None):
            raise ConfigError(
                f"parallel.tp_size = {parallel.tp_size}: transformers has no tensor-parallel plan for model_type "
                f"{model_type!r}; use tp_size: 1 (FSDP2 + EP)"
            )
        for key in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(model_config, key, None)
            if heads is not None and heads % parallel.tp_size:
                raise ConfigError(
                    f"parallel.tp_size = {parallel.tp_size} does not divide {key} = {heads} of this {model_type} "
                    "model (tensor parallelism splits attention by heads); use a tp_size dividing it, or tp_size: 1"
                )


def _refusal(name: str, block: Any, parallel: ParallelConfig, model_config) -> str | None:
    """Why method `name` with `block` cannot run under `parallel`, or None."""
    if name == "densemixer":
        return (
            "densemixer's dense router gradient evaluates every expert on every token, but under expert parallelism "
            f"each rank holds only its own 1/{parallel.ep_size} of the experts (their weights are DTensor shards); "
            + _ZERO
        )
    if name == "esft":
        return (
            "esft freezes expert slices of the fused expert tensors by global expert id (gradient mask and a restore "
            "after each step), but under expert parallelism each rank holds only its own experts' slices; " + _ZERO
        )
    if name == "condenser" and block.condensers is not None and block.condensers.source == "new":
        return (
            "condenser source: new initialises the new experts from the weights of the long-tail experts, which "
            "under expert parallelism live on other ranks; use condensers with source: longtail, or " + _ZERO
        )
    if name == "lora" and (block.experts or block.router):
        return (
            "lora on the fused experts or the router wraps those weights with PEFT, which cannot adapt the "
            "sharded (DTensor) expert and router tensors of an expert-parallel model; set lora.experts: false and "
            "lora.router: false (attention only, with tp_size: 1), or " + _ZERO
        )
    if name == "lora" and parallel.tp_size > 1:
        return (
            f"lora on attention with parallel.tp_size = {parallel.tp_size}: PEFT's LoRA layers do not handle "
            "tensor-parallel (sharded) attention projections; use tp_size: 1 (FSDP2 + EP), or " + _ZERO
        )
    if name == "moe_bias_head" and parallel.tp_size > 1 and getattr(model_config, "tie_word_embeddings", False):
        return (
            "moe_bias_head with parallel.tp_size > 1 keeps the output embedding whole on every rank, but this model "
            "ties it to the tensor-parallel input embedding; use tp_size: 1 (FSDP2 + EP)"
        )
    if name not in _WORKS:
        return f"{name} has not been verified under expert parallelism; " + _ZERO
    return None


def check_methods(methods, parallel: ParallelConfig, model_config) -> None:
    """Refuse, before any weight loads, a method block that cannot run under `parallel`
    (`methods` a MoESFTConfig, resolved here for the model, so blocks that environment
    variables turn on count too)."""
    for method, block in enabled_methods(resolve_config(methods, model_config)):
        reason = _refusal(method.name, block, parallel, model_config)
        if reason is not None:
            raise ConfigError(f"parallel (ep_size={parallel.ep_size}, tp_size={parallel.tp_size}): {reason}")


def check_job(
    parallel: ParallelConfig,
    model_config,
    methods,
    *,
    deepspeed: str | None,
    training: dict,
    resuming: bool,
    world: int | None = None,
) -> ParallelConfig:
    """Everything `moe-sft train` must check for a `parallel:` block before loading weights;
    returns the block resolved for `world` ranks (default: the launcher's WORLD_SIZE)."""
    if deepspeed is not None:
        raise ConfigError(
            f"parallel: and deepspeed: {deepspeed} cannot be combined: expert parallelism shards the model with "
            "transformers' FSDP2 / tensor parallelism, DeepSpeed ZeRO would partition the same parameters again; "
            "drop one of the two"
        )
    if resuming:
        raise ConfigError(
            "--resume with parallel: the Trainer cannot restore the optimizer state of a model sharded at load time; "
            "start a new run from the last saved model (model.path=<output_dir>/checkpoint-N)"
        )
    if training.get("save_strategy", "steps") != "no" and not training.get("save_only_model", False):
        raise ConfigError(
            "parallel: the Trainer cannot checkpoint the optimizer state of a model sharded at load time; set "
            "training.save_only_model: true (checkpoints keep the weights only) or training.save_strategy: no"
        )
    if parallel.tp_size > 1 and not torch.accelerator.is_available():
        raise ConfigError(
            f"parallel.tp_size = {parallel.tp_size} on a machine without GPUs: the Trainer hands tensor parallelism to "
            "accelerate's ParallelismConfig, which refuses CPU processes (DistributedType.MULTI_CPU); on CPU use "
            "tp_size: 1 (FSDP2 + EP)"
        )
    resolved = parallel.resolve(world if world is not None else distributed_world_size())
    check_model(resolved, model_config)
    check_methods(methods, resolved, model_config)
    return resolved


# ---- loading -----------------------------------------------------------------------------------
def distributed_config(parallel: ParallelConfig, methods, model_config):
    """transformers' `DistributedConfig` for `parallel` (resolved) and the method blocks. With
    the MoE-Bias head and tensor parallelism, the output embedding stays whole on every rank
    (`tp_plan` rule "replicate"): the head adds to the logits in place, which the gathered
    output of a tensor-parallel lm_head (a view made by a custom autograd function) forbids."""
    from transformers.distributed import DistributedConfig

    tp_plan = None
    head = resolve_config(methods, model_config).moe_bias_head if methods is not None else None
    if parallel.tp_size > 1 and head is not None:
        tp_plan = {"lm_head": "replicate"}
    return DistributedConfig(ep_size=parallel.ep_size, tp_size=parallel.tp_size, fsdp_size=parallel.fsdp_size, tp_plan=tp_plan)


def load_model(source, parallel: ParallelConfig, methods, **kwargs):
    """The model sharded for `parallel` (resolved) while it loads.

    source  a checkpoint folder or hub id (a patched checkpoint saved by moe_sft is restored
            patched, as `moe_sft.from_pretrained` does; its saved method blocks are checked
            first), or a model in memory (a `tiny` model), re-loaded from its state dict
    kwargs  go to `from_pretrained` (dtype, attn_implementation, experts_implementation)
    """
    from transformers import AutoConfig, PreTrainedModel

    from ..config import config_class
    from ..pretrained import from_pretrained, read_saved_config

    if isinstance(source, PreTrainedModel):
        dc = distributed_config(parallel, methods, source.config)
        model = type(source).from_pretrained(None, config=source.config, state_dict=source.state_dict(), distributed_config=dc, **kwargs)
    else:
        model_config = AutoConfig.from_pretrained(source)
        saved = read_saved_config(source) if os.path.isdir(source) else None
        if saved is not None:
            # The saved blocks are the ones the model keeps (a YAML may change them, not add or drop one).
            methods = config_class().from_dict(saved)
            check_methods(methods, parallel, model_config)
        dc = distributed_config(parallel, methods, model_config)
        model = from_pretrained(source, distributed_config=dc, **kwargs)
    logger.info(
        "moe_sft: %s loaded with expert parallelism (ep_size %d, tp_size %d, fsdp_size %d)",
        type(model).__name__, parallel.ep_size, parallel.tp_size, parallel.fsdp_size,
    )  # fmt: skip
    return model
