"""Math RL prompts: (prompt, gold answer) records from the same sources, templates and mixing as SFT.

    prompts = rl_prompts(tokenizer, cfg)    # cfg: a DataConfig (files / sources / dataset, prompt_template)
    for p in prompts: p.prompt, p.answer    # text ready for generation, gold answer string

Two record kinds (map other column names with a source's `columns`):
    LLM-Adapters   {instruction, input?, answer, system?}: gold = `answer` (the math test files)
    GSM8K          {question, answer: "...reasoning... #### 42"}: gold = the text after `####`
                   (thousands separators removed), prompt from `question`
The prompt is the Alpaca prompt (`prompt_template: alpaca`, exactly what `moe-sft eval` feeds),
or the chat template with its generation prompt (`chat`, or a Jinja file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formats import parse_alpaca
from .loader import read_records
from .records import Record
from .templates import Encoder


@dataclass(frozen=True)
class RLPrompt:
    prompt: str  # rendered, ends where the model's answer starts
    answer: str  # gold answer
    where: str  # provenance: file and line / row
    source: str  # source name (for per-source reward statistics)


def _gold(rec: Record, d: dict) -> tuple[dict, str]:
    """(an alpaca-style record for the prompt, the gold answer)."""
    answer = d.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise rec.error("answer", f"RL prompts need a gold `answer` (a string or number), got {answer!r}")
    if "question" in d and "instruction" not in d:
        if not isinstance(answer, str) or "####" not in answer:
            raise rec.error("answer", "a GSM8K-style record's answer must end with `#### <final answer>`")
        gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not gold:
            raise rec.error("answer", "nothing after `####`")
        return {"instruction": d["question"], "system": d.get("system")}, gold
    if "instruction" not in d:
        raise rec.error(None, f"RL prompts need `instruction` + `answer` (LLM-Adapters) or `question` + `answer` "
                        f"(GSM8K), found keys {sorted(map(str, d))}; map other names with the source's `columns`")  # fmt: skip
    return {k: d.get(k) for k in ("instruction", "input", "system")}, str(answer).strip()


def rl_prompts(tokenizer, cfg, resolve=Path) -> list[RLPrompt]:
    """Every (prompt, gold answer) of `cfg`'s data, validated before any is returned.
    `cfg.format` is not used: the record kind is read from each record's keys."""
    encoder = Encoder(tokenizer, cfg.prompt_template, resolve=resolve)
    out = []
    for rec in read_records(cfg, resolve, detect_formats=False):
        if not isinstance(rec.data, dict):
            raise rec.error(None, f"a record must be an object, got {type(rec.data).__name__}")
        fields, gold = _gold(rec, rec.data)
        conv = parse_alpaca(rec, fields, require_output=False)
        out.append(RLPrompt(encoder.prompt(conv, rec), gold, rec.where, rec.source))
    return out
