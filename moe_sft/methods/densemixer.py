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

D - sg(D) is exactly 0, so D is never formed: its only effect is dL/dpi_e = <dL/dy, E_e(x)>
(T, E), which the backward of one autograd op computes. Since down_proj is linear this is
<W_down_e^T dL/dy, a_e(x)> with a_e = act(x W_gate_e^T) * (x W_up_e^T) (T, E, I): all E experts
are evaluated on a chunk of tokens by batched matmuls over the fused (E, 2I, H) / (E, H, I)
tensors (no Python loop over experts), one dense pass per step in either memory mode.
`memory: fast` computes a chunk by chunk in the forward and keeps it (E x T x min(I, H) per
layer: the expert outputs instead when I > H); `memory: recompute` keeps nothing and does all
of it in the backward, chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from torch import nn

from ..adapters import PatchError
from ..config import ConfigError
from ..plugins import Method, register_method
from ..routing import Routing

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DenseMixerConfig:
    """`densemixer:` block.

    memory        fast: evaluate all experts in the forward and keep their activations
                  (E x T x I per layer; the outputs, E x T x H, if I > H) for the backward;
                  recompute: keep nothing, evaluate them in the backward (memory-saving)
    chunk_tokens  tokens per batched all-experts evaluation; bounds the transient
                  (2 x E x chunk x max(I, H)) buffers of both modes
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


def _dense_activations(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """a_e = act(x W_gate_e^T) * (x W_up_e^T) for every expert: (C, H) -> (E, C, I), no graph.

    Gate and up halves of the fused (E, 2I, H) tensor are projected separately (strided views,
    no weight copy) so the transient is 2 x (E, C, I) instead of (E, C, 2I) + 2 x (E, C, I).
    The split is transformers' default `_apply_gate` (first I rows gate, last I rows up)."""
    w = experts.gate_up_proj.detach()  # (E, 2I, H)
    inter = w.shape[1] // 2
    x = x.to(w.dtype)
    a = experts.act_fn(torch.matmul(x, w[:, :inter].transpose(1, 2)))  # (E, C, I); x broadcast
    return a.mul_(torch.matmul(x, w[:, inter:].transpose(1, 2)))


def _keeps_outputs(experts: nn.Module) -> bool:
    """fast mode keeps the smaller of activations (E, T, I) and outputs (E, T, H)."""
    _, hidden, inter = experts.down_proj.shape  # (E, H, I)
    return inter > hidden


def _dense_store(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What fast mode keeps for a chunk (C, H): outputs (E, C, H) if I > H, else activations (E, C, I)."""
    act = _dense_activations(experts, x)
    if _keeps_outputs(experts):
        return torch.bmm(act, experts.down_proj.detach().transpose(1, 2))
    return act


def _router_grad_chunk(experts: nn.Module, g: torch.Tensor, stored: torch.Tensor, outputs: bool) -> torch.Tensor:
    """<g_t, E_e(x_t)> (C, E) fp32 from the upstream gradient g (C, H) and either the expert
    outputs (E, C, H) or the activations a (E, C, I). With activations it is <W_down_e^T g_t, a_e>
    (down_proj is linear): one batched matmul of g through every down_proj (E*C*I*H multiply-adds,
    the cost of forming the outputs) and a dot product over I, without materialising (E, C, H)."""
    w_down = experts.down_proj.detach()  # (E, H, I)
    g = g.to(w_down.dtype)
    prod = stored * g if outputs else torch.matmul(g, w_down).mul_(stored)  # (E, C, H) / (E, C, I)
    return prod.sum(-1, dtype=torch.float32).t()


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _DenseRouterGrad(torch.autograd.Function):
    """y_out = y + D - sg(D) with D = sum_e pi_e sg(E_e(x)) (T, H), written as one op.

    D - sg(D) is exactly 0 in value, so the forward returns y unchanged and never forms D; all
    D contributes is dL/dpi_e = <dL/dy_out, E_e(x)> (T, E), computed in backward.
    fast: the forward keeps, per chunk of tokens, the dense activations (E, C, I), or the
    outputs (E, C, H) when I > H; recompute: nothing is kept and the backward evaluates all
    experts chunk by chunk. Either way one dense pass per step."""

    @staticmethod
    def forward(ctx, y, pi, x, experts, chunk, fast):
        ctx.experts, ctx.chunks, ctx.fast = experts, _chunks(x.shape[0], chunk), fast
        # Saved through autograd (also the intermediates), so activation checkpointing can drop them.
        ctx.save_for_backward(*([_dense_store(experts, x[a:b]) for a, b in ctx.chunks] if fast else [x]))
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        experts, saved = ctx.experts, ctx.saved_tensors
        outputs = ctx.fast and _keeps_outputs(experts)
        grad_pi = grad_y.new_empty(grad_y.shape[0], experts.down_proj.shape[0], dtype=torch.float32)
        with torch.no_grad():
            for i, (a, b) in enumerate(ctx.chunks):
                stored = saved[i] if ctx.fast else _dense_activations(experts, saved[0][a:b])
                grad_pi[a:b] = _router_grad_chunk(experts, grad_y[a:b], stored, outputs)
        return grad_y, grad_pi, None, None, None, None


def make_hook(cfg: DenseMixerConfig):
    def densemixer_hook(block: nn.Module, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> torch.Tensor:
        pi = dense_gates(block.moe_sft.spec, routing)
        if not (torch.is_grad_enabled() and pi.requires_grad):
            return y  # eval / no_grad / frozen router: D would only cost compute
        # Forward value: exactly y; gradient: D's, to the router only (x and experts detached).
        return _DenseRouterGrad.apply(y, pi, x.detach(), block.experts, cfg.chunk_tokens, cfg.memory == "fast")

    return densemixer_hook


def _check_experts(block: nn.Module, where: str) -> None:
    experts = block.experts
    for attr, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("has_post_expert_norm", False)):
        if getattr(experts, attr, want) != want:
            raise PatchError(
                f"densemixer: {where}.experts ({type(experts).__name__}) has {attr}={not want}; the batched "
                "all-experts evaluation supports gated, bias-free (E, 2I, H) / (E, H, I) fused experts only"
            )
    if getattr(getattr(experts, "_apply_gate", None), "__name__", None) != "_default_apply_gate":
        # The dense evaluation splits gate_up_proj as transformers' default gate does.
        raise PatchError(
            f"densemixer: {where}.experts ({type(experts).__name__}) has its own _apply_gate; the batched "
            "all-experts evaluation supports transformers' default act(gate) * up split only"
        )


class DenseMixer(Method):
    name = "densemixer"
    config_class = DenseMixerConfig
    exports = ("DenseMixerConfig",)

    def check(self, config, launch) -> None:
        condensers = config.condenser.condensers if config.condenser is not None else None
        if condensers is not None and condensers.source == "longtail":
            raise ConfigError(
                "densemixer and condenser.condensers (source: longtail) cannot be combined: long-tail condensers are "
                "always-active experts outside the top-k, and DenseMixer's dense router gradient is defined for plain "
                "top-k routing. Use densemixer with the condenser's router bias alone (no condensers block), or "
                "condensers with source: new"
            )

    def apply(self, handle, block: DenseMixerConfig) -> None:
        hook = make_hook(block)
        for layer in handle.layers:
            _check_experts(layer.block, layer.name)
        for layer in handle.layers:
            ctl = layer.controls
            ctl.claim("detach_combine_weights", "densemixer")
            ctl.output_hooks.append(hook)
            ctl.detach_combine_weights = True

            def undo(ctl=ctl):
                ctl.output_hooks.remove(hook)
                ctl.detach_combine_weights = False

            handle.add_undo(undo)
        logger.info("moe_sft: densemixer (%s memory) on %d MoE layers", block.memory, len(handle.layers))


register_method(DenseMixer())
