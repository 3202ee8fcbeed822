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

from torch import nn

from ..checkpoint import TENSORS_NAME, load_extra_tensors
from ..config import CONFIG_NAME, ConfigError, config_class
from ..plugins import Method, register_method

logger = logging.getLogger(__name__)

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


def _handle(model: nn.Module):
    from ..patching import find_handle

    handle = find_handle(model)
    if handle is None or handle.config.lora is None:
        raise ValueError(
            "get_peft_model needs a model patched with a `lora:` block: "
            "moe_sft.patch_model(model, MoESFTConfig(lora=LoraBlockConfig(...)))"
        )
    return handle


def get_peft_model(model: nn.Module):
    """Wrap a model patched with a `lora:` block in a `peft.PeftModel` (adapters at zero: the
    output equals the base model's). Parameters the patch added stay trainable, and the
    wrapper's `save_pretrained` (Trainer checkpoints, save_model) also writes the moe_sft config
    and the patch's tensors, so `load_adapter` restores the whole thing."""
    import peft

    handle = _handle(model)
    peft_model = peft.get_peft_model(model, peft_lora_config(model.config.model_type, handle.config.lora))
    _unfreeze_patch_parameters(model, handle)
    _install_save(peft_model, handle)
    return peft_model


def _unfreeze_patch_parameters(model: nn.Module, handle) -> None:
    keys = handle.state["lora"]
    for name, p in model.named_parameters():
        if name in keys:
            p.requires_grad_(True)


def _install_save(peft_model, handle) -> None:
    """PeftModel.save_pretrained, then the moe_sft config and the patch's tensors beside it."""
    from safetensors.torch import save_file

    stock_save = peft_model.save_pretrained
    keys = handle.state["lora"]

    def save_pretrained(save_directory, state_dict=None, is_main_process: bool = True, **kwargs):
        stock_save(save_directory, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        if state_dict is not None:  # the wrapper's keys (e.g. ZeRO-3 weights gathered by the Trainer)
            prefix = "base_model.model."
            source = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        else:
            source = handle.model.state_dict()
        handle.config.save(save_directory)
        if keys:
            save_file({k: source[k].detach().contiguous().cpu() for k in sorted(keys)}, str(Path(save_directory) / TENSORS_NAME))

    peft_model.save_pretrained = save_pretrained


def save_adapter(peft_model, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the PEFT adapter (adapter_config.json, adapter_model.safetensors), the moe_sft
    config, the tensors the patch added (moe_sft_tensors.safetensors) and the tokenizer, if
    given, atomically."""
    from ..io import atomic_directory

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("moe_sft: saved LoRA adapter to %s", out_dir)
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False):
    """Patch `model` (a stock base model) with the saved config, restore the patch's tensors and
    load the adapter: returns the `peft.PeftModel`, exactly as saved."""
    import peft

    from ..patching import get_handle, patch_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {CONFIG_NAME}; it was not written by moe_sft.methods.lora.save_adapter")
    if get_handle(model) is not None:
        raise ValueError("load_adapter patches the model itself; pass the stock base model")
    handle = patch_model(model, config_class().load(adapter_dir))
    load_extra_tensors(handle, adapter_dir)
    peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    if is_trainable:
        _unfreeze_patch_parameters(model, handle)
    _install_save(peft_model, handle)
    return peft_model


class Lora(Method):
    name = "lora"
    config_class = LoraBlockConfig
    exports = ("LoraBlockConfig",)

    def check(self, config, launch) -> None:
        cfg = config.lora
        if config.esft is not None:
            raise ConfigError(
                "lora and esft cannot be combined: both decide which weights train (LoRA: low-rank adapters on "
                "frozen weights, ESFT: full selected expert slices); use one of them"
            )
        if config.densemixer is not None:
            raise ConfigError(
                "lora and densemixer cannot be combined: DenseMixer's dense term reads the fused expert tensors "
                "directly, which under LoRA are not the adapted weights, and LoRA freezes the base router it trains; "
                "use densemixer without lora"
            )
        if config.frozen_router is not None and cfg.router:
            raise ConfigError("lora.router=true adapts the router while frozen_router freezes it; drop one of them")

    def apply(self, handle, block: LoraBlockConfig) -> frozenset[str]:
        """Check the family; the adapters themselves are added by `wrap` / `get_peft_model`.
        The state: the names of the tensors the patch added (PEFT renames the modules it wraps,
        so they are fixed now)."""
        if block.router and any(handle.adapter.selection_correction(m.block) is not None for m in handle.layers):
            raise ConfigError(
                f"lora.router=true is not supported for {handle.model.config.model_type}: its router holds the "
                "selection-only e_score_correction_bias, which PEFT's router wrapper hides; set lora.router=false"
            )
        peft_lora_config(handle.model.config.model_type, block)  # fails now on an unknown family
        return frozenset(handle.extra_keys())

    def wrap(self, model, handle, state):
        return get_peft_model(model)


register_method(Lora())
