"""Generic routing: router logits -> scores -> (biased, masked, forced) top-k -> gate weights.

One implementation for every family, parametrised by the family's `RouterSpec`, with the
extension points the methods use, all held per MoE layer by a `MoEControls` module:

    logit_bias      b (E,) added to the logits: p = f(z + b), for selection and gate weights
    selection_bias  b (E,) added to the scores for selection only: T = TopK(s + b)
    disabled        (E,) bool; disabled experts get logit -inf and are never selected
    forced          (r,) expert ids active for every token (appended after the routed k')
    num_routed      k' routed picks per token (default: the family's top_k)
    forced_weights  callable(x, scores) -> (T, r) gate weights of the forced experts
                    (default: their own score s_e, normalised with the routed weights)
    output_hooks    callables (block, x, routing, y) -> y run on the combined expert output
                    (dense-gradient mode, experts outside the fused tensors)
    detach_combine_weights  the experts combine with gate weights cut from the autograd
                    graph (same values); a method that sets it gives the router its gradient
                    by another path (DenseMixer's output hook)
    replay          (T, k') long: the routed picks to use for this forward's T tokens instead of
                    the top-k (routing replay in RL: the experts chosen when a rollout was
                    generated); the gate weights still come from the current scores, so the
                    router keeps its gradient. Forced experts are appended as usual
    observers       callables (layer_idx, routing, x, block) -> None that see every routing
                    (read only): the one routing record that usage statistics, expert-load
                    logging, ESFT scores and pruning profiles reduce over

With every point unset, `route` reproduces the family's stock router exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from .adapters import RouterSpec
from .config import ConfigError


@dataclasses.dataclass
class Routing:
    """The outcome of routing T tokens among E experts.

    logits   z (T, E) as returned by the router (before any bias or mask)
    scores   s (T, E) fp32: softmax / sigmoid of the (biased, masked) logits
    index    (T, K) long: expert ids per token, routed picks first, then forced experts
    weights  (T, K): gate weights (renormalised and scaled as the family does)
    num_routed  how many of the K slots are routed picks (the rest are forced)
    """

    logits: torch.Tensor
    scores: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    num_routed: int


class ExpertUsage:
    """Expert usage of one MoE layer, summed over the routings it is given since `reset()`.

    counts      (E,) int64  slots held by each expert (routed picks, plus forced experts
                            unless routed_only)
    score_mass  (E,) fp32   sum over tokens of the router score s_e (softmax / sigmoid of the
                            biased, masked logits)
    gate_mass   (E,) fp32   sum over the counted slots of the gate weight w_e
    picked_score_mass (E,) fp32  sum over the counted slots of s_e (the score of the experts
                            that were picked: what a selection-only bias moves)
    tokens      ()  int64   tokens counted
    Kept in int64 / fp32 whatever the model dtype so bf16 training loses no counts; on the
    layer's device, so adding costs no host sync. `keep` (T,) bool restricts a routing to some
    tokens (e.g. non-padding).
    """

    STATS = ("counts", "score_mass", "gate_mass", "picked_score_mass")

    def __init__(self, num_experts: int, device: torch.device | str = "cpu", *, routed_only: bool = False):
        self.routed_only = routed_only
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.score_mass = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.gate_mass = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.picked_score_mass = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, routing: Routing, keep: torch.Tensor | None = None) -> None:
        index = routing.index[:, : routing.num_routed] if self.routed_only else routing.index  # (T, K')
        weights = routing.weights[:, : index.shape[1]]
        scores = routing.scores
        if keep is not None:
            keep = keep.to(index.device)
            index, weights, scores = index[keep], weights[keep], scores[keep]
        flat = index.reshape(-1)
        self._to(flat.device)
        self.counts.index_add_(0, flat, torch.ones_like(flat))
        self.score_mass += scores.float().sum(0)
        self.gate_mass.index_add_(0, flat, weights.detach().reshape(-1).float())
        self.picked_score_mass.index_add_(0, flat, scores.gather(1, index).reshape(-1).float())
        self.tokens += index.shape[0]

    def _to(self, device: torch.device) -> None:
        if self.counts.device != device:  # the layer moved (e.g. .to("cuda") after patching)
            for name in (*self.STATS, "tokens"):
                setattr(self, name, getattr(self, name).to(device))

    def reset(self) -> None:
        for name in (*self.STATS, "tokens"):
            getattr(self, name).zero_()

    def add_usage(self, other: ExpertUsage) -> None:
        self._to(other.counts.device)
        for name in (*self.STATS, "tokens"):
            getattr(self, name).add_(getattr(other, name))

    def all_reduce(self) -> ExpertUsage:
        """A copy summed over the ranks of the default process group (a collective)."""
        out = ExpertUsage(self.counts.numel(), self.counts.device, routed_only=self.routed_only)
        out.add_usage(self)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            packed = torch.cat([out.counts, out.tokens.view(1)])  # one int64 and one fp32 reduction
            floats = torch.stack([out.score_mass, out.gate_mass, out.picked_score_mass])
            torch.distributed.all_reduce(packed)
            torch.distributed.all_reduce(floats)
            out.counts, out.tokens = packed[:-1].clone(), packed[-1].clone()
            out.score_mass, out.gate_mass, out.picked_score_mass = (f.clone() for f in floats)
        return out


def should_record_usage(module: nn.Module) -> bool:
    """Usage counts only in real training forwards: not in eval, not under no_grad, and not
    in an activation-checkpoint recompute (which runs inside the autograd engine)."""
    return module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


class MoEControls(nn.Module):
    """Per-MoE-layer state of the patch, attached to the block as `block.moe_sft`.

    Tensors are buffers of this module so they follow `.to()`, appear in `state_dict()`
    (persistent ones are saved in patched checkpoints) and vanish on `revert()`.
    """

    def __init__(self, spec: RouterSpec, layer_idx: int):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.logit_bias: torch.Tensor | None = None
        self.selection_bias: torch.Tensor | None = None
        self.disabled: torch.Tensor | None = None
        self.forced: torch.Tensor | None = None
        self.num_routed: int | None = None
        self.forced_weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.allow_overlap = False
        self.output_hooks: list[Callable] = []
        self.detach_combine_weights = False
        self.replay: torch.Tensor | None = None
        self.observers: list[tuple[Callable, bool]] = []  # (observer, training forwards only)
        self.claims: dict[str, str] = {}  # extension point -> the config block that set it
        self.expert_ids: dict[str, list[int]] = {}  # "forced" / "disabled" -> ids (readable on meta too)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, experts={self.spec.num_experts}, top_k={self.spec.top_k}"

    def set_tensor(self, name: str, value: torch.Tensor, *, persistent: bool = True) -> torch.Tensor:
        """Register (or replace) buffer `name`, e.g. "logit_bias", on this layer's controls."""
        if name in self._buffers:
            self._buffers[name] = value
        else:
            if name in self.__dict__:
                del self.__dict__[name]
            self.register_buffer(name, value, persistent=persistent)
        return value

    def claim(self, point: str, who: str) -> None:
        """Record that config block `who` sets extension point `point` (e.g. "forced"); two
        blocks cannot set the same one (their effects would silently overwrite each other)."""
        if self.claims.get(point, who) != who:
            raise ConfigError(
                f"layer {self.layer_idx}: {who} and {self.claims[point]} both set the routing's `{point}`; "
                "they cannot be combined, drop one of them"
            )
        self.claims[point] = who

    def observe(self, fn: Callable, *, training_only: bool) -> Callable[[], None]:
        """Call `fn(layer_idx, routing, x, block)` on every routing of this layer (only in real
        training forwards with `training_only`, see `should_record_usage`); returns the remover."""
        entry = (fn, training_only)
        self.observers.append(entry)

        def remove():
            if entry in self.observers:
                self.observers.remove(entry)

        return remove


def _group_limit(sel: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Keep only the experts of the top `topk_group` groups per token (others -> -inf)."""
    T, E = sel.shape
    grouped = sel.view(T, spec.n_group, E // spec.n_group)
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # top2_sum
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    keep = keep.unsqueeze(-1).expand(T, spec.n_group, E // spec.n_group).reshape(T, E)
    # -inf, not 0: with a selection bias the biased scores can be negative.
    return sel.masked_fill(~keep, float("-inf"))


def route(
    spec: RouterSpec,
    logits: torch.Tensor,
    ctl: MoEControls | None = None,
    correction: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
) -> Routing:
    """Route tokens given router logits z (T, E). `correction` is the family's own
    selection-only bias (DeepSeek-V3 e_score_correction_bias); `x` (T, H) is the block input,
    needed only by a learned `forced_weights` gate."""
    z = logits
    disabled = ctl.disabled if ctl is not None else None
    if disabled is not None:
        z = z.masked_fill(disabled, float("-inf"))
    if ctl is not None and ctl.logit_bias is not None:
        z = z.float() + ctl.logit_bias  # placement "logits": biased p for selection and gates
    if spec.score_func == "softmax":
        s = torch.softmax(z, dim=-1, dtype=torch.float32)
    else:
        s = z.float().sigmoid()

    sel = s
    if correction is not None:
        sel = sel + correction
    if ctl is not None and ctl.selection_bias is not None:
        sel = sel + ctl.selection_bias  # placement "selection": gates stay unbiased
    if disabled is not None:
        sel = sel.masked_fill(disabled, float("-inf"))
    forced = ctl.forced if ctl is not None else None
    if forced is not None and not ctl.allow_overlap:
        sel = sel.index_fill(1, forced, float("-inf"))  # a forced expert is never also routed
    if spec.group_score != "none":
        sel = _group_limit(sel, spec)

    k = ctl.num_routed if ctl is not None and ctl.num_routed is not None else spec.top_k
    replay = ctl.replay if ctl is not None else None
    if replay is not None:
        if replay.shape != (s.shape[0], k):
            raise ValueError(
                f"layer {ctl.layer_idx}: routing replay holds {tuple(replay.shape)} expert ids, but this forward routes "
                f"{s.shape[0]} tokens x {k} picks; record and replay the same tokens"
            )
        index = replay.to(s.device)
    else:
        index = torch.topk(sel, k, dim=-1, sorted=spec.sorted_topk)[1]
    weights = s.gather(1, index)
    if forced is not None:
        T = s.shape[0]
        if ctl.forced_weights is not None:
            forced_w = ctl.forced_weights(x, s)
        else:
            forced_w = s[:, forced]
        index = torch.cat([index, forced.unsqueeze(0).expand(T, -1)], dim=1)
        weights = torch.cat([weights, forced_w.to(weights.dtype)], dim=1)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.norm_eps)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    if not spec.weights_fp32:
        weights = weights.to(logits.dtype)
    return Routing(logits=logits, scores=s, index=index, weights=weights, num_routed=k)
