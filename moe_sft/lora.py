"""LoRA on attention and the fused experts (PEFT), a parameter-efficient baseline.

transformers 5 stores the routed experts as fused 3-D tensors, so they are adapted through
PEFT's `target_parameters` (one rank-r pair per expert slice) while attention projections are
ordinary `target_modules` (names per family below, not a regex). The router can be adapted
too (`router: true` -> target_parameters `mlp.gate.weight`).

How it composes with the patch: `patch_model(model, cfg)` with a `lora:` block checks the
combination and the family; `get_peft_model(model)` then wraps the *patched* model in a
`peft.PeftModel` (the handle stays on the base model and is reachable through the wrapper).
Tensors the patch added (condenser biases, ...) keep working; parameters the patch added stay
trainable next to the adapters and are saved with them by `save_adapter`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import CONFIG_NAME, ConfigError, MoESFTConfig
from .methods import Method, register_method

logger = logging.getLogger(__name__)

EXTRA_FILE = "moe_sft_extra.safetensors"

# Attention projections per model_type (PEFT matches these as module-name suffixes).
ATTENTION_TARGETS: dict[str, list[str]] = {
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmoe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # Multi-head latent attention: q_proj, or q_a_proj/q_b_proj when q_lora_rank is set.
    "deepseek_v2": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "deepseek_v3": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    # Hybrid: full-attention layers + Gated DeltaNet (linear attention) layers.
    "qwen3_next": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"],
}
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER_TARGETS = ["mlp.gate.weight"]


@dataclasses.dataclass
class LoraBlockConfig:
    """`lora:` block (maps onto `peft.LoraConfig`).

    r, alpha, dropout, use_rslora   as in peft (dropout applies to attention only; PEFT cannot
                    apply dropout to parameter-targeted experts, so it must be 0 with experts)
    attention       adapt the family's attention projections (ATTENTION_TARGETS)
    experts         adapt the fused routed experts (gate_up_proj, down_proj)
    router          adapt the router weight too
    target_modules  replace the family's attention module names
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    attention: bool = True
    experts: bool = True
    router: bool = False
    target_modules: list[str] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not (self.attention or self.experts or self.router):
            raise ConfigError("lora: attention, experts and router are all false; enable at least one")
        if self.dropout and (self.experts or self.router):
            raise ConfigError(
                f"lora.dropout={self.dropout}: PEFT cannot apply dropout to parameter-targeted experts/router; "
                "set lora.dropout=0 or lora.experts=false and lora.router=false"
            )


def peft_lora_config(model_type: str, cfg: LoraBlockConfig):
    """The `peft.LoraConfig` for `cfg` on a model of `model_type`."""
    import peft

    modules: list[str] = []
    if cfg.attention:
        if cfg.target_modules is not None:
            modules = list(cfg.target_modules)
        elif model_type in ATTENTION_TARGETS:
            modules = ATTENTION_TARGETS[model_type]
        else:
            raise ConfigError(
                f"lora: no attention module names known for model_type {model_type!r} "
                f"(known: {sorted(ATTENTION_TARGETS)}); set lora.target_modules"
            )
    params = (EXPERT_TARGETS if cfg.experts else []) + (ROUTER_TARGETS if cfg.router else [])
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=modules,
        target_parameters=params or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(handle, cfg: LoraBlockConfig) -> None:
    """Check the combination; the adapters themselves are added by `get_peft_model`."""
    config = handle.config
    if getattr(config, "esft", None) is not None:
        raise ConfigError(
            "lora and esft cannot be combined: both decide which weights train (LoRA: low-rank adapters on "
            "frozen weights, ESFT: full selected expert slices); use one of them"
        )
    if getattr(config, "densemixer", None) is not None:
        raise ConfigError(
            "lora and densemixer cannot be combined: DenseMixer's dense term reads the fused expert tensors "
            "directly, which under LoRA are not the adapted weights, and LoRA freezes the base router it trains; "
            "use densemixer without lora"
        )
    if getattr(config, "frozen_router", None) is not None and cfg.router:
        raise ConfigError("lora.router=true adapts the router while frozen_router freezes it; drop one of them")
    if cfg.router and any(handle.adapter.selection_correction(m.block) is not None for m in handle.layers):
        raise ConfigError(
            f"lora.router=true is not supported for {handle.model.config.model_type}: its router holds the "
            "selection-only e_score_correction_bias, which PEFT's router wrapper hides; set lora.router=false"
        )
    peft_lora_config(handle.model.config.model_type, cfg)  # fails now on an unknown family
    handle.lora_extra_keys = frozenset(handle.extra_state_dict())

    def undo():
        del handle.lora_extra_keys

    handle.add_undo(undo)


def _handle(model: nn.Module):
    from .patching import get_handle

    handle = get_handle(model)
    if handle is None or handle.config.lora is None:
        raise ValueError(
            "get_peft_model needs a model patched with a `lora:` block: "
            "moe_sft.patch_model(model, MoESFTConfig(lora=LoraBlockConfig(...)))"
        )
    return handle


def get_peft_model(model: nn.Module):
    """Wrap a model patched with a `lora:` block in a `peft.PeftModel` (adapters at zero: the
    output equals the base model's). Parameters the patch added stay trainable."""
    import peft

    handle = _handle(model)
    peft_model = peft.get_peft_model(model, peft_lora_config(model.config.model_type, handle.config.lora))
    _unfreeze_patch_parameters(model, handle)
    return peft_model


def _unfreeze_patch_parameters(model: nn.Module, handle) -> None:
    for name, p in model.named_parameters():
        if name in handle.lora_extra_keys:
            p.requires_grad_(True)


def save_adapter(peft_model, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the PEFT adapter (adapter_config.json, adapter_model.safetensors), the moe_sft
    config, the tensors the patch added (moe_sft_extra.safetensors) and the tokenizer, if
    given, atomically."""
    from safetensors.torch import save_file

    from .io import atomic_directory

    base = peft_model.get_base_model()
    handle = _handle(base)
    out_dir = Path(out_dir)
    state = base.state_dict()
    extra = {k: state[k].detach().contiguous().cpu() for k in sorted(handle.lora_extra_keys)}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        handle.config.save(tmp)
        if extra:
            save_file(extra, str(Path(tmp) / EXTRA_FILE))
    logger.info("moe_sft: saved LoRA adapter (+%d moe_sft tensors) to %s", len(extra), out_dir)
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False):
    """Patch `model` (a stock base model) with the saved config, restore the patch's tensors and
    load the adapter: returns the `peft.PeftModel`, exactly as saved."""
    import peft
    from safetensors.torch import load_file

    from .patching import get_handle, patch_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {CONFIG_NAME}; it was not written by moe_sft.lora.save_adapter")
    if get_handle(model) is not None:
        raise ValueError("load_adapter patches the model itself; pass the stock base model")
    config = MoESFTConfig.load(adapter_dir)
    handle = patch_model(model, config)
    if handle.lora_extra_keys:
        found = load_file(str(adapter_dir / EXTRA_FILE))
        missing = sorted(handle.lora_extra_keys - set(found))
        if missing:
            raise FileNotFoundError(f"{adapter_dir}/{EXTRA_FILE} lacks {missing[:3]}")
        state = model.state_dict()
        with torch.no_grad():
            for k in handle.lora_extra_keys:
                state[k].copy_(found[k])
    peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    if is_trainable:
        _unfreeze_patch_parameters(model, handle)
    return peft_model


register_method(Method(name="lora", apply=apply_lora))
