"""Patch a model instance explicitly and reversibly.

`patch_model(model, config)` swaps each sparse MoE block's class for a subclass running the
generic forward, attaches a `MoEControls` module (`block.moe_sft`) holding that layer's
extension-point state, then lets each enabled method install itself. `PatchHandle.revert()`
undoes all of it in reverse order, leaving the stock model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from .adapters import FamilyAdapter, PatchError, get_adapter
from .config import ConfigError, MoESFTConfig
from .methods import enabled_methods, resolve_config
from .moe_forward import patched_class
from .routing import MoEControls, UsageStats

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_moe_sft_handle"


@dataclasses.dataclass
class MoELayer:
    """One patched sparse MoE block: its decoder-layer index, module name and controls."""

    layer_idx: int
    name: str
    block: nn.Module
    controls: MoEControls


class PatchHandle:
    """What `patch_model` returns: the patched layers, their controls, and `revert()`."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, config: MoESFTConfig):
        self.model = model
        self.adapter = adapter
        self.config = config
        self.layers: list[MoELayer] = []
        self._undo: list[Callable[[], None]] = []
        self._stock_keys: frozenset[str] = frozenset(model.state_dict().keys())
        self.active = True

    # ---- for methods -------------------------------------------------------------------
    def add_undo(self, fn: Callable[[], None]) -> None:
        """Register an action that `revert()` runs (in reverse order of registration)."""
        self._undo.append(fn)

    # ---- for users ---------------------------------------------------------------------
    def usage(self, reset: bool = False) -> dict[int, UsageStats]:
        """Usage statistics per MoE layer index (layers that track usage only)."""
        out = {m.layer_idx: m.controls.usage for m in self.layers if m.controls.usage is not None}
        if reset:
            for stats in out.values():
                stats.reset()
        return out

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the patch added to the model's state dict (saved in patched checkpoints)."""
        return {k: v for k, v in self.model.state_dict().items() if k not in self._stock_keys}

    def revert(self) -> None:
        """Restore the stock model: undo every method, then every block swap."""
        if not self.active:
            raise PatchError("this patch was already reverted")
        while self._undo:
            self._undo.pop()()
        setattr(self.model, _HANDLE_ATTR, None)
        delattr(self.model, _HANDLE_ATTR)
        self.active = False
        logger.info("moe_sft: reverted %d MoE layers to the stock %s", len(self.layers), type(self.model).__name__)

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"PatchHandle({type(self.model).__name__}, {len(self.layers)} MoE layers, {state})"


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active `PatchHandle` of `model`, or None if it is not patched."""
    return getattr(model, _HANDLE_ATTR, None)


def _patch_block(handle: PatchHandle, layer_idx: int, name: str, block: nn.Module) -> MoELayer:
    adapter = handle.adapter
    spec = adapter.router_spec(handle.model.config)
    original_cls = type(block)
    controls = MoEControls(spec, layer_idx).to(block.gate.weight.device)
    block.__class__ = patched_class(original_cls)
    block._moe_sft_adapter = adapter
    block.moe_sft = controls

    def undo():
        del block.moe_sft
        del block._moe_sft_adapter
        block.__class__ = original_cls

    handle.add_undo(undo)
    return MoELayer(layer_idx, name, block, controls)


def apply_routing_config(handle: PatchHandle) -> None:
    """Set each layer's `disabled` buffer from `handle.config.routing` (validated against the
    model: layer and expert ids exist, at least top_k experts survive)."""
    cfg = handle.config.routing
    if cfg is None:
        return
    by_idx = {m.layer_idx: m for m in handle.layers}
    for key, experts in (cfg.disabled_experts or {}).items():
        layer_idx = int(key)
        if layer_idx not in by_idx:
            raise ConfigError(
                f"routing.disabled_experts names layer {layer_idx}, which is not a sparse MoE layer; "
                f"MoE layers: {sorted(by_idx)}"
            )
        ctl = by_idx[layer_idx].controls
        E, k = ctl.spec.num_experts, ctl.spec.top_k
        bad = [e for e in experts if not 0 <= e < E]
        if bad:
            raise ConfigError(f"routing.disabled_experts[{layer_idx}]: expert ids {bad} out of range 0..{E - 1}")
        if E - len(set(experts)) < k:
            raise ConfigError(
                f"routing.disabled_experts[{layer_idx}] disables {len(set(experts))} of {E} experts, leaving fewer "
                f"than top_k={k}"
            )
        mask = torch.zeros(E, dtype=torch.bool, device=by_idx[layer_idx].block.gate.weight.device)
        mask[list(experts)] = True
        ctl.set_tensor("disabled", mask)


def patch_model(model: nn.Module, config: MoESFTConfig | None = None) -> PatchHandle:
    """Patch `model` (a transformers MoE causal LM instance) in place and return its handle.

    Raises PatchError for an unsupported family, an unexpected module layout, or a model that
    is already patched. `config=None` means `MoESFTConfig()`: every method off, stock outputs.
    """
    config = config if config is not None else MoESFTConfig()
    if not isinstance(config, MoESFTConfig):
        raise TypeError(f"config must be a moe_sft.MoESFTConfig, got {type(config).__name__}")
    if get_handle(model) is not None:
        raise PatchError(
            f"{type(model).__name__} is already patched by moe_sft; call handle.revert() before patching again"
        )
    config = resolve_config(config)  # e.g. MOE_BIAS_* environment overrides, read now
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    moe_indices = adapter.moe_layer_indices(model)
    if not moe_indices:
        raise PatchError(
            f"{type(model).__name__}: no `{adapter.block_class_name}` found at `layers[i].mlp` "
            f"(checked {len(layers)} decoder layers)"
        )
    for i in moe_indices:
        adapter.validate_block(layers[i].mlp, f"layers[{i}].mlp", model.config)

    handle = PatchHandle(model, adapter, config)
    prefix = _layers_prefix(model, layers)
    try:
        for i in moe_indices:
            handle.layers.append(_patch_block(handle, i, f"{prefix}{i}.mlp", layers[i].mlp))
        setattr(model, _HANDLE_ATTR, handle)
        apply_routing_config(handle)
        if config.track_usage:
            for m in handle.layers:
                m.controls.track_usage(m.block.gate.weight.device)
        for method, block_config in enabled_methods(config):
            method.apply(handle, block_config)
            logger.info("moe_sft: %s enabled", method.name)
    except BaseException:
        while handle._undo:
            handle._undo.pop()()
        if get_handle(model) is handle:
            delattr(model, _HANDLE_ATTR)
        raise
    logger.info(
        "moe_sft: patched %d MoE layers of %s (%s); dense layers: %s",
        len(handle.layers),
        type(model).__name__,
        model.config.model_type,
        [i for i in range(len(layers)) if i not in moe_indices] or "none",
    )
    return handle


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    return "layers."
