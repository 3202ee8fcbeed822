"""DeepSpeed ZeRO-3 glue for methods that must read weights of a partitioned model.

Under ZeRO-3 partitioned loading (transformers' `zero.Init`, on when the DeepSpeed config
exists before `from_pretrained`), every parameter holds only this rank's slice (`ds_shape` is
its real shape). What patching and its methods read is gathered only while it is read:
- `gathered(params)`: the whole of a few parameters (e.g. the long-tail experts a new
  condenser starts from), on every rank, for the block;
- `layerwise_forward(model)`: forwards outside the DeepSpeed engine (ESFT's profiling pass)
  gather each module's own parameters when it runs and release them after, so at most one
  module is whole at a time.
Both are collectives (every rank runs the same code on the same data) and no-ops for a model
that is not partitioned. `deepspeed` is imported only when something is partitioned.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_partitioned(t: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its values live in partitions; `ds_shape` is its shape)."""
    return hasattr(t, "ds_id")


def shape(t: torch.Tensor) -> torch.Size:
    return getattr(t, "ds_shape", t.shape)


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Within the block the partitioned `params` are whole (written back from `modifier_rank`
    when it is set, e.g. after an in-place initialisation)."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def layerwise_forward(model: nn.Module):
    """Run forwards of a partitioned model outside DeepSpeed's engine: each module's own
    parameters are gathered just before it runs and released right after."""
    if not any(is_partitioned(p) for p in model.parameters()):
        yield model
        return
    import deepspeed

    open_ctx: dict[int, contextlib.AbstractContextManager] = {}

    def pre(module, args):
        own = [p for p in module.parameters(recurse=False) if is_partitioned(p)]
        if own:
            ctx = deepspeed.zero.GatheredParameters(own)
            ctx.__enter__()
            open_ctx[id(module)] = ctx

    def post(module, args, output):
        ctx = open_ctx.pop(id(module), None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        while open_ctx:
            open_ctx.popitem()[1].__exit__(None, None, None)


@contextlib.contextmanager
def unpartitioned_init():
    """Within the block transformers builds models whole, even when a ZeRO-3 config is active
    (random tiny models: partitioned initialisation draws other random numbers, so runs with
    and without ZeRO-3 would not start from the same weights)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(config)
