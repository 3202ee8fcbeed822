"""The generic patched MoE block forward: route -> select -> combine, for every family.

A patched block keeps its own modules and parameters; only its class is swapped for a
subclass whose `forward` is `moe_block_forward`. The experts still run through the
block's own `experts` module, i.e. through whichever experts implementation transformers
dispatches to (eager, grouped_mm, batched_mm), in one call for routed and forced experts.
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import route, should_record_usage


def moe_block_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    adapter = self._moe_sft_adapter
    ctl = self.moe_sft
    shape = hidden_states.shape  # (B, S, H)
    x = adapter.prepare_input(self, hidden_states.reshape(-1, shape[-1]))  # (T, H)

    logits = adapter.router_logits(self, x)  # (T, E), seen by output_router_logits hooks
    routing = route(ctl.spec, logits, ctl, adapter.selection_correction(self), x)
    if ctl.observers:
        training = should_record_usage(self)
        for observe, training_only in ctl.observers:
            if training or not training_only:
                observe(ctl.layer_idx, routing, x, self)

    # (T, H): routed + forced experts in one pass of the fused experts module.
    weights = routing.weights.detach() if ctl.detach_combine_weights else routing.weights
    y = self.experts(x, routing.index, weights)
    for hook in ctl.output_hooks:
        y = hook(self, x, routing, y)
    shared = adapter.shared_output(self, x)
    if shared is not None:
        y = y + shared
    return y.reshape(shape)


_PATCHED_CLASSES: dict[type, type] = {}


def patched_class(block_cls: type) -> type:
    """A subclass of `block_cls` whose forward is the generic one (one per class, cached)."""
    if block_cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[block_cls] = type(
            f"MoESFT{block_cls.__name__}",
            (block_cls,),
            {"forward": moe_block_forward, "__module__": __name__, "_moe_sft_original_class": block_cls},
        )
    return _PATCHED_CLASSES[block_cls]
