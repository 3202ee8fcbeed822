"""Which experts to prune, per MoE layer, from an `ExpertProfile`.

    least_used     the n experts per layer with the fewest selections (the long tail);
                   ties broken by smaller gate mass, then expert id
    most_used      the n experts per layer with the most selections (ties: larger gate mass)
    super_experts  experts whose max |down_proj output| is above the 99.5th percentile of all
                   experts' maxima and above a tenth of the largest, in the first 75% of the
                   decoder layers (Su et al., arXiv 2507.23279); the count per layer follows
                   from the rule, so no ratio/num
    random         per layer, as many experts as the strategy it controls prunes there, drawn
                   uniformly with a seeded generator (the "less capacity" control)

n comes from `num` (experts per layer) or `ratio` (round(ratio * E)). Experts listed in
`exclude` (already pruned) are never candidates. A selection is {layer index: sorted ids}.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .profile import ExpertProfile

STRATEGIES = ("least_used", "most_used", "super_experts", "random")
CONTROLLABLE = ("least_used", "most_used", "super_experts")
SUPER_QUANTILE = 0.995
SUPER_REL_MAX = 0.1
SUPER_LAYER_FRACTION = 0.75

Selection = dict[int, list[int]]


def count_per_layer(profile: ExpertProfile, ratio: float | None, num: int | None) -> int:
    """n from exactly one of `ratio` (fraction of the E experts) and `num`."""
    E = profile.num_experts
    if (ratio is None) == (num is None):
        raise ConfigError(f"give exactly one of ratio (fraction of the {E} experts per layer) and num (experts per layer); got ratio={ratio}, num={num}")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ConfigError(f"ratio={ratio}: must be in (0, 1), the fraction of each layer's {E} experts to prune")
        num = round(ratio * E)
        if num == 0:
            raise ConfigError(f"ratio={ratio} of {E} experts rounds to 0 experts per layer; use a ratio >= {0.5 / E:.3g} or num")
    if num < 1:
        raise ConfigError(f"num={num}: must prune at least one expert per layer")
    return num


def _ranked(profile: ExpertProfile, layer: int, descending: bool) -> list[int]:
    row = profile.row(layer)
    counts, mass = profile.counts[row].tolist(), profile.gate_mass[row].tolist()
    sign = -1 if descending else 1
    return sorted(range(profile.num_experts), key=lambda e: (sign * counts[e], sign * mass[e], e))


def super_experts(profile: ExpertProfile) -> Selection:
    """Experts with massive down_proj outputs, by Su et al.'s rule (see the module docstring)."""
    values = profile.max_abs_output.double()  # (L, E)
    threshold = max(torch.quantile(values.flatten(), SUPER_QUANTILE).item(), SUPER_REL_MAX * values.max().item())
    out = {}
    for row, layer in enumerate(profile.layers):
        if layer < SUPER_LAYER_FRACTION * profile.num_hidden_layers:
            out[layer] = [e for e in range(profile.num_experts) if values[row, e].item() > threshold]
    return out


def select_experts(
    profile: ExpertProfile,
    strategy: str,
    *,
    ratio: float | None = None,
    num: int | None = None,
    seed: int = 0,
    controls: str = "least_used",
    exclude: Selection | None = None,
) -> Selection:
    """The experts `strategy` prunes in each MoE layer of `profile` (layers with none are left out)."""
    exclude = {int(k): set(v) for k, v in (exclude or {}).items()}
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "super_experts":
        if ratio is not None or num is not None:
            raise ConfigError(f"super_experts takes no ratio/num (got ratio={ratio}, num={num}): its rule decides the count per layer")
        found = super_experts(profile)
        out = {layer: [e for e in ids if e not in exclude.get(layer, ())] for layer, ids in found.items()}
    elif strategy == "random":
        if controls not in CONTROLLABLE:
            raise ConfigError(f"random controls {controls!r}; choose one of {', '.join(CONTROLLABLE)}")
        target = select_experts(profile, controls, ratio=ratio, num=num, exclude=exclude)
        g = torch.Generator().manual_seed(seed)
        out = {}
        for layer in profile.layers:  # fixed order: the same seed gives the same draw
            candidates = [e for e in range(profile.num_experts) if e not in exclude.get(layer, ())]
            picks = torch.randperm(len(candidates), generator=g)[: len(target.get(layer, []))]
            out[layer] = [candidates[i] for i in picks.tolist()]
    else:
        n = count_per_layer(profile, ratio, num)
        out = {}
        for layer in profile.layers:
            ranked = [e for e in _ranked(profile, layer, strategy == "most_used") if e not in exclude.get(layer, ())]
            out[layer] = ranked[:n]
    out = {layer: sorted(ids) for layer, ids in out.items() if ids}
    check_leaves_top_k(profile, out, exclude)
    return out


def check_leaves_top_k(profile: ExpertProfile, selection: Selection, exclude: Selection | None = None) -> None:
    """Refuse a selection that leaves some layer fewer than top_k experts."""
    for layer, ids in selection.items():
        gone = set(ids) | set((exclude or {}).get(layer, ()))
        if profile.num_experts - len(gone) < profile.top_k:
            raise ConfigError(
                f"layer {layer}: pruning {len(gone)} of {profile.num_experts} experts leaves "
                f"{profile.num_experts - len(gone)}, fewer than top_k={profile.top_k}; prune fewer (lower ratio/num)"
            )


def fraction_pruned(profile: ExpertProfile, selection: Selection) -> float:
    """Pruned experts over all routed experts of all MoE layers."""
    return sum(len(v) for v in selection.values()) / (len(profile.layers) * profile.num_experts)


def describe(selection: Selection) -> str:
    counts = sorted({len(v) for v in selection.values()})
    total = sum(len(v) for v in selection.values())
    per_layer = f"{counts[0]} per layer" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} per layer"
    return f"{total} experts in {len(selection)} layers ({per_layer})" if total else "no experts"

