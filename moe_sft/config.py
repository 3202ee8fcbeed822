"""Typed configuration: YAML -> dataclass -> `key=value` overrides; unknown keys are errors.

`MoESFTConfig` holds one optional block per method. A block that is `None` (or absent from
the YAML) is off, so `MoESFTConfig()` and an empty YAML `{}` both mean "every method off".
Each method's block is its own dataclass, defined next to the method and listed here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_NAME = "moe_sft_config.json"

# Numbers like 1e-5 that PyYAML (YAML 1.1) leaves as strings.
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and the fix."""


if typing.TYPE_CHECKING:  # for readers and type checkers; at run time see _method_config_types
    from .condenser import CondenserConfig
    from .densemixer import DenseMixerConfig
    from .esft import ESFTConfig
    from .frozen_router import FrozenRouterConfig
    from .lora import LoraBlockConfig
    from .moe_bias_head import MoEBiasHeadConfig

# Method config blocks live next to their methods (which import this module). Their names are
# resolved when a config is first validated, so `import moe_sft.config` stays light (no torch).
_METHOD_CONFIG_TYPES = {
    "CondenserConfig": "moe_sft.condenser",
    "DenseMixerConfig": "moe_sft.densemixer",
    "ESFTConfig": "moe_sft.esft",
    "FrozenRouterConfig": "moe_sft.frozen_router",
    "LoraBlockConfig": "moe_sft.lora",
    "MoEBiasHeadConfig": "moe_sft.moe_bias_head",
}


@functools.cache
def _method_config_types() -> dict[str, type]:
    return {name: getattr(importlib.import_module(module), name) for name, module in _METHOD_CONFIG_TYPES.items()}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, localns=_method_config_types() if cls is MoESFTConfig else None)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses from dicts."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(inner, '__name__', inner)})")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {inner.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(inner, value, prefix=where + ".")
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        allowed = typing.get_args(inner)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(inner) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = typing.get_args(inner) or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is int and isinstance(k, str):  # JSON object keys are strings
                try:
                    k = int(k)
                except ValueError:
                    raise ConfigError(f"{where}: key {k!r} is not an integer") from None
            out[_coerce(k, key_tp, f"{where} key")] = _coerce(v, val_tp, f"{where}[{k!r}]")
        return out
    if inner is Any:
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string; users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} in {cls.__name__}; "
            f"valid keys here: {', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _parse_scalar(text: str) -> Any:
    """`key=value` right-hand sides are read as YAML scalars: 1e-3, true, null, [1, 2], name."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted `key=value` overrides to a plain dict (before validation)."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. condenser.gamma=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


@dataclasses.dataclass
class RoutingConfig:
    """Routing changes that are not a training method.

    disabled_experts: {layer index: [expert ids]}. Those experts get router logit -inf in that
    layer, so they are never selected and the scores of the others renormalise among the
    survivors (expert masking, as in pruning ablations). Saved in patched checkpoints.
    """

    disabled_experts: dict[int, list[int]] | None = None


@dataclasses.dataclass
class MoESFTConfig:
    """Which MoE methods a patched model runs. Every block defaults to off.

    The foundation has no method blocks yet beyond the shared switches below; each method
    adds its block here as it lands.
    """

    # Record per-step expert usage (token counts and summed router probabilities) in every
    # MoE layer during training forwards; read it with `PatchHandle.usage()`.
    track_usage: bool = False
    routing: RoutingConfig | None = None
    condenser: CondenserConfig | None = None
    moe_bias_head: MoEBiasHeadConfig | None = None
    frozen_router: FrozenRouterConfig | None = None
    densemixer: DenseMixerConfig | None = None
    esft: ESFTConfig | None = None
    lora: LoraBlockConfig | None = None

    @classmethod
    def from_dict(cls, data: dict) -> MoESFTConfig:
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> MoESFTConfig:
        return from_dict(cls, apply_overrides(load_yaml(path), overrides or []))

    def to_dict(self) -> dict:
        """Plain data; blocks that are off (None) are left out, so saved configs stay short."""
        return {k: v for k, v in to_dict(self).items() if v is not None}

    def save(self, directory: str | Path) -> Path:
        from .io import atomic_write_text

        return atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> MoESFTConfig:
        path = Path(directory) / CONFIG_NAME
        return from_dict(cls, json.loads(path.read_text()))
