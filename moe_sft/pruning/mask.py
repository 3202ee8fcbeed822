"""Mask-mode pruning: pruned experts get router logit -inf (the foundation's
`routing.disabled_experts`), so no token selects them and the scores renormalise among the
survivors before the family's own top-k renormalisation and scaling.

A model that is already patched (e.g. a fine-tuned condenser checkpoint) keeps its methods:
the new experts are added to its `routing.disabled_experts` (union with any already there)
and its config is updated in place, so `moe_sft.save_pretrained` saves a checkpoint that
`moe_sft.from_pretrained` restores with the mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

from ..adapters import get_adapter
from ..config import ConfigError, RoutingConfig
from ..io import atomic_directory, atomic_write_text
from ..patching import apply_routing_config, check_routing_budget, get_handle, patch_model
from .strategies import Selection

PRUNING_JSON = "pruning.json"


def disabled_experts(model) -> Selection:
    """The experts `model` already masks ({} for a stock or unmasked model)."""
    handle = get_handle(model)
    routing = handle.config.routing if handle is not None else None
    return {int(k): sorted(v) for k, v in ((routing and routing.disabled_experts) or {}).items()}


def merge(a: Selection, b: Selection) -> Selection:
    return {layer: sorted(set(a.get(layer, ())) | set(b.get(layer, ()))) for layer in sorted(set(a) | set(b))}


def check_selection(model, selection: Selection) -> None:
    """Refuse layers that are not sparse MoE layers, ids out of range, and layers left with
    fewer than top_k experts, naming the offending values."""
    adapter = get_adapter(model)
    spec = adapter.router_spec(model.config)
    moe_layers = adapter.moe_layer_indices(model)
    for layer, ids in selection.items():
        if layer not in moe_layers:
            raise ConfigError(f"pruned experts name layer {layer}, which is not a sparse MoE layer; MoE layers: {moe_layers}")
        bad = [e for e in ids if not 0 <= e < spec.num_experts]
        if bad:
            raise ConfigError(f"layer {layer}: expert ids {bad} out of range 0..{spec.num_experts - 1}")
        if spec.num_experts - len(set(ids)) < spec.top_k:
            raise ConfigError(
                f"layer {layer}: pruning {len(set(ids))} of {spec.num_experts} experts leaves fewer than "
                f"top_k={spec.top_k}; prune fewer"
            )


def apply_mask(model, selection: Selection):
    """Mask `selection` in `model` (patching it, every method off, if it is not patched);
    returns the PatchHandle. Already-masked experts stay masked."""
    merged = merge(disabled_experts(model), selection)
    check_selection(model, merged)
    handle = get_handle(model) or patch_model(model)
    routing = dataclasses.replace(handle.config.routing or RoutingConfig(), disabled_experts=merged)
    handle.config = dataclasses.replace(handle.config, routing=routing)
    apply_routing_config(handle)  # sets each layer's `disabled` buffer from the config
    check_routing_budget(handle)  # with the model's other methods (e.g. condensers) as well
    handle.refresh_extra_keys()  # the `disabled` buffers are saved with the patch
    return handle


@contextlib.contextmanager
def masked(model, selection: Selection):
    """Mask `selection` for the duration of the block, then restore the model's own masks
    and config (and revert the patch if the model was not patched before)."""
    handle = get_handle(model)
    own_patch = handle is None
    old_config = handle.config if handle is not None else None
    old = {m.layer_idx: (m.controls.disabled, m.controls.expert_ids.get("disabled")) for m in handle.layers} if handle is not None else {}
    handle = apply_mask(model, selection)
    try:
        yield handle
    finally:
        if own_patch:
            handle.revert()
        else:
            handle.config = old_config
            for m in handle.layers:
                tensor, ids = old[m.layer_idx]
                if tensor is None:
                    del m.controls.disabled  # drop the buffer ...
                    m.controls.disabled = None  # ... and leave the extension point unset
                    m.controls.expert_ids.pop("disabled", None)
                else:
                    m.controls.set_tensor("disabled", tensor)
                    m.controls.expert_ids["disabled"] = ids
            handle.refresh_extra_keys()


def save_masked(model, selection: Selection, out_dir: str | os.PathLike, *, tokenizer=None, metadata: dict | None = None,
                overwrite: bool = False) -> Path:  # fmt: skip
    """Mask `selection` in `model` and save it as a patched checkpoint (plus pruning.json)."""
    from ..pretrained import save_pretrained

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        apply_mask(model, selection)
        save_pretrained(model, tmp, tokenizer=tokenizer, overwrite=True)
        write_metadata(tmp, metadata, mode="mask", selection=disabled_experts(model))
    return Path(out_dir)


def write_metadata(directory: Path, metadata: dict | None, *, mode: str, selection: Selection) -> None:
    data = {**(metadata or {}), "mode": mode, "pruned": {str(k): v for k, v in selection.items()}}
    atomic_write_text(directory / PRUNING_JSON, json.dumps(data, indent=2) + "\n")
