"""Bias-driven sparsification + always-active condenser experts.

Reference: "Preserving Long-Tailed Expert Information in Mixture-of-Experts Tuning"
(arXiv 2604.23036). Written against the generic routing extension points (`MoEControls`),
so it runs on every supported family with a single MoE forward per layer.

(a) Router bias b (E,) per MoE layer, an fp32 buffer with no gradient:
    placement "logits":    p = f(z + b) for selection and gate weights
    placement "selection": T = TopK(s + b), gate weights from the unbiased s
    once per optimizer step, with u the step's usage summed over micro-batches and ranks:
    sparsify: b <- b + gamma * sign(u - mean(u));  balance: b <- b + gamma * sign(mean(u) - u)
(b) r condenser experts per layer, active for every token:
    source "longtail": r existing experts (lowest bias after phase 1, or lowest usage in a
                       profile), appended after the routed picks; never also routed
    source "new":      r new SwiGLU experts outside the fused tensors, initialised from the
                       usage-weighted mean of the long-tail experts, learned gate, zero output
                       scale (the model's output is unchanged at step 0)
    budget "compute_neutral": k - r routed + r condensers;  "additive": k routed + r condensers
(c) Two-phase recipe: phase 1 bias only; phase 2 (`start_phase2`) adds the condensers to the
    phase-1 model, chosen from its bias / usage, with gamma = 5e-5.

The family's load-balancing aux loss is switched off while the method is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from ..adapters import adapter_for
from ..config import ConfigError
from ..integrations.deepspeed import gathered
from ..io import atomic_write_text
from ..patching import MoELayer, PatchHandle, extend_patch, find_handle
from ..plugins import Method, register_method
from ..pretrained import from_pretrained
from ..routing import ExpertUsage, Routing

logger = logging.getLogger(__name__)

# Bias update rate gamma per family (the paper's values: Qwen-class 1e-3, DeepSeek and OLMoE 1e-4).
GAMMA_DEFAULTS: dict[str, float] = {
    "qwen2_moe": 1e-3,
    "qwen3_moe": 1e-3,
    "qwen3_next": 1e-3,
    "mixtral": 1e-3,
    "deepseek_v2": 1e-4,
    "deepseek_v3": 1e-4,
    "glm4_moe": 1e-4,
    "olmoe": 1e-4,
}
PHASE2_GAMMA = 5e-5
PROFILE_FORMAT = "moe_sft.usage_profile/1"


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class RouterBiasConfig:
    """The per-layer router bias (`condenser.bias`).

    enabled    update a router bias b (E,) per MoE layer
    placement  logits: p = f(z + b) for selection and gates; selection: T = TopK(s + b), gates
               from the unbiased s. Default by the family's score function: logits for softmax
               routers, selection for sigmoid routers (DeepSeek-V3 / GLM-4.5)
    direction  sparsify: used experts rise, the long tail sinks; balance: the opposite
               (aux-loss-free load balancing, arXiv 2408.15664)
    usage      soft: u_e = sum over tokens of p_e (with placement selection: of s_e over the
               tokens that routed to e); count: times e was a routed pick
    gamma      update rate; default from GAMMA_DEFAULTS by model_type
    clip       optional bound |b_e| <= clip
    """

    enabled: bool = True
    placement: Literal["logits", "selection"] | None = None
    direction: Literal["sparsify", "balance"] = "sparsify"
    usage: Literal["soft", "count"] = "soft"
    gamma: float | None = None
    clip: float | None = None

    def __post_init__(self):
        if self.gamma is not None and not self.gamma > 0:
            raise ConfigError(f"condenser.bias.gamma = {self.gamma}: must be > 0 (e.g. 1e-3), or null for the family default")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"condenser.bias.clip = {self.clip}: must be > 0, or null for no clipping")


@dataclasses.dataclass
class CondensersConfig:
    """The always-active condenser experts (`condenser.condensers`; absent = phase 1, bias only).

    num           r condensers per MoE layer
    source        longtail: r existing experts; new: r new SwiGLU experts
    budget        compute_neutral: top-(k-r) routed + r condensers; additive: top-k + r.
                  Default: compute_neutral for longtail, additive for new (so that the new
                  experts' zero-initialised output leaves the model unchanged at step 0)
    gate          router_prob: a condenser is weighted by its own router score p_e,
                  renormalised with the routed weights where the family renormalises;
                  learned: g_j(x) = sigmoid(u_j . x). Default: router_prob for longtail,
                  learned for new (new experts have no router score)
    allow_overlap let a longtail condenser also win a routed slot (the released code's
                  behaviour, for exact comparison with it)
    longtail_from bias: the phase-1 model's lowest-bias experts (source new: its recorded
                  usage); profile: the lowest-usage experts of the `profile` JSON file
    profile       usage profile file (see `save_usage_profile`) for longtail_from: profile
    coverage      source new: the long tail is every expert outside the smallest set of
                  most-used experts covering this fraction of the usage (at least r experts)
    experts       {layer: [expert ids]}: the chosen long tail (longtail: the r condensers;
                  new: the experts the new ones are initialised from). Filled in when chosen
                  and saved in moe_sft_config.json; set it to choose by hand
    """

    num: int = 2
    source: Literal["longtail", "new"] = "longtail"
    budget: Literal["compute_neutral", "additive"] | None = None
    gate: Literal["router_prob", "learned"] | None = None
    allow_overlap: bool = False
    longtail_from: Literal["bias", "profile"] = "bias"
    profile: str | None = None
    coverage: float = 0.9
    experts: dict[int, list[int]] | None = None

    def __post_init__(self):
        if self.num < 1:
            raise ConfigError(f"condenser.condensers.num = {self.num}: must be >= 1 (drop the condensers block for bias only)")
        if self.source == "new" and self.gate == "router_prob":
            raise ConfigError(
                "condenser.condensers.gate = 'router_prob' with source = 'new': new experts have no router "
                "score; use gate: learned (the default for new)"
            )
        if self.source == "new" and self.allow_overlap:
            raise ConfigError("condenser.condensers.allow_overlap applies to source: longtail only; new experts are never routed")
        if self.longtail_from == "profile" and not self.profile:
            raise ConfigError("condenser.condensers.longtail_from = 'profile' needs condenser.condensers.profile: path/to/usage.json")
        if self.profile and self.longtail_from != "profile":
            raise ConfigError(
                f"condenser.condensers.profile = {self.profile!r} is only read with longtail_from: profile "
                f"(got longtail_from: {self.longtail_from})"
            )
        if not 0 < self.coverage < 1:
            raise ConfigError(f"condenser.condensers.coverage = {self.coverage}: must be in (0, 1), e.g. 0.9")


@dataclasses.dataclass
class CondenserConfig:
    """The `condenser` block: router bias (phase 1) + condenser experts (phase 2)."""

    bias: RouterBiasConfig = dataclasses.field(default_factory=RouterBiasConfig)
    condensers: CondensersConfig | None = None

    def __post_init__(self):
        if not self.bias.enabled and self.condensers is None:
            raise ConfigError("condenser: bias.enabled is false and there is no condensers block, so it enables nothing")


def phase2_config(phase1: CondenserConfig | None = None, condensers: CondensersConfig | None = None) -> CondenserConfig:
    """The recipe's phase-2 block from its phase-1 block: same bias settings with gamma = 5e-5,
    condensers on (`condensers`, default `CondensersConfig()`: r = 2 long-tail, compute-neutral)."""
    phase1 = phase1 if phase1 is not None else CondenserConfig()
    bias = dataclasses.replace(phase1.bias, gamma=PHASE2_GAMMA)
    return CondenserConfig(bias=bias, condensers=condensers if condensers is not None else CondensersConfig())


# ---------------------------------------------------------------------------------------
# Per-layer state
# ---------------------------------------------------------------------------------------
def _bias_name(placement: str) -> str:
    return "logit_bias" if placement == "logits" else "selection_bias"


@dataclasses.dataclass
class CondenserState:
    """`handle.state["condenser"]`: each layer's usage since the last bias update (routed picks
    only: condensers are not routed picks). Not saved: a step never spans a checkpoint."""

    step_usage: dict[int, ExpertUsage] = dataclasses.field(default_factory=dict)


def _bias_layers(handle: PatchHandle) -> list[MoELayer]:
    cfg = handle.config.condenser
    return list(handle.layers) if cfg is not None and cfg.bias.enabled else []


def router_bias(handle: PatchHandle) -> dict[int, torch.Tensor]:
    """The router bias b (E,) of every MoE layer, by layer index."""
    name = _bias_name(handle.config.condenser.bias.placement) if _bias_layers(handle) else None
    return {m.layer_idx: getattr(m.controls, name) for m in _bias_layers(handle)}


def _install_bias(handle: PatchHandle, cfg: RouterBiasConfig, state: CondenserState) -> None:
    name = _bias_name(cfg.placement)
    for m in handle.layers:
        ctl = m.controls
        E, device = ctl.spec.num_experts, m.block.gate.weight.device
        ctl.claim(name, "condenser.bias")
        ctl.set_tensor(name, torch.zeros(E, dtype=torch.float32, device=device))
        # All routed picks since patching, summed over ranks: phase 1's usage profile.
        ctl.set_tensor("usage_total", torch.zeros(E, dtype=torch.int64, device=device))
        state.step_usage[m.layer_idx] = ExpertUsage(E, device, routed_only=True)
    handle.observe(lambda i, routing, x, block: state.step_usage[i].add(routing), training_only=True)
    logger.info(
        "moe_sft condenser: router bias on (placement %s, %s, usage %s, gamma %g%s)",
        cfg.placement, cfg.direction, cfg.usage, cfg.gamma, f", clip {cfg.clip}" if cfg.clip is not None else "",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The bias update (once per optimizer step)
# ---------------------------------------------------------------------------------------
def _handle_of(model_or_handle) -> PatchHandle:
    handle = model_or_handle if isinstance(model_or_handle, PatchHandle) else find_handle(model_or_handle)
    if handle is None or handle.config.condenser is None:
        raise ConfigError("this model is not patched with a condenser config (moe_sft.patch_model(model, MoESFTConfig(condenser=...)))")
    return handle


def reset_step_usage(model_or_handle) -> None:
    """Forget the usage recorded since the last update (e.g. forwards made before training)."""
    for usage in _handle_of(model_or_handle).state["condenser"].step_usage.values():
        usage.reset()


@torch.no_grad()
def update_router_bias(model_or_handle) -> bool:
    """Apply one bias update from the usage recorded since the last one, then reset it.

    Call exactly once per optimizer step, after `optimizer.step()` (`moe_sft.step(model)` and
    MoESFTCallback do). The usage of every layer is all-reduced (SUM) over the default process
    group when torch.distributed is initialised, so every rank computes the same update.
    Returns False (and changes nothing) when no training forward was recorded on any rank.
    """
    handle = _handle_of(model_or_handle)
    cfg = handle.config.condenser.bias
    layers = _bias_layers(handle)
    if not layers:
        return False
    steps = [handle.state["condenser"].step_usage[m.layer_idx] for m in layers]
    device = steps[0].counts.device
    soft_of = (lambda u: u.score_mass) if cfg.placement == "logits" else (lambda u: u.picked_score_mass)
    # (L, E + 1) int64: routed-pick counts and the token count; (L, E) fp32 soft usage:
    # p = f(z + b) summed over tokens (placement logits), or the score mass each expert
    # received as a routed pick (placement selection: the bias moves only the selection).
    counts = torch.stack([torch.cat([u.counts, u.tokens.view(1)]).to(device) for u in steps])
    soft = torch.stack([soft_of(u).to(device) for u in steps])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(soft, op=dist.ReduceOp.SUM)
    for u in steps:
        u.reset()
    counts, tokens = counts[:, :-1], counts[:, -1]
    if int(tokens.sum()) == 0:
        return False

    u = (counts if cfg.usage == "count" else soft).double()  # (L, E)
    step = torch.sign(u - u.mean(dim=1, keepdim=True))  # +1 above the layer mean, -1 below
    if cfg.direction == "balance":
        step = -step
    name = _bias_name(cfg.placement)
    for i, m in enumerate(layers):
        ctl = m.controls
        bias = getattr(ctl, name)
        if bias.dtype != torch.float32:
            # model.to(bf16) casts float buffers; gamma-sized steps vanish in bf16.
            logger.warning("moe_sft condenser: layer %d router bias was cast to %s; keeping it in float32", m.layer_idx, bias.dtype)
            bias = ctl.set_tensor(name, bias.float())
        bias += cfg.gamma * step[i].to(bias.device, torch.float32)
        if cfg.clip is not None:
            bias.clamp_(-cfg.clip, cfg.clip)
        ctl.usage_total += counts[i].to(ctl.usage_total.device)
    return True


# ---------------------------------------------------------------------------------------
# Condenser experts
# ---------------------------------------------------------------------------------------
class LearnedGate(nn.Module):
    """g_j(x) = sigmoid(u_j . x) for r condensers; u = 0 at start (g = 1/2 for every token)."""

    def __init__(self, hidden: int, r: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(r, hidden, dtype=dtype, device=device))  # (r, H)

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(nn.functional.linear(x, self.weight)).float()  # (T, r)


class NewCondensers(nn.Module):
    """r new SwiGLU experts outside the fused expert tensors, added to the block output:

        y += sum_j scale_j * sigmoid(u_j . x) * down_j(act(gate_j x) * up_j x)

    with the fused tensors' layout: gate_up_proj (r, 2I, H) [gate rows, then up rows],
    down_proj (r, H, I). `scale` starts at 0, so the block output is unchanged at step 0.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn, gate_std: float):
        super().__init__()
        r, _, hidden = gate_up_proj.shape
        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        self.act_fn = act_fn
        # Random u breaks the symmetry between condensers; scale = 0 keeps the output exact.
        self.gate = nn.Parameter(torch.randn(r, hidden, dtype=gate_up_proj.dtype, device=gate_up_proj.device) * gate_std)
        self.scale = nn.Parameter(torch.zeros(r, dtype=gate_up_proj.dtype, device=gate_up_proj.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, H)
        gate, up = torch.einsum("th,rih->rti", x, self.gate_up_proj).chunk(2, dim=-1)  # (r, T, I) each
        out = torch.einsum("rti,rhi->rth", self.act_fn(gate) * up, self.down_proj)  # (r, T, H)
        w = torch.sigmoid(x @ self.gate.t()) * self.scale  # (T, r)
        return torch.einsum("rth,tr->th", out, w)


def _new_condensers_hook(block: nn.Module, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> torch.Tensor:
    return y + block.moe_sft.new_condensers(x).to(y.dtype)


def read_usage_profile(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """{layer: usage (E,) float64} from a profile JSON written by `save_usage_profile`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"condenser.condensers.profile: {str(path)!r} does not exist")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        raise ConfigError(f"{path}: not a usage profile; expected {{\"format\": {PROFILE_FORMAT!r}, \"usage\": {{layer: [per-expert usage]}}}}")
    return {int(k): torch.tensor(v, dtype=torch.float64) for k, v in data["usage"].items()}


def save_usage_profile(model_or_handle, path: str | os.PathLike) -> Path:
    """Write the usage recorded next to the router bias (routed picks since patching, all
    ranks) as a profile JSON that `longtail_from: profile` reads."""
    handle = _handle_of(model_or_handle)
    usage = {str(m.layer_idx): m.controls.usage_total.tolist() for m in _bias_layers(handle)}
    if not usage:
        raise ConfigError("save_usage_profile needs the router bias on (it records the usage); this patch has none")
    return atomic_write_text(Path(path), json.dumps({"format": PROFILE_FORMAT, "usage": usage}) + "\n")


def _layer_usage(handle: PatchHandle, cc: CondensersConfig) -> dict[int, torch.Tensor] | None:
    """Per-layer usage (E,) float64 for choosing / weighting the long tail, if any is known."""
    if cc.longtail_from == "profile":
        usage = read_usage_profile(cc.profile)
        for m in handle.layers:
            E = m.controls.spec.num_experts
            if m.layer_idx not in usage or usage[m.layer_idx].numel() != E:
                raise ConfigError(
                    f"{cc.profile}: needs the usage of MoE layer {m.layer_idx} ({E} experts); it has layers "
                    f"{sorted(usage)} with {sorted({len(u) for u in usage.values()})} experts. Was it written for this model?"
                )
        return usage
    if _bias_layers(handle) and not handle.layers[0].controls.usage_total.is_meta:  # meta: no values yet
        usage = {m.layer_idx: m.controls.usage_total.double().cpu() for m in _bias_layers(handle)}
        if all(u.sum() > 0 for u in usage.values()):
            return usage
    return None


def _longtail_of_usage(usage: torch.Tensor, r: int, coverage: float) -> list[int]:
    """Experts outside the smallest most-used set that covers `coverage` of the usage,
    extended with the least-used experts to at least r, most-used first."""
    order = torch.argsort(usage, descending=True, stable=True)
    cum = torch.cumsum(usage[order], 0) / usage.sum()
    n_head = int((cum < coverage).sum()) + 1  # the expert that crosses `coverage` is in the head
    n_head = min(n_head, usage.numel() - r)
    return order[n_head:].tolist()


def _choose_experts(handle: PatchHandle, cc: CondensersConfig, usage: dict[int, torch.Tensor] | None) -> dict[int, list[int]]:
    """The long tail per layer: given in the config, from the profile, or from phase 1."""
    if cc.experts is not None:
        return {int(k): list(v) for k, v in cc.experts.items()}
    hint = (
        "start phase 2 from a phase-1 model with moe_sft.start_phase2(model) / moe_sft.load_phase2(dir), "
        "or set condenser.condensers.longtail_from: profile with a profile file, or list condenser.condensers.experts"
    )
    out = {}
    for m in handle.layers:
        if cc.source == "new":
            if usage is None:
                raise ConfigError(f"condenser source: new needs the experts' usage to find the long tail: {hint}")
            out[m.layer_idx] = _longtail_of_usage(usage[m.layer_idx], cc.num, cc.coverage)
            continue
        if cc.longtail_from == "profile":
            ranking = usage[m.layer_idx]
        else:
            if not _bias_layers(handle):
                raise ConfigError(f"condenser longtail_from: bias needs the router bias (condenser.bias.enabled): {hint}")
            bias = router_bias(handle)[m.layer_idx]
            if bias.is_meta:
                raise ConfigError(
                    "condenser longtail_from: bias on a meta-device model (no values to rank): list "
                    "condenser.condensers.experts, or choose them on the loaded phase-1 model"
                )
            ranking = bias.detach().double().cpu()
            if bool((ranking == ranking[0]).all()):
                raise ConfigError(f"condenser longtail_from: bias, but layer {m.layer_idx}'s router bias is all equal (untrained): {hint}")
        out[m.layer_idx] = torch.argsort(ranking, stable=True)[: cc.num].tolist()
    return out


def _check_experts(handle: PatchHandle, cc: CondensersConfig, experts: dict[int, list[int]]) -> None:
    """The chosen experts name every MoE layer, exist and are distinct (whether the routing
    can still be served is checked once for every method, by patch_model)."""
    by_idx = {m.layer_idx: m for m in handle.layers}
    if set(experts) != set(by_idx):
        raise ConfigError(f"condenser.condensers.experts names layers {sorted(experts)}; the sparse MoE layers are {sorted(by_idx)}")
    for layer, ids in experts.items():
        E = by_idx[layer].controls.spec.num_experts
        if len(set(ids)) != len(ids) or any(not 0 <= e < E for e in ids):
            raise ConfigError(f"condenser.condensers.experts[{layer}] = {ids}: expert ids must be distinct and in 0..{E - 1}")
        if cc.source == "longtail" and len(ids) != cc.num:
            raise ConfigError(f"condenser.condensers.experts[{layer}] = {ids} lists {len(ids)} experts, but num = {cc.num}")
        if cc.source == "new" and len(ids) < 1:
            raise ConfigError(f"condenser.condensers.experts[{layer}] is empty: source new needs long-tail experts to start from")


def _new_condenser_weights(block: nn.Module, ids: list[int], usage: torch.Tensor | None, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, 2I, H), (r, H, I): condenser j = usage-weighted mean of the long-tail experts
    ids[j], ids[j + r], ... (long tail sorted by usage, most used first, dealt round-robin so
    the r condensers start different). Plain mean where the usage is unknown or zero."""
    experts = block.experts
    if usage is not None:
        ids = sorted(ids, key=lambda e: -float(usage[e]))
    gate_up, down = [], []
    with torch.no_grad(), gathered([experts.gate_up_proj, experts.down_proj]):  # whole under ZeRO-3
        for j in range(r):
            share = ids[j::r] or ids  # fewer long-tail experts than r: reuse the whole tail
            w = usage[share].clone() if usage is not None else torch.ones(len(share), dtype=torch.float64)
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(share))
            w = w.to(experts.gate_up_proj.device, torch.float32)
            gate_up.append(torch.einsum("e,eih->ih", w, experts.gate_up_proj[share].float()))
            down.append(torch.einsum("e,ehi->hi", w, experts.down_proj[share].float()))
    dtype = experts.gate_up_proj.dtype
    return torch.stack(gate_up).to(dtype), torch.stack(down).to(dtype)


def _install_condensers(handle: PatchHandle, cc: CondensersConfig) -> CondensersConfig:
    """Install the condensers on every layer; returns `cc` with the chosen `experts` filled in."""
    model_type = handle.model.config.model_type
    spec = handle.layers[0].controls.spec
    r, k = cc.num, spec.top_k
    if cc.budget == "compute_neutral" and r >= k:
        raise ConfigError(
            f"condenser.condensers.num = {r} with budget: compute_neutral needs r < k, but this {model_type} "
            f"model routes top_k = {k} experts per token (k - r routed + r condensers = k); use num <= {k - 1} "
            "or budget: additive"
        )
    k_routed = k - r if cc.budget == "compute_neutral" else k
    usage = _layer_usage(handle, cc)
    experts = _choose_experts(handle, cc, usage)
    _check_experts(handle, cc, experts)
    init_std = float(getattr(handle.model.config, "initializer_range", 0.02))
    for m in handle.layers:
        ctl, block = m.controls, m.block
        ids = experts[m.layer_idx]
        ctl.claim("num_routed", "condenser.condensers")
        ctl.num_routed = k_routed
        weight = block.gate.weight
        if cc.source == "longtail":
            ctl.claim("forced", "condenser.condensers")
            ctl.set_tensor("forced", torch.tensor(ids, dtype=torch.long, device=weight.device))
            ctl.expert_ids["forced"] = list(ids)
            ctl.allow_overlap = cc.allow_overlap
            if cc.gate == "learned":
                ctl.forced_weights = LearnedGate(weight.shape[1], r, weight.dtype, weight.device)
        else:
            gate_up, down = _new_condenser_weights(block, ids, None if usage is None else usage[m.layer_idx], r)
            ctl.new_condensers = NewCondensers(gate_up, down, block.experts.act_fn, init_std)
            ctl.output_hooks.append(_new_condensers_hook)
    logger.info(
        "moe_sft condenser: %d %s condenser(s) per layer (%s: %d routed + %d condensers, gate %s); experts %s",
        r, cc.source, cc.budget, k_routed, r, cc.gate, experts,
    )  # fmt: skip
    return dataclasses.replace(cc, experts=experts)


# ---------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------
class Condenser(Method):
    name = "condenser"
    config_class = CondenserConfig
    exports = ("CondenserConfig", "start_phase2", "load_phase2", "update_router_bias")
    aux_loss_free = True  # the family's load-balancing loss stays off (patch_model sets its coef to 0)

    def resolve(self, block: CondenserConfig | None, model_config) -> CondenserConfig | None:
        """Placement by the family's score function, gamma by model_type, budget and gate by
        the condensers' source: every default written into the config that runs and is saved."""
        if block is None:
            return None
        bias = block.bias
        if bias.placement is None:
            score = adapter_for(model_config.model_type).router_spec(model_config).score_func
            bias = dataclasses.replace(bias, placement="logits" if score == "softmax" else "selection")
        if bias.gamma is None:
            if model_config.model_type not in GAMMA_DEFAULTS:
                raise ConfigError(f"no default condenser.bias.gamma for model_type {model_config.model_type!r}; set condenser.bias.gamma")
            bias = dataclasses.replace(bias, gamma=GAMMA_DEFAULTS[model_config.model_type])
        cc = block.condensers
        if cc is not None:
            cc = dataclasses.replace(
                cc,
                budget=cc.budget or ("compute_neutral" if cc.source == "longtail" else "additive"),
                gate=cc.gate or ("router_prob" if cc.source == "longtail" else "learned"),
            )
        return dataclasses.replace(block, bias=bias, condensers=cc)

    def apply(self, handle: PatchHandle, block: CondenserConfig) -> CondenserState:
        # The per-layer state lives on `block.moe_sft`, which revert() removes with the block swap.
        state = CondenserState()
        if block.bias.enabled:
            _install_bias(handle, block.bias, state)
        if block.condensers is not None:
            chosen = _install_condensers(handle, block.condensers)
            handle.config = dataclasses.replace(handle.config, condenser=dataclasses.replace(block, condensers=chosen))
        return state

    def extend(self, handle: PatchHandle, state: CondenserState, old: CondenserConfig, new: CondenserConfig) -> CondenserState:
        """Phase 1 -> phase 2: the condensers join the trained phase-1 model in place, chosen
        from its bias / recorded usage; the bias settings may change (gamma), not its placement."""
        if old.condensers is not None or new.condensers is None:
            return super().extend(handle, state, old, new)
        if (new.bias.enabled, new.bias.placement) != (old.bias.enabled, old.bias.placement):
            raise ConfigError(
                f"condenser phase 2 must keep phase 1's bias enabled/placement (phase 1: {old.bias.enabled}/"
                f"{old.bias.placement}, phase 2: {new.bias.enabled}/{new.bias.placement})"
            )
        handle.config = dataclasses.replace(handle.config, condenser=new)  # the bias update reads the new gamma
        chosen = _install_condensers(handle, new.condensers)
        handle.config = dataclasses.replace(handle.config, condenser=dataclasses.replace(new, condensers=chosen))
        for usage in state.step_usage.values():
            usage.reset()
        logger.info("moe_sft condenser: phase 2 started (gamma %g)", new.bias.gamma if new.bias.enabled else 0)
        return state

    def on_train_begin(self, handle: PatchHandle, state: CondenserState) -> None:
        for usage in state.step_usage.values():
            usage.reset()  # forwards before training (profiling, evaluation) are not a step

    def on_step(self, handle: PatchHandle, state: CondenserState) -> None:
        update_router_bias(handle)

    def metrics(self, handle: PatchHandle, state: CondenserState) -> dict[str, float]:
        out = {}
        for i, b in router_bias(handle).items():
            out[f"expert_load/layer_{i}/bias_min"] = float(b.min())
            out[f"expert_load/layer_{i}/bias_max"] = float(b.max())
        return out


register_method(Condenser())


# ---------------------------------------------------------------------------------------
# Two-phase recipe
# ---------------------------------------------------------------------------------------
def start_phase2(model: nn.Module, phase2: CondenserConfig | None = None) -> PatchHandle:
    """Turn a phase-1 model (patched with a bias-only condenser block, e.g. loaded with
    `moe_sft.from_pretrained(phase1_dir)`) into the phase-2 model in place: condensers chosen
    from its bias / recorded usage, bias settings of `phase2` (default `phase2_config(phase1)`:
    gamma = 5e-5). Other methods' state is kept. Returns the handle (its config is the phase-2
    config with the chosen experts, saved by `save_pretrained`)."""
    handle = find_handle(model)
    phase1 = handle.config.condenser if handle is not None else None
    if phase1 is None:
        raise ConfigError("start_phase2 needs a model patched with a phase-1 condenser block (condenser: {bias: ...})")
    if phase1.condensers is not None:
        raise ConfigError(f"start_phase2: this model already has condensers ({phase1.condensers}); it is past phase 1")
    phase2 = phase2 if phase2 is not None else phase2_config(phase1)
    if phase2.condensers is None:
        raise ConfigError("start_phase2: the phase-2 config has no condensers block")
    return extend_patch(handle, dataclasses.replace(handle.config, condenser=phase2))


def load_phase2(phase1_dir: str | os.PathLike, phase2: CondenserConfig | None = None, **kwargs) -> nn.Module:
    """`moe_sft.from_pretrained(phase1_dir, **kwargs)` followed by `start_phase2`."""
    model = from_pretrained(phase1_dir, **kwargs)
    start_phase2(model, phase2)
    return model


__all__ = [
    "GAMMA_DEFAULTS",
    "PHASE2_GAMMA",
    "CondenserConfig",
    "CondenserState",
    "CondensersConfig",
    "LearnedGate",
    "NewCondensers",
    "RouterBiasConfig",
    "load_phase2",
    "phase2_config",
    "read_usage_profile",
    "reset_step_usage",
    "router_bias",
    "save_usage_profile",
    "start_phase2",
    "update_router_bias",
]
