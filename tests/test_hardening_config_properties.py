"""Property tests: malformed configs (random nested mappings, lists and scalars, unknown keys,
wrong types, out-of-range values, shaped after the real schemas so that they reach the
validators) either validate or raise the project's own ConfigError, never another exception."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moe_sft.config import MoESFTConfig, from_dict
from moe_sft.errors import ConfigError
from moe_sft.pruning.ablate import AblateConfig
from moe_sft.train.config import DataConfig, ModelConfig, parse_train_config

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any value a YAML file can hold (dates included: `2024-01-01` reads as one).
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["", "auto", "1e-5", "true", "none", "0"]), st.dates(),
)  # fmt: skip
KEYS = st.one_of(st.text(max_size=6), st.integers(-3, 40), st.booleans())
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)


def _options(tp) -> tuple[list, bool]:
    """The alternatives of a (possibly optional) union annotation, and whether None is allowed."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def typed(tp, depth: int = 0) -> st.SearchStrategy:
    """Values shaped like annotation `tp` (often valid, often just wrong), mixed with junk."""
    options, optional = _options(tp)
    shaped = [_shaped(o, depth) for o in options]
    return st.one_of(*shaped, *([st.none()] if optional else []), JUNK)


def _shaped(tp, depth: int) -> st.SearchStrategy:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return mapping_for(tp, depth + 1)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (list, tuple):
        return st.lists(typed(args[0] if args else typing.Any, depth + 1), max_size=4)
    if origin is dict:
        key_tp, val_tp = args or (typing.Any, typing.Any)
        keys = st.one_of(st.integers(-2, 40), st.integers(0, 40).map(str)) if key_tp is int else KEYS
        return st.dictionaries(keys, typed(val_tp, depth + 1), max_size=3)
    simple = {bool: st.booleans(), int: st.integers(-5, 2**40), float: st.floats(allow_nan=True, allow_infinity=True),
              str: st.text(max_size=8)}  # fmt: skip
    return simple.get(tp, JUNK)


def mapping_for(cls, depth: int = 0) -> st.SearchStrategy:
    """A mapping for dataclass `cls`: any subset of its fields, typed values, sometimes an unknown key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: typed(hints[f.name], depth) if depth < 4 else JUNK for f in dataclasses.fields(cls)}
    known = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(KEYS, JUNK, max_size=1)
    return st.tuples(known, st.one_of(st.just({}), st.just({}), extra)).map(lambda kv: {**kv[1], **kv[0]})


def as_yaml(data):
    """What reading the YAML file of `data` gives back."""
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))


def train_mapping() -> st.SearchStrategy:
    training = st.fixed_dictionaries(
        {},
        optional={"output_dir": typed(str), "learning_rate": typed(float), "max_steps": typed(int), "bf16": typed(bool),
                  "lr_scheduler_type": typed(str), "seed": typed(int), "deepspeed": JUNK, "learnin_rate": JUNK},
    )  # fmt: skip
    own = {"model": typed(ModelConfig), "data": typed(DataConfig), "training": training | JUNK,
           "deepspeed": typed(str | None), "then": typed(str | None)}  # fmt: skip
    methods = {name: typed(tp) for name, tp in typing.get_type_hints(MoESFTConfig).items()}
    return st.fixed_dictionaries({}, optional={**own, **methods})


def only_config_errors(build, data) -> None:
    try:
        build(as_yaml(data))
    except ConfigError:
        pass


# Found by these tests, in moe_sft/config.py's `from_dict` (TypeError, not ConfigError): a
# non-string unknown key, keys of mixed types (sorting them), and a missing required field.
@SETTINGS
@given(mapping_for(MoESFTConfig))
@example({0: None})
@example({"densemixer": {"a": 1, 1: None}})
def test_moesft_config_from_dict_raises_only_config_errors(data):
    only_config_errors(MoESFTConfig.from_dict, data)


@SETTINGS
@given(train_mapping())
@example({"model": {0: None}, "data": {}, "training": {"output_dir": "o"}})
def test_parse_train_config_raises_only_config_errors(data):
    only_config_errors(parse_train_config, data)


@SETTINGS
@given(mapping_for(AblateConfig))
@example({"model": {"tiny": "qwen3_moe"}, "benchmarks": ["boolq"], "profile": "p"})
def test_ablate_config_raises_only_config_errors(data):
    only_config_errors(lambda d: from_dict(AblateConfig, d), data)


@pytest.mark.parametrize("tiny", ["foo_moe", "", "Qwen3_MoE"])
def test_unknown_tiny_model_type_is_refused_at_validation(tiny):
    with pytest.raises(ConfigError, match=r"model\.tiny: .*qwen3_moe"):
        ModelConfig(tiny=tiny)
