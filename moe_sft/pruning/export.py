"""Remove-mode pruning: a physically smaller checkpoint that stock transformers loads alone.

In every sparse MoE layer the router rows, the expert slices (gate_up_proj, down_proj) and any
other per-expert router tensor (DeepSeek-V3 / GLM `e_score_correction_bias`) of the pruned
experts are dropped, and the family's expert-count field (`FamilyAdapter.expert_count_field`:
num_experts, num_local_experts or n_routed_experts) is rewritten. The surviving experts keep
their order, so the smaller model computes what the mask model computes.

Constraints, checked before any work:
- the same number of experts pruned in every MoE layer (one expert count in the config);
- at least top_k experts left;
- group-limited routing (DeepSeek-V2 group_limited_greedy, DeepSeek-V3 / GLM noaux_tc):
  groups are contiguous blocks of E / n_group experts, so the same number must be pruned in
  every group of every layer; then n_group still divides the new count and each group keeps
  exactly its own survivors, in order, and the group scores (max, or sum of the top 2) match
  the mask model's. Each group must keep at least one expert (two for the top-2-sum score).
  Other selections are refused (use mask mode for them);
- a model patched with a training method is refused: stock transformers cannot run its extra
  tensors. Experts it already masks (`routing.disabled_experts`) are removed too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..adapters import get_adapter
from ..config import ConfigError
from ..io import atomic_directory
from ..plugins import enabled_methods
from ..patching import get_handle
from .mask import check_selection, disabled_experts, merge, write_metadata
from .strategies import Selection

logger = logging.getLogger(__name__)


def check_removable(model, selection: Selection) -> int:
    """Raise ConfigError unless `selection` can be removed physically; returns the new expert count."""
    handle = get_handle(model)
    if handle is not None:
        methods = [m.name for m, _ in enabled_methods(handle.config)]
        if methods:
            raise ConfigError(
                f"remove mode exports a stock checkpoint, but this model is patched with {', '.join(methods)}, whose "
                "tensors stock transformers cannot run; use --mode mask"
            )
    check_selection(model, selection)
    adapter = get_adapter(model)
    if not adapter.expert_count_field:
        raise ConfigError(
            f"{type(adapter).__name__} names no expert_count_field (the config field to rewrite), so remove mode "
            "cannot export this family; use --mode mask"
        )
    spec = adapter.router_spec(model.config)
    layers = adapter.moe_layer_indices(model)
    counts = {layer: len(set(selection.get(layer, ()))) for layer in layers}
    if len(set(counts.values())) != 1 or not counts[layers[0]]:
        raise ConfigError(
            f"remove mode needs the same number of experts pruned in every MoE layer (the config has one expert "
            f"count), got {counts} (layer: count); use --ratio/--num with least_used, most_used or random, or --mode mask"
        )
    new_count = spec.num_experts - counts[layers[0]]
    if spec.group_score != "none":
        size = spec.num_experts // spec.n_group
        for layer in layers:
            per_group = [sum(1 for e in selection[layer] if e // size == g) for g in range(spec.n_group)]
            if len(set(per_group)) != 1:
                raise ConfigError(
                    f"layer {layer}: {adapter.model_types[0]} routes group-limited ({spec.n_group} groups of {size} "
                    f"experts), so remove mode must prune the same number in every group; this selection prunes "
                    f"{per_group} per group. Use --mode mask (exact for any selection)"
                )
        need = 2 if spec.group_score == "top2_sum" else 1
        if new_count // spec.n_group < need:
            raise ConfigError(
                f"remove mode would leave {new_count // spec.n_group} expert(s) per group; the "
                f"{spec.group_score} group score needs at least {need}"
            )
    return new_count


@torch.no_grad()
def _drop_experts(module: nn.Module, keep: torch.Tensor, num_experts: int) -> None:
    """Keep rows `keep` of every tensor of `module` (not its children) indexed by expert."""
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == num_experts:
            module._parameters[name] = nn.Parameter(p.index_select(0, keep.to(p.device)), requires_grad=p.requires_grad)
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == num_experts:
            module._buffers[name] = b.index_select(0, keep.to(b.device))


def export_removed(model, selection: Selection, out_dir: str | os.PathLike, *, tokenizer=None, metadata: dict | None = None,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Save `model` without the experts in `selection` (plus any it already masks) to `out_dir`.

    The model is consumed: its patch is reverted and its expert tensors are cut in place
    (no second copy of the weights), so do not use it afterwards."""
    selection = merge(disabled_experts(model), selection)
    new_count = check_removable(model, selection)
    adapter = get_adapter(model)
    E = adapter.router_spec(model.config).num_experts
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        handle = get_handle(model)
        if handle is not None:
            handle.revert()
        layers = adapter.decoder_layers(model)
        for layer, ids in selection.items():
            block = layers[layer].mlp
            keep = torch.tensor(sorted(set(range(E)) - set(ids)))  # survivors keep their order
            _drop_experts(block.gate, keep, E)
            _drop_experts(block.experts, keep, E)
        setattr(model.config, adapter.expert_count_field, new_count)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_metadata(tmp, metadata, mode="remove", selection=selection)
    logger.info("moe_sft: removed %d of %d experts per MoE layer; saved %s=%d to %s", E - new_count, E,
                adapter.expert_count_field, new_count, out_dir)  # fmt: skip
    return Path(out_dir)
