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
METHOD_MODULES: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[Any, Any], None]
    callbacks: Callable[[Any, Any], list] | None = None


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


def enabled_methods(config) -> list[tuple[Method, Any]]:
    """(method, its config block) for every method block of `config` that is set."""
    _load()
    out = []
    for field in dataclasses.fields(config):
        block = getattr(config, field.name)
        if field.name in _METHODS and block is not None:
            out.append((_METHODS[field.name], block))
    return out
