"""Answer extraction and verdicts, as data: one `Rule` per benchmark in `RULES`.

The rules follow LLM-Adapters' evaluation scripts (Hu et al., 2023):

- `number` (GSM8K, SVAMP, MAWPS, AddSub, MultiArith, SingleEq): drop every comma, take the LAST
  number (optional minus sign, digits, optional decimal part) in the generated text; correct
  when |pred - gold| <= `tolerance` (1e-3). No number at all is wrong.
- `letter` (AQuA): the option letter. Only a capital A-E standing alone counts ("(C)", "C.",
  "answer is C"); a capital inside a word ("Because", "Answer") does not. The LAST such letter
  wins, so a rationale that opens with the article "A" still ends on its real answer.
  LLM-Adapters took the first capital A-E anywhere in the text, even inside words; see README.
- `word` (commonsense): the FIRST whole-word occurrence of one of the benchmark's answer words
  (true/false, solution1/2, answer1-5, ending1-4, option1/2), case-insensitive, compared with the
  gold word in lower case. LLM-Adapters matched case-sensitively and also inside longer words.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

# An optional minus, digits, an optional "." and more digits: "-3", "8.0", "12." (commas removed first).
_NUMBER = re.compile(r"-?\d+\.?\d*")


@dataclass(frozen=True)
class Rule:
    """How to read an answer out of a generation and judge it against the gold label."""

    kind: Literal["number", "letter", "word"]
    choices: tuple[str, ...] = ()  # letter / word: the answers the model may give
    tolerance: float = 1e-3  # number: |pred - gold| <= tolerance is correct


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
    "siqa": Rule("word", ("answer1", "answer2", "answer3")),
    "hellaswag": Rule("word", ("ending1", "ending2", "ending3", "ending4")),
    "winogrande": Rule("word", ("option1", "option2")),
    "arc_e": Rule("word", _ANSWERS),
    "arc_c": Rule("word", _ANSWERS),
    "obqa": Rule("word", _ANSWERS),
}


def _alternation(choices: tuple[str, ...]) -> str:
    # longest first so that no choice is shadowed by a shorter one that prefixes it
    return "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))


def extract(rule: Rule, text: str) -> float | str | None:
    """The answer `text` gives under `rule`: a float (number), a letter or a lower-case word;
    None when the text holds no answer."""
    if rule.kind == "number":
        found = _NUMBER.findall(text.replace(",", ""))
        return float(found[-1]) if found else None
    if rule.kind == "letter":
        found = re.findall(rf"(?<![A-Za-z0-9])({_alternation(rule.choices)})(?![A-Za-z0-9])", text)
        return found[-1] if found else None
    match = re.search(rf"\b({_alternation(rule.choices)})\b", text, flags=re.IGNORECASE)
    return match.group(1).lower() if match else None


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


def score(rule: Rule, text: str, gold: str) -> tuple[float | str | None, bool]:
    """(extracted answer, verdict) for one generation."""
    prediction = extract(rule, text)
    return prediction, is_correct(rule, prediction, gold)
