"""The method registry: each training method is one config block + one module.

A method module defines its config dataclass (a field of `MoESFTConfig` named like the
method) and registers a `Method` here:

    register_method(Method(name="condenser", apply=apply_condenser, callbacks=condenser_callbacks))

`patch_model` calls `apply(handle, block_config)` for every block that is not None, in
the order of `MoESFTConfig`'s fields; `apply` installs the method into the patched model
and registers its undo actions with `handle.add_undo`. The trainer asks every enabled
method for its `callbacks(handle, block_config)` (transformers TrainerCallbacks).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# Modules that register a method when imported (imported lazily by `get_method`).
METHOD_MODULES: tuple[str, ...] = (
    "moe_sft.moe_bias_head",
    "moe_sft.frozen_router",
    "moe_sft.densemixer",
    "moe_sft.esft",
    "moe_sft.lora",
    "moe_sft.condenser",
)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[Any, Any], None]
    callbacks: Callable[[Any, Any], list] | None = None
    # resolve(block) -> the block to apply (None: off), given the config's block (None when
    # absent). `patch_model` runs it once, before patching, and keeps the resolved config as
    # `handle.config` (so checkpoints save what ran); e.g. environment-variable overrides.
    resolve: Callable[[Any], Any] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise RuntimeError(f"method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def _load() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)


def get_method(name: str) -> Method:
    _load()
    if name not in _METHODS:
        raise KeyError(f"no method registered for config block {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def resolve_config(config):
    """`config` with every method's `resolve` applied: the config a patch actually runs."""
    _load()
    changes = {
        name: method.resolve(getattr(config, name))
        for name, method in _METHODS.items()
        if method.resolve is not None and hasattr(config, name)
    }
    return dataclasses.replace(config, **changes) if changes else config


def enabled_methods(config) -> list[tuple[Method, Any]]:
    """(method, its config block) for every method block of `config` that is set."""
    _load()
    out = []
    for field in dataclasses.fields(config):
        block = getattr(config, field.name)
        if field.name in _METHODS and block is not None:
            out.append((_METHODS[field.name], block))
    return out
