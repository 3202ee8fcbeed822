"""Verifiable rewards for `moe-sft rl`, as TRL reward functions.

TRL calls each reward function as `f(prompts=..., completions=..., completion_ids=..., **columns)`
with the dataset's other columns as lists (here `answer`: the gold answers) and expects one
float per completion; rewards are summed with the weights of the `rewards:` entries.

    accuracy     1.0 exactly when `moe-sft eval` counts the completion correct: the same rule
                 (`moe_sft.evaluation.extract.RULES[benchmark]`), extraction mode and text (the
                 completion with surrounding whitespace stripped, as eval strips its outputs)
    exact_match  1.0 when the stripped completion equals the stripped gold answer
    format       1.0 when the regular expression `pattern` is found in the completion
    function     a user callable named by import path "package.module:name"
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from ..config import ConfigError
from ..evaluation.extract import RULES, parse_gold, score


def _text(completion) -> str:
    """A completion as text (TRL gives chat completions as [{"role": "assistant", "content": ...}])."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


class AccuracyReward:
    def __init__(self, benchmark: str, extraction: str, name: str = "accuracy"):
        self.rule = RULES[benchmark]
        self.extraction = extraction
        self.__name__ = name  # TRL logs rewards/<__name__>/mean

    def __call__(self, completions, answer, **kwargs) -> list[float]:
        return [float(score(self.rule, _text(c).strip(), gold, self.extraction)[1]) for c, gold in zip(completions, answer)]


class ExactMatchReward:
    def __init__(self, name: str = "exact_match"):
        self.__name__ = name

    def __call__(self, completions, answer, **kwargs) -> list[float]:
        return [float(_text(c).strip() == str(gold).strip()) for c, gold in zip(completions, answer)]


class FormatReward:
    def __init__(self, pattern: str, name: str = "format"):
        self.pattern = re.compile(pattern)
        self.__name__ = name

    def __call__(self, completions, **kwargs) -> list[float]:
        return [float(self.pattern.search(_text(c)) is not None) for c in completions]


def import_function(path: str, where: str = "rewards[].function") -> Callable:
    """The callable named "package.module:attribute" (attribute may be dotted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {path!r} is not an import path; write it as package.module:function")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r} of {path!r} ({e}); install it or put it on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {path!r} is a {type(obj).__name__}, not a callable reward function")
    return obj


def build_rewards(specs) -> tuple[list[Callable], list[float]]:
    """(reward functions, their weights) for the `rewards:` entries (`RewardConfig`s). Names
    repeat with a suffix (accuracy, accuracy_2, ...) so TRL logs each one."""
    funcs, taken = [], set()
    for i, spec in enumerate(specs):
        if spec.type == "function":
            funcs.append(import_function(spec.function, f"rewards[{i}].function"))
            continue
        name, n = spec.type, 2
        while name in taken:
            name, n = f"{spec.type}_{n}", n + 1
        taken.add(name)
        if spec.type == "accuracy":
            funcs.append(AccuracyReward(spec.benchmark, spec.extraction, name))
        elif spec.type == "exact_match":
            funcs.append(ExactMatchReward(name))
        else:
            funcs.append(FormatReward(spec.pattern, name))
    return funcs, [spec.weight for spec in specs]


def check_golds(specs, prompts) -> None:
    """Every gold answer can be judged by every `accuracy` reward (checked before any model
    loads): e.g. a letter rule (aqua) refuses a numeric gold."""
    for i, spec in enumerate(specs):
        if spec.type != "accuracy":
            continue
        rule = RULES[spec.benchmark]
        for p in prompts:
            try:
                parse_gold(rule, p.answer)
            except ValueError as e:
                raise ConfigError(
                    f"{p.where}: {e}, which rewards[{i}] (accuracy, benchmark {spec.benchmark}: {rule.kind} answers) cannot "
                    "judge; fix the record, or set that reward's benchmark to one whose rule fits the data"
                ) from None
