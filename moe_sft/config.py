"""Typed configuration: YAML -> dataclass -> `key=value` overrides; unknown keys are errors.

`MoESFTConfig` holds the core fields and one optional block per method. A block that is `None`
(or absent from the YAML) is off, so `MoESFTConfig()` and an empty YAML `{}` both mean "every
method off". Each method's block is its own dataclass, defined with the method in
`moe_sft.methods`; the config class is assembled from the method registry (`moe_sft.plugins`)
on first use, so this module imports no method.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_NAME = "moe_sft_config.json"

# Numbers like 1e-5 that PyYAML (YAML 1.1) leaves as strings.
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
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
    unknown = sorted((k for k in data if k not in types_), key=str)  # YAML keys need not be strings
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)} in {cls.__name__}; "
            f"valid keys here: {', '.join(sorted(types_))}"
        )
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in data]  # fmt: skip
    if required:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: missing required key(s) {', '.join(prefix + k for k in required)}")
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


class MoESFTConfigBase:
    """What every MoESFTConfig can do (the dataclass itself is assembled by `config_class`)."""

    @classmethod
    def from_dict(cls, data: dict):
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None):
        return from_dict(cls, apply_overrides(load_yaml(path), overrides or []))

    def to_dict(self) -> dict:
        """Plain data; blocks that are off (None) are left out, so saved configs stay short."""
        return {k: v for k, v in to_dict(self).items() if v is not None}

    def method_blocks(self) -> dict[str, Any]:
        """{method name: its block} for the method blocks that are set."""
        return {k: v for k, v in vars(self).items() if k not in CORE_FIELDS and v is not None}

    def save(self, directory: str | Path) -> Path:
        from .io import atomic_write_text

        return atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path):
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; {directory} is not a checkpoint saved by moe_sft") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); the checkpoint is damaged") from None
        try:
            return from_dict(cls, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _check_aux(self) -> None:
    coef = self.router_aux_loss_coef
    if coef is not None and not (math.isfinite(coef) and coef >= 0):
        raise ConfigError(f"router_aux_loss_coef = {coef}: must be a finite number >= 0 (e.g. 0.001), or null for the checkpoint's")


# The fields every MoESFTConfig has, before the method blocks (name, type, default).
CORE_FIELDS: dict[str, tuple[Any, Any]] = {
    # Record per-layer expert usage (token counts and summed router scores) in training
    # forwards; read it with `PatchHandle.usage()`.
    "track_usage": (bool, False),
    "routing": (RoutingConfig | None, None),
    # The family's load-balancing aux loss (transformers' config names; LLaMA-Factory calls the
    # coefficient `moe_aux_loss_coef`). None: as the checkpoint's config.json says. Setting a
    # non-zero coefficient turns output_router_logits on unless it is set too; with
    # output_router_logits false there is no aux loss, whatever the coefficient (as in
    # transformers). Resolved and saved at patch time.
    "router_aux_loss_coef": (float | None, None),
    "output_router_logits": (bool | None, None),
}


@functools.cache
def config_class() -> type:
    """The `MoESFTConfig` dataclass: the core fields, then one optional block per registered
    method (`moe_sft.plugins`), in registration order. Built once, on first use."""
    from .plugins import mark_config_built, registered_methods

    fields = [(name, tp, dataclasses.field(default=default)) for name, (tp, default) in CORE_FIELDS.items()]
    fields += [(m.name, m.config_class | None, dataclasses.field(default=None)) for m in registered_methods()]
    cls = dataclasses.make_dataclass(
        "MoESFTConfig",
        fields,
        bases=(MoESFTConfigBase,),
        namespace={"__post_init__": _check_aux, "__module__": __name__},
    )
    cls.__doc__ = (
        "Which MoE methods a patched model runs: one optional block per method (None = off), so "
        "`MoESFTConfig()` and an empty YAML `{}` both mean every method off.\n\n"
        f"Core fields: {', '.join(CORE_FIELDS)}. Method blocks: {', '.join(m.name for m in registered_methods())}."
    )
    mark_config_built()
    return cls


def __getattr__(name: str):
    if name == "MoESFTConfig":  # assembled from the method registry on first use
        return config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
