"""frozen_router: the stock forward with every MoE router's weights frozen (a baseline).

Everything else trains as configured. "Router weights" are the parameters of each patched
block's router module (`block.gate`: its weight, and e.g. a router bias where a family has
one). DeepSeek-V3 / GLM's `e_score_correction_bias` is a buffer and never trains anyway.
`revert()` restores each parameter's previous `requires_grad`.
"""

from __future__ import annotations

import dataclasses
import logging

from ..plugins import Method, register_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FrozenRouterConfig:
    """`frozen_router:` block (`frozen_router: {}` turns it on; it has no options)."""


def router_parameters(handle) -> list:
    """(name, parameter) of every patched layer's router."""
    return [(f"{m.name}.gate.{n}", p) for m in handle.layers for n, p in m.block.gate.named_parameters()]


class FrozenRouter(Method):
    name = "frozen_router"
    config_class = FrozenRouterConfig
    exports = ("FrozenRouterConfig",)

    def apply(self, handle, block: FrozenRouterConfig) -> None:
        params = router_parameters(handle)
        before = [p.requires_grad for _, p in params]
        for _, p in params:
            p.requires_grad_(False)

        def undo():
            for (_, p), flag in zip(params, before):
                p.requires_grad_(flag)

        handle.add_undo(undo)
        logger.info("moe_sft: frozen_router froze %d router tensors (%d parameters)", len(params), sum(p.numel() for _, p in params))


register_method(FrozenRouter())
