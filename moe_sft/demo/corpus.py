"""The demo's synthetic corpus: nine character-level skills at long-tailed (Zipf) frequencies.

Each example is a question and its answer, e.g. `A 47+85` -> `132`. As a chat record
({"messages": [user, assistant]}) the demo tokenizer's template renders it as
`<s>A 47+85=132</s>`; only `132</s>` carries labels. Skill i (0-based, in SKILLS order) is
drawn with probability (i+1)^-ZIPF_S / sum_j (j+1)^-ZIPF_S, so a few skills dominate and
the last ones are rare. The three letter skills come last: the rarest skills have inputs of
their own, so routing gives them rarely used experts of their own (the demo's long tail; the
recipe experiments are in docs/demo.md).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

ZIPF_S = 1.2  # Zipf exponent of the skill frequencies


@dataclass(frozen=True)
class Skill:
    name: str
    code: str  # one capital letter that starts the question
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (arguments, answer)


def _digits(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def _letters(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _copy(rng):
    s = _digits(rng)
    return s, s


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", str(a + b)


def _reverse(rng):
    s = _letters(rng)
    return s, s[::-1]


def _max(rng):
    s = _digits(rng, 4, 6)
    return s, max(s)


def _sort(rng):
    s = _digits(rng)
    return s, "".join(sorted(s))


def _sub(rng):
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"{a}-{b}", str(a - b)


def _mul(rng):
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"{a}*{b}", str(a * b)


def _next_letter(rng):
    s = _letters(rng)
    return s, "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


def _count(rng):
    s = _letters(rng, 1, 9)
    return s, str(len(s))


# Most frequent first; the letter skills (reverse, next_letter, count) are the rarest.
SKILLS: tuple[Skill, ...] = (
    Skill("copy", "C", _copy),
    Skill("add", "A", _add),
    Skill("max", "M", _max),
    Skill("sort", "S", _sort),
    Skill("sub", "D", _sub),
    Skill("mul", "X", _mul),
    Skill("reverse", "R", _reverse),
    Skill("next_letter", "N", _next_letter),
    Skill("count", "K", _count),
)
SKILL_NAMES = tuple(s.name for s in SKILLS)
_BY_NAME = {s.name: s for s in SKILLS}

# Every character a question or answer can contain (the tokenizer's vocabulary besides specials).
CHARS = string.digits + string.ascii_lowercase + "".join(s.code for s in SKILLS) + " +-*="

# `<s>question=answer</s>`: prefix-stable (rendering the user turn alone with the generation
# prompt gives a prefix of the full text), as moe-sft train's chat data path requires.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<s>{{ m['content'] }}={% else %}"
    "{{ m['content'] }}</s>{% endif %}{% endfor %}"
)


def skill_weights(names=SKILL_NAMES, s: float = ZIPF_S) -> dict[str, float]:
    """Zipf probabilities of the skills, in SKILLS order."""
    raw = [(i + 1) ** -s for i in range(len(names))]
    total = sum(raw)
    return {n: w / total for n, w in zip(names, raw)}


def example(skill: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of `skill`."""
    sk = _BY_NAME[skill]
    args, answer = sk.make(rng)
    return f"{sk.code} {args}", answer


def solve(question: str) -> str:
    """The answer to a question, recomputed from its text (a check on the generators)."""
    code, args = question.split(" ", 1)
    name = next(s.name for s in SKILLS if s.code == code)
    if name in ("add", "sub", "mul"):
        a, b = (int(x) for x in args.replace("+", " ").replace("-", " ").replace("*", " ").split())
        return str({"add": a + b, "sub": a - b, "mul": a * b}[name])
    return {
        "copy": lambda s: s,
        "reverse": lambda s: s[::-1],
        "max": lambda s: max(s),
        "sort": lambda s: "".join(sorted(s)),
        "next_letter": lambda s: "".join("a" if c == "z" else chr(ord(c) + 1) for c in s),
        "count": lambda s: str(len(s)),
    }[name](args)


def skill_of(question: str) -> str:
    code = question.split(" ", 1)[0]
    return next(s.name for s in SKILLS if s.code == code)


def eval_set(per_skill: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """`per_skill` distinct held-out (question, answer) pairs per skill."""
    rng = random.Random(seed)
    out = {}
    for name in SKILL_NAMES:
        seen: dict[str, str] = {}
        while len(seen) < per_skill:
            q, a = example(name, rng)
            seen.setdefault(q, a)
        out[name] = list(seen.items())
    return out


def sample(n: int, seed: int, *, skills: dict[str, float] | None = None, exclude=frozenset()) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs, skills drawn with probabilities `skills` (default: the
    Zipf weights), never a question in `exclude` (the held-out evaluation questions)."""
    weights = skills or skill_weights()
    names, probs = list(weights), list(weights.values())
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        q, a = example(rng.choices(names, probs)[0], rng)
        if q not in exclude:
            out.append((q, a))
    return out


def to_record(question: str, answer: str) -> dict:
    """A chat record for `moe-sft train` (data.format: messages)."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def tokenizer():
    """The demo's character-level tokenizer (WordLevel over CHARS, `tokenizers` built offline)."""
    from ..testing import tiny_tokenizer

    return tiny_tokenizer(CHARS, chat_template=CHAT_TEMPLATE)
