"""Answer extraction and verdicts, as data: one `Rule` per benchmark in `RULES`, one `Finder` per
(mode, rule kind) in `MODES`.

Two extraction modes:

`llm_adapters` (default) reproduces LLM-Adapters' evaluation scripts (Hu et al., 2023:
evaluate.py `extract_answer_number` / `extract_answer_letter`, commonsense_evaluate.py
`extract_answer`) exactly, quirks included, so numbers are comparable with published ones:

- `number` (GSM8K, SVAMP, MAWPS, AddSub, MultiArith, SingleEq): drop every comma, take the LAST
  match of `-?\\d+\\.?\\d*` in the generated text; correct when |pred - gold| <= `tolerance`
  (1e-3). No number at all is wrong.
- `letter` (AQuA): the FIRST match of `A|B|C|D|E` anywhere in the text, case-sensitive, inside
  words too: "Because ..., the answer is C" reads as B.
- `word` (commonsense): the FIRST case-sensitive substring match of the benchmark's answer words
  (`true|false`, `solution1|solution2`, `answer1|...|answer5` for SIQA and ARC/OBQA alike,
  `ending1|...|ending4`, `option1|option2`): "True" is no answer, "untrue" reads as true,
  "answer10" as answer1.

`strict` is a stricter reading of the same generations (not comparable with published numbers):

- `number`: as above.
- `letter`: only a capital A-E standing alone counts ("(C)", "C.", "answer is C"), never one
  inside a word; the LAST such letter wins, so a rationale opening with the article "A" still
  ends on its real answer.
- `word`: the FIRST whole-word occurrence of one of the benchmark's answer words, in any case,
  compared in lower case.

No answer is `None` (LLM-Adapters' "" / inf) and always wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError

Mode = Literal["llm_adapters", "strict"]


@dataclass(frozen=True)
class Rule:
    """How to read an answer out of a generation and judge it against the gold label."""

    kind: Literal["number", "letter", "word"]
    choices: tuple[str, ...] = ()  # letter / word: the valid gold labels (and the answers strict mode reads)
    tolerance: float = 1e-3  # number: |pred - gold| <= tolerance is correct
    searched: tuple[str, ...] = ()  # word: what LLM-Adapters' regex looks for, when more than `choices`


@dataclass(frozen=True)
class Finder:
    """How one mode finds one kind of answer: `pattern` ("{choices}" is the alternation of the
    rule's `choices`, or of its `searched` words when `published_words` and it has some) with
    `flags`; the `pick` match wins; words are lower-cased when `lower`."""

    pattern: str
    pick: Literal["first", "last"]
    flags: int = 0
    lower: bool = False
    published_words: bool = False


_NUMBER = Finder(r"-?\d+\.?\d*", "last")  # commas are dropped first: "1,234" -> 1234

# mode -> rule kind -> finder. The one place where the modes differ.
MODES: dict[str, dict[str, Finder]] = {
    "llm_adapters": {
        "number": _NUMBER,
        "letter": Finder("{choices}", "first"),
        "word": Finder("{choices}", "first", published_words=True),
    },
    "strict": {
        "number": _NUMBER,
        "letter": Finder(r"(?<![A-Za-z0-9])({choices})(?![A-Za-z0-9])", "last"),
        "word": Finder(r"\b({choices})\b", "first", flags=re.IGNORECASE, lower=True),
    },
}
DEFAULT_MODE: Mode = "llm_adapters"

_MATH = Rule("number")
_ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")

# benchmark name (moe_sft.evaluation.benchmarks.BENCHMARKS) -> rule
RULES: dict[str, Rule] = {
    "gsm8k": _MATH,
    "svamp": _MATH,
    "mawps": _MATH,
    "aqua": Rule("letter", ("A", "B", "C", "D", "E")),
    "addsub": _MATH,
    "multiarith": _MATH,
    "singleeq": _MATH,
    "boolq": Rule("word", ("true", "false")),
    "piqa": Rule("word", ("solution1", "solution2")),
    "siqa": Rule("word", ("answer1", "answer2", "answer3"), searched=_ANSWERS),  # LLM-Adapters shares ARC's regex
    "hellaswag": Rule("word", ("ending1", "ending2", "ending3", "ending4")),
    "winogrande": Rule("word", ("option1", "option2")),
    "arc_e": Rule("word", _ANSWERS),
    "arc_c": Rule("word", _ANSWERS),
    "obqa": Rule("word", _ANSWERS),
}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"extraction={mode!r}; choose one of {', '.join(MODES)} (default {DEFAULT_MODE})")


def _alternation(choices: tuple[str, ...]) -> str:
    # Longest first, so no choice is shadowed by a shorter one that prefixes it. No benchmark's
    # words prefix one another, so this matches what LLM-Adapters' `a|b|c` finds.
    return "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))


def extract(rule: Rule, text: str, mode: Mode = DEFAULT_MODE) -> float | str | None:
    """The answer `text` gives under `rule` read the `mode` way: a float (number), a letter or an
    answer word; None when the text holds no answer."""
    check_mode(mode)
    finder = MODES[mode][rule.kind]
    if rule.kind == "number":
        text = text.replace(",", "")
    words = rule.searched if finder.published_words and rule.searched else rule.choices
    pattern = finder.pattern.format(choices=_alternation(words))
    found = re.findall(pattern, text, flags=finder.flags)
    if not found:
        return None
    answer = found[0] if finder.pick == "first" else found[-1]
    if rule.kind == "number":
        return float(answer)
    return answer.lower() if finder.lower else answer


def parse_gold(rule: Rule, gold: str) -> float | str:
    """The gold label as `extract` returns answers; ValueError if it cannot be one."""
    if rule.kind == "number":
        try:
            value = float(str(gold).replace(",", ""))
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"gold {gold!r} is not a finite number")
        return value
    value = str(gold).strip() if rule.kind == "letter" else str(gold).strip().lower()
    if value not in rule.choices:
        raise ValueError(f"gold {gold!r} is not one of {'/'.join(rule.choices)}")
    return value


def is_correct(rule: Rule, prediction: float | str | None, gold: str) -> bool:
    if prediction is None:
        return False
    expected = parse_gold(rule, gold)
    if rule.kind == "number":
        return abs(prediction - expected) <= rule.tolerance
    return prediction == expected


def score(rule: Rule, text: str, gold: str, mode: Mode = DEFAULT_MODE) -> tuple[float | str | None, bool]:
    """(extracted answer, verdict) for one generation under extraction `mode`."""
    prediction = extract(rule, text, mode)
    return prediction, is_correct(rule, prediction, gold)
