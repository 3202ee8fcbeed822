"""DenseMixer: a dense, straight-through router gradient for top-k MoE layers.

Reference: DenseMixer (PyPI `densemixer` 1.0.1). With p = f(z) the family's router scores,
T = TopK and S = sum_{j in T} p_j, the forward value stays exactly the sparse output
y = sum_{e in T} w_e E_e(x), while the router is trained through

    y_out = sg(y) + D - sg(D),   D = sum_{e=1..E} pi_e * sg(E_e(x))      (all experts, all tokens)
    pi_e  = c * p_e / S      for e in T            (c = routed_scaling_factor, 1 if none)
    pi_e  = c * p_e / sg(S)  for e not in T        (norm_topk_prob families)
    pi_e  = c * p_e                                (families that do not renormalise)

Expert parameters (and the block input through the experts) get gradient only from tokens
that selected them, with the sparse weights w_e: the fused experts run as usual with the gate
weights detached (`MoEControls.detach_combine_weights`), and D is evaluated with the expert
weights and input detached, so it feeds the router only. Shared experts are active for every
token, i.e. already dense: they and their gate keep the stock forward and gradient.

All E experts are evaluated on a chunk of tokens in one batched matmul over the fused
(E, 2I, H) / (E, H, I) tensors (no Python loop over experts). `memory: fast` keeps those
outputs (E, T, H) for the backward; `memory: recompute` keeps nothing and recomputes them in
backward, chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from torch import nn

from .adapters import PatchError
from .config import ConfigError
from .methods import Method, register_method
from .routing import Routing

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DenseMixerConfig:
    """`densemixer:` block.

    memory        fast: store the dense expert outputs (E x T x H per layer) for the backward;
                  recompute: recompute them in the backward (memory-saving, ~1 extra dense pass)
    chunk_tokens  tokens per batched all-experts evaluation; bounds the transient
                  (E x chunk x (2I + H)) buffers of both modes
    """

    memory: Literal["fast", "recompute"] = "fast"
    chunk_tokens: int = 512

    def __post_init__(self):
        if self.chunk_tokens < 1:
            raise ConfigError(f"densemixer.chunk_tokens must be >= 1, got {self.chunk_tokens}")


# ---- the dense term ------------------------------------------------------------------------
def dense_gates(spec, routing: Routing) -> torch.Tensor:
    """pi (T, E) fp32 with gradient to the router, as in the module docstring."""
    s = routing.scores  # (T, E) fp32, the scores the sparse weights came from
    if spec.norm_topk_prob:
        idx = routing.index[:, : routing.num_routed]  # (T, k)
        S = s.gather(1, idx).sum(dim=-1, keepdim=True) + spec.norm_eps  # (T, 1)
        selected = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
        # Partial scaling: unselected experts see S as a constant.
        pi = torch.where(selected, s / S, s / S.detach())
    else:
        pi = s
    if spec.routed_scaling_factor != 1.0:
        pi = pi * spec.routed_scaling_factor
    return pi


@torch.no_grad()
def all_expert_outputs(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E_e(x) for every expert e and token: (C, H) -> (E, C, H), with no autograd graph."""
    w_gate_up = experts.gate_up_proj  # (E, 2I, H)
    w_down = experts.down_proj  # (E, H, I)
    h = torch.matmul(x.to(w_gate_up.dtype), w_gate_up.transpose(1, 2))  # (E, C, 2I), x broadcast
    h = experts._apply_gate(h)  # (E, C, I): act(gate) * up, as the experts module does
    return torch.bmm(h, w_down.transpose(1, 2))  # (E, C, H)


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _dense_fast(pi: torch.Tensor, x: torch.Tensor, experts: nn.Module, chunk: int) -> torch.Tensor:
    """D (T, H); autograd keeps the (E, T, H) outputs to give pi its gradient."""
    outs = torch.cat([all_expert_outputs(experts, x[a:b]) for a, b in _chunks(x.shape[0], chunk)], dim=1)
    return torch.einsum("te,eth->th", pi.to(outs.dtype), outs)


class _DenseRecompute(torch.autograd.Function):
    """D = sum_e pi_e E_e(x) with the expert outputs recomputed in backward (grad to pi only)."""

    @staticmethod
    def forward(ctx, pi, x, experts, chunk):
        ctx.save_for_backward(x)
        ctx.experts, ctx.chunk = experts, chunk
        D = x.new_empty(x.shape[0], x.shape[1], dtype=experts.gate_up_proj.dtype)
        for a, b in _chunks(x.shape[0], chunk):
            D[a:b] = torch.einsum("te,eth->th", pi[a:b].to(D.dtype), all_expert_outputs(experts, x[a:b]))
        return D

    @staticmethod
    def backward(ctx, grad_d):
        (x,) = ctx.saved_tensors
        grad_pi = grad_d.new_empty(x.shape[0], ctx.experts.gate_up_proj.shape[0], dtype=torch.float32)
        for a, b in _chunks(x.shape[0], ctx.chunk):
            out = all_expert_outputs(ctx.experts, x[a:b])  # (E, C, H)
            grad_pi[a:b] = torch.einsum("th,eth->te", grad_d[a:b].to(out.dtype), out).float()
        return grad_pi, None, None, None


def make_hook(cfg: DenseMixerConfig):
    def densemixer_hook(block: nn.Module, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> torch.Tensor:
        if routing.index.shape[1] != routing.num_routed:
            raise PatchError(
                f"densemixer: layer {block.moe_sft.layer_idx} has {routing.index.shape[1] - routing.num_routed} "
                "forced (always-active) experts; DenseMixer's dense gradient is defined for plain top-k routing. "
                "Turn off the method that forces experts (e.g. condenser) or densemixer."
            )
        pi = dense_gates(block.moe_sft.spec, routing)
        if not (torch.is_grad_enabled() and pi.requires_grad):
            return y  # eval / no_grad / frozen router: D would only cost compute
        experts = block.experts
        xd = x.detach()
        if cfg.memory == "fast":
            D = _dense_fast(pi, xd, experts, cfg.chunk_tokens)
        else:
            D = _DenseRecompute.apply(pi, xd, experts, cfg.chunk_tokens)
        # Forward value: exactly y (D - sg(D) == 0); gradient: D's, to the router only.
        return y + (D - D.detach()).to(y.dtype)

    return densemixer_hook


def _check_experts(block: nn.Module, where: str) -> None:
    experts = block.experts
    for attr, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("has_post_expert_norm", False)):
        if getattr(experts, attr, want) != want:
            raise PatchError(
                f"densemixer: {where}.experts ({type(experts).__name__}) has {attr}={not want}; the batched "
                "all-experts evaluation supports gated, bias-free (E, 2I, H) / (E, H, I) fused experts only"
            )


def apply_densemixer(handle, cfg: DenseMixerConfig) -> None:
    hook = make_hook(cfg)
    for layer in handle.layers:
        _check_experts(layer.block, layer.name)
    for layer in handle.layers:
        ctl = layer.controls
        ctl.output_hooks.append(hook)
        ctl.detach_combine_weights = True

        def undo(ctl=ctl):
            ctl.output_hooks.remove(hook)
            ctl.detach_combine_weights = False

        handle.add_undo(undo)
    logger.info("moe_sft: densemixer (%s memory) on %d MoE layers", cfg.memory, len(handle.layers))


register_method(Method(name="densemixer", apply=apply_densemixer))
