"""Prompt formats: turn a canonical example into token ids with the prompt masked.

`prompt_template` chooses how alpaca records become text:
    alpaca     the LLM-Adapters / Alpaca prompt (the one `moe-sft eval` uses); chat records
               (sharegpt, messages) still go through the tokenizer's chat template
    chat       every record through the tokenizer's chat template
    FILE.jinja every record through that Jinja chat template (instead of the tokenizer's)

Chat-template path: the conversation is rendered once; the characters each trained assistant
turn adds after the generation prompt (its content and end-of-turn marker) are located by
rendering the prefixes, and tokens whose first character lies there are trained.
Alpaca path: prompt and response segments are tokenized separately, so the boundary is exact
and the prompt's tokens are those the evaluation feeds; every response ends with EOS.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from ..evaluation.benchmarks import format_prompt  # one Alpaca prompt for training and evaluation
from .formats import Completion, Conversation, Example, Text, Tokens, Turn, parse
from .records import IGNORE_INDEX, DataError, Record

Segments = list[tuple[str, bool, bool]]  # (text, is a response, trained) in order


def resolve_template(prompt_template: str, resolve=Path) -> tuple[str, str | None]:
    """("alpaca" | "chat" | "jinja", the Jinja text for a template file)."""
    if prompt_template in ("alpaca", "chat"):
        return prompt_template, None
    path = resolve(prompt_template)
    if not path.is_file():
        raise DataError(f"data.prompt_template: Jinja template file {prompt_template!r} not found (looked at {path}); "
                        "give `alpaca`, `chat` or the path of a .jinja chat template")  # fmt: skip
    return "jinja", path.read_text()


class Encoder:
    """Encodes records for one tokenizer and prompt format.

    mask_history  train on the last assistant turn only (LLaMA-Factory's `mask_history`);
                  by default every assistant turn is trained
    """

    def __init__(self, tokenizer, prompt_template: str = "alpaca", mask_history: bool = False, resolve=Path):
        self.tokenizer = tokenizer
        self.mode, self.template = resolve_template(prompt_template, resolve)
        self.template_name = prompt_template
        self.mask_history = mask_history

    # ---- public --------------------------------------------------------------------------------
    def example(self, rec: Record, require_output: bool = True) -> Example:
        return parse(rec, rec.fmt, vocab_size=len(self.tokenizer), require_output=require_output)

    def encode(self, rec: Record) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one record; labels are -100 wherever nothing is trained."""
        ex = self.example(rec)
        if isinstance(ex, Tokens):
            return list(ex.input_ids), list(ex.labels)
        if isinstance(ex, Text):
            raise rec.error("text", "a `text` record (plain text) has no response to train on; SFT needs alpaca, "
                            "sharegpt, messages, prompt/completion or input_ids records")  # fmt: skip
        if isinstance(ex, Completion):
            return self._encode_segments([(ex.prompt, False, False), (ex.completion, True, True)])
        if self._use_chat(ex):
            return self._encode_chat(ex, rec)
        return self._encode_segments(self._alpaca_segments(ex, rec))

    def text(self, rec: Record) -> str:
        """The full text a record trains on (EOS written as its token string), for profiling
        passes; an alpaca record without `output` gives its prompt."""
        ex = self.example(rec, require_output=False)
        if isinstance(ex, Text):
            return ex.text
        if isinstance(ex, Tokens):
            return self.tokenizer.decode(ex.input_ids)
        eos = self.tokenizer.eos_token or ""
        if isinstance(ex, Completion):
            return ex.prompt + ex.completion + eos
        if self._use_chat(ex):
            return self._render(ex, ex.turns, False, rec)
        return "".join(text + (eos if response else "") for text, response, _ in self._alpaca_segments(ex, rec))

    def prompt(self, conv: Conversation, rec: Record) -> str:
        """The prompt text of a conversation that ends with a user turn, ready for generation
        (the Alpaca prompt, or the chat template with its generation prompt)."""
        if self._use_chat(conv):
            return self._render(conv, conv.turns, True, rec)
        return "".join(text for text, _, _ in self._alpaca_segments(conv, rec))

    # ---- chat template -------------------------------------------------------------------------
    def _use_chat(self, conv: Conversation) -> bool:
        return self.mode != "alpaca" or conv.chat

    def _check_template(self, rec: Record) -> None:
        if self.mode == "jinja" or getattr(self.tokenizer, "chat_template", None):
            return
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        if self.mode == "chat":
            why = "data.prompt_template is `chat`"
            fix = "set data.prompt_template: alpaca (the LLM-Adapters prompt, for alpaca records) or a Jinja chat template file"
        else:
            why = "chat records (sharegpt, messages) are rendered with the tokenizer's chat template"
            fix = ("set data.prompt_template to a Jinja chat template file (path/to/template.jinja), or give alpaca "
                   "records for the LLM-Adapters prompt")
        raise DataError(f"{rec.where}: {why}, but the tokenizer {name!r} has none (a base model?); {fix}")

    def _render(self, conv: Conversation, turns: list[Turn], generation_prompt: bool, rec: Record) -> str:
        self._check_template(rec)
        try:
            return self.tokenizer.apply_chat_template(
                [t.message() for t in turns], tools=conv.tools, chat_template=self.template, tokenize=False,
                add_generation_prompt=generation_prompt,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            which = f"the template {self.template_name}" if self.mode == "jinja" else "the tokenizer's chat template"
            raise DataError(f"{rec.where}: {which} refused this conversation: {e}") from None

    def _trained_turns(self, turns: list[Turn]) -> list[int]:
        idx = [i for i, t in enumerate(turns) if t.role == "assistant"]
        return idx[-1:] if self.mask_history else idx

    def _encode_chat(self, conv: Conversation, rec: Record) -> tuple[list[int], list[int]]:
        text = self._render(conv, conv.turns, False, rec)
        spans = []  # character ranges [a, b) of the trained assistant turns
        for i in self._trained_turns(conv.turns):
            before = self._render(conv, conv.turns[:i], True, rec)
            upto = self._render(conv, conv.turns[: i + 1], False, rec)
            if not (text.startswith(before) and text.startswith(upto) and len(upto) >= len(before)):
                raise DataError(
                    f"{rec.where}: the chat template does not render conversations prefix by prefix (turn {i} changes "
                    "what comes before it), so the assistant turns cannot be located; use a prefix-stable Jinja "
                    "template (data.prompt_template: FILE.jinja) or alpaca records with prompt_template: alpaca"
                )
            spans.append((len(before), len(upto)))
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise DataError(f"{rec.where}: chat records need a fast tokenizer (character offsets); "
                            f"{type(self.tokenizer).__name__} has none") from None  # fmt: skip
        ids = enc["input_ids"]
        labels = [
            tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, enc["offset_mapping"])
        ]
        return ids, labels

    # ---- Alpaca prompt -------------------------------------------------------------------------
    def _alpaca_segments(self, conv: Conversation, rec: Record) -> Segments:
        """The LLM-Adapters prompt, extended to system and history as LLaMA-Factory's `alpaca`
        template does: a system prompt replaces the fixed preamble, and each earlier turn is an
        `### Instruction:` / `### Response:` block, its response ended by EOS and a blank line."""
        if conv.tools:
            raise DataError(f"{rec.where}: `tools` have no place in the Alpaca prompt; set data.prompt_template: chat or "
                            "a Jinja chat template file")  # fmt: skip
        turns = conv.turns
        system = turns[0].content if turns and turns[0].role == "system" else None
        trained = set(self._trained_turns(turns))
        segments: Segments = []
        for i, t in enumerate(turns):
            if t.role == "user":
                segments.append((_alpaca_block(t, system, first=not segments), False, False))
            elif t.role == "assistant" and not t.tool_calls:
                segments.append((t.content, True, i in trained))
            elif not (i == 0 and t.role == "system"):
                raise DataError(f"{rec.where}: a {t.role!r} turn{' with tool calls' if t.tool_calls else ''} has no place "
                                "in the Alpaca prompt; set data.prompt_template: chat or a Jinja chat template file")  # fmt: skip
        return segments

    def _encode_segments(self, segments: Segments) -> tuple[list[int], list[int]]:
        """Each segment tokenized on its own (special tokens only before the first); every
        response ends with EOS, trained with it (so the model learns to stop) unless the turn is masked."""
        if self.tokenizer.eos_token_id is None:
            raise DataError(f"the tokenizer {type(self.tokenizer).__name__} has no EOS token, so responses could not end")
        ids, labels = [], []
        for k, (text, response, trained) in enumerate(segments):
            part = self.tokenizer(text, add_special_tokens=k == 0)["input_ids"]
            if response:
                part = part + [self.tokenizer.eos_token_id]
            ids += part
            labels += part if trained else [IGNORE_INDEX] * len(part)
        return ids, labels


def _alpaca_block(turn: Turn, system: str | None, first: bool) -> str:
    """One user turn in the Alpaca prompt. The first block with no system prompt is exactly
    `format_prompt(instruction, input)`, the evaluation's prompt."""
    instruction = turn.instruction if turn.instruction is not None else turn.content
    prompt = format_prompt(instruction, turn.input)
    if first and system is None:
        return prompt
    _preamble, sep, block = prompt.partition("### Instruction:")
    return (system + "\n\n" if first else "\n\n") + sep + block
