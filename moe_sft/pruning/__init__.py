"""Expert-pruning ablations: profile expert usage, prune by strategy (mask or remove), run grids.

    from moe_sft.pruning import profile_model, select_experts, apply_mask, export_removed
    profile = profile_model(model, tokenizer, texts)                  # counts, gate mass, max |output|
    pruned = select_experts(profile, "least_used", ratio=0.25)         # {layer: [expert ids]}
    apply_mask(model, pruned)                                          # router logit -inf, in place
    export_removed(model, pruned, "pruned-model")                      # a smaller stock checkpoint

- `profile`: the profiling pass, `ExpertProfile` (JSON) and its plots
- `strategies`: least_used, most_used, super_experts, random (seeded control)
- `mask`: mask mode (the foundation's `routing.disabled_experts`), `masked(...)` context
- `export`: remove mode (a physically smaller checkpoint for stock transformers)
- `ablate`: the `moe-sft ablate` grid, with resume, CSV, Markdown and plot
"""

from .export import check_removable, export_removed
from .mask import apply_mask, disabled_experts, masked, save_masked
from .profile import ExpertProfile, profile_model, read_texts, write_profile
from .strategies import STRATEGIES, fraction_pruned, select_experts, super_experts

__all__ = [
    "STRATEGIES",
    "ExpertProfile",
    "apply_mask",
    "check_removable",
    "disabled_experts",
    "export_removed",
    "fraction_pruned",
    "masked",
    "profile_model",
    "read_texts",
    "save_masked",
    "select_experts",
    "super_experts",
    "write_profile",
]
