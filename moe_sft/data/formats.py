"""Record formats: validate a raw record and turn it into one canonical example.

    llm_adapters       Alpaca records (LLaMA-Factory's `alpaca` formatting; LLM-Adapters' data):
                       {instruction, input?, output, system?, history?: [[user, assistant], ...], tools?}
    sharegpt           {conversations: [{from, value}, ...], system?, tools?}; roles human, gpt, system
                       (first only), function_call, observation; keys and role names follow
                       LLaMA-Factory's `tags`
    messages           OpenAI chat: {messages: [{role, content, tool_calls?}, ...], tools?}; roles system,
                       user, assistant, tool
    prompt_completion  {prompt, completion}: plain text, no template
    tokenized          {input_ids, labels?}: token ids as they are (labels default to input_ids)
    text               {text}: plain text, for profiling passes only (there is no response to train on)

Every problem raises DataError naming the record (file and line/row) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .records import IGNORE_INDEX, DataError, Record

FORMATS = ("auto", "llm_adapters", "sharegpt", "messages", "prompt_completion", "tokenized", "text")
CHAT_FORMATS = ("sharegpt", "messages")
# LLaMA-Factory's `formatting` names, accepted as `format` values and resolved to ours on construction.
FORMAT_ALIASES = {"alpaca": "llm_adapters", "openai": "messages"}

# LLaMA-Factory's ShareGPT tags and their defaults (its dataset_info.json `tags` block).
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Turn:
    """One message. Alpaca user turns keep `instruction` and `input` apart, because the
    LLM-Adapters prompt puts them in separate sections; `content` is LLaMA-Factory's join of the two."""

    role: str  # system | user | assistant | tool
    content: str
    tool_calls: list[dict] | None = None
    instruction: str | None = None
    input: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # tool messages' `name` / `tool_call_id`

    def message(self) -> dict:
        """The turn as a chat-template message."""
        out = {"role": self.role, "content": self.content, **self.extra}
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        return out


@dataclass
class Conversation:
    turns: list[Turn]
    tools: list | None = None
    chat: bool = False  # from a chat-format record (always rendered with a chat template)


@dataclass
class Completion:
    prompt: str
    completion: str


@dataclass
class Tokens:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Text:
    text: str


Example = Conversation | Completion | Tokens | Text


# ---- field checks ----------------------------------------------------------------------------
def _str(rec: Record, name: str, value, *, optional: bool = False) -> str | None:
    """`value` as a string; None allowed when optional. Lone surrogates (from JSON \\u escapes)
    are refused here, since no tokenizer can encode them."""
    if value is None and optional:
        return None
    if value is None:
        kind = "" if rec.fmt == "auto" else f" (the source is read as {rec.fmt}: detected from its first record, or set by `format`)"
        raise rec.error(name, f"required, but missing or null{kind}")
    if not isinstance(value, str):
        want = "a string or null" if optional else "a string"
        raise rec.error(name, f"expected {want}, got {type(value).__name__} {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise rec.error(name, "not valid UTF-8 text (a lone surrogate \\u escape)") from None
    return value


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _tools(rec: Record, d: dict) -> list | None:
    """The `tools` field: a list of function schemas, or a JSON string of one (LLaMA-Factory)."""
    tools = d.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise rec.error("tools", f"not valid JSON ({e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise rec.error("tools", f"expected a list of tool schemas (objects), got {_short(tools)}")
    return tools


def _as_dict(rec: Record) -> dict:
    if not isinstance(rec.data, dict):
        raise rec.error(None, f"a record must be an object (a JSON dict), got {type(rec.data).__name__} {_short(rec.data)}")
    return rec.data


# ---- detection ---------------------------------------------------------------------------------
def detect(rec: Record) -> str:
    """The format of one record, from its keys."""
    d = _as_dict(rec)
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "llm_adapters"),
                     ("input_ids", "tokenized")):  # fmt: skip
        if key in d:
            return fmt
    if "prompt" in d and "completion" in d:
        return "prompt_completion"
    if "text" in d:
        return "text"
    raise rec.error(
        None,
        f"cannot tell the format (keys {sorted(map(str, d))}); expected instruction/input/output (llm_adapters, i.e. Alpaca), "
        "conversations (sharegpt), messages (OpenAI chat), prompt/completion or input_ids; set data.format "
        "(or the source's `format`) and map other column names with `columns`",
    )


def parse(rec: Record, fmt: str, vocab_size: int | None = None, require_output: bool = True) -> Example:
    """Validate `rec` as format `fmt` ("auto": detected from the record) and convert it.
    Without `require_output`, alpaca records may lack `output` (prompts to profile on)."""
    fmt = detect(rec) if fmt == "auto" else fmt
    d = _as_dict(rec)
    if fmt == "llm_adapters":
        return parse_alpaca(rec, d, require_output=require_output)
    if fmt == "sharegpt":
        return _sharegpt(rec, d)
    if fmt == "messages":
        return _messages(rec, d)
    if fmt == "prompt_completion":
        return Completion(_str(rec, "prompt", d.get("prompt")), _str(rec, "completion", d.get("completion")))
    if fmt == "tokenized":
        return _tokens(rec, d, vocab_size)
    if fmt == "text":
        return Text(_str(rec, "text", d.get("text")))
    raise DataError(f"{rec.where}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ---- alpaca ------------------------------------------------------------------------------------
def parse_alpaca(rec: Record, d: dict, *, require_output: bool) -> Conversation:
    """system, history pairs as earlier turns, then instruction + input as the user turn
    (joined by a newline, as LLaMA-Factory does) and output as the assistant turn."""
    instruction = _str(rec, "instruction", d.get("instruction"))
    inp = _str(rec, "input", d.get("input"), optional=True) or ""
    if not instruction.strip() and not inp.strip():
        raise rec.error("instruction", "empty (and no `input`), so there is no prompt")
    turns = []
    system = _str(rec, "system", d.get("system"), optional=True)
    if system:
        turns.append(Turn("system", system))
    history = d.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise rec.error("history", f"expected a list of [user, assistant] pairs, got {_short(history)}")
        for j, pair in enumerate(history):
            name = f"history[{j}]"
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise rec.error(name, f"expected a [user, assistant] pair of strings, got {_short(pair)}")
            user, assistant = (_str(rec, name, x) for x in pair)
            turns += [Turn("user", user, instruction=user), Turn("assistant", assistant)]
    user = "\n".join(part for part in (instruction, inp) if part)
    turns.append(Turn("user", user, instruction=instruction, input=inp))
    output = d.get("output")
    if require_output or output is not None:
        turns.append(Turn("assistant", _str(rec, "output", output)))
    return Conversation(turns, _tools(rec, d))


# ---- sharegpt ----------------------------------------------------------------------------------
def _sharegpt(rec: Record, d: dict) -> Conversation:
    """LLaMA-Factory's rules: an optional system message first (it overrides the `system`
    column), then user-side (user/observation) and assistant-side (assistant/function) messages
    alternate, starting with the user side and ending with the assistant side."""
    tags = {**SHAREGPT_TAGS, **(rec.tags or {})}
    msgs = d.get("conversations")
    if not isinstance(msgs, list) or not msgs:
        raise rec.error("conversations", f"expected a non-empty list of messages, got {_short(msgs)}")
    system = _str(rec, "system", d.get("system"), optional=True)
    user_side = {tags["user_tag"]: "user", tags["observation_tag"]: "tool"}
    assistant_side = {tags["assistant_tag"]: "assistant", tags["function_tag"]: "function"}
    turns: list[Turn] = []
    for j, m in enumerate(msgs):
        name = f"conversations[{j}]"
        if not isinstance(m, dict):
            raise rec.error(name, f"expected an object with `{tags['role_tag']}` and `{tags['content_tag']}`, got {_short(m)}")
        role = m.get(tags["role_tag"])
        content = _str(rec, f"{name}.{tags['content_tag']}", m.get(tags["content_tag"]))
        if j == 0 and role == tags["system_tag"]:
            system = content
            continue
        expected = user_side if len(turns) % 2 == 0 else assistant_side
        if not isinstance(role, str) or role not in expected:
            raise rec.error(
                f"{name}.{tags['role_tag']}",
                f"{_short(role)} here; message {j} must be one of {sorted(map(str, expected))} (user-side and "
                f"assistant-side messages alternate, starting with the user side; {tags['system_tag']!r} only first)",
            )
        if expected[role] == "function":
            turns.append(Turn("assistant", "", tool_calls=_function_call(rec, f"{name}.{tags['content_tag']}", content)))
        else:
            turns.append(Turn(expected[role], content))
    if not turns or len(turns) % 2:
        raise rec.error("conversations", "must end with an assistant-side message (gpt or function_call), so there is "
                        "a response to train on")  # fmt: skip
    if system:
        turns.insert(0, Turn("system", system))
    return Conversation(turns, _tools(rec, d), chat=True)


def _function_call(rec: Record, name: str, value: str) -> list[dict]:
    """A ShareGPT function_call message: JSON {"name", "arguments"} (or a list of them) ->
    OpenAI-style tool_calls, which chat templates render."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        raise rec.error(name, f"a function_call must be JSON {{\"name\": ..., \"arguments\": ...}} ({e.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise rec.error(name, f"a function call needs a string `name`, got {_short(call)}")
        out.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
    return out


# ---- OpenAI messages ---------------------------------------------------------------------------
def _messages(rec: Record, d: dict) -> Conversation:
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise rec.error("messages", f"expected a non-empty list of {{role, content}} objects, got {_short(msgs)}")
    turns = []
    for j, m in enumerate(msgs):
        name = f"messages[{j}]"
        if not isinstance(m, dict) or m.get("role") not in OPENAI_ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise rec.error(f"{name}.role", f"expected one of {', '.join(OPENAI_ROLES)}, got {_short(got)}")
        calls = _tool_calls(rec, name, m) if m["role"] == "assistant" else None
        optional = calls is not None  # a tool-call turn may have no content
        content = _str(rec, f"{name}.content", m.get("content"), optional=optional) or ""
        extra = {k: _str(rec, f"{name}.{k}", m[k]) for k in ("name", "tool_call_id") if m["role"] == "tool" and k in m}
        turns.append(Turn(m["role"], content, tool_calls=calls, extra=extra))
    if not any(t.role == "assistant" for t in turns):
        raise rec.error("messages", "no `assistant` message, so nothing to train on")
    return Conversation(turns, _tools(rec, d), chat=True)


def _tool_calls(rec: Record, name: str, m: dict) -> list[dict] | None:
    calls = m.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        raise rec.error(f"{name}.tool_calls", f"expected a non-empty list of tool calls, got {_short(calls)}")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            want = '{"function": {"name": ..., "arguments": ...}}'
            raise rec.error(f"{name}.tool_calls[{k}]", f"expected {want}, got {_short(call)}")
    return calls


# ---- pre-tokenised -----------------------------------------------------------------------------
def _token_list(rec: Record, name: str, value, vocab_size: int | None, allow_ignore: bool) -> list[int]:
    if not isinstance(value, list) or not value:
        raise rec.error(name, f"expected a non-empty list of token ids, got {_short(value)}")
    for i, t in enumerate(value):
        ok = isinstance(t, int) and not isinstance(t, bool)
        ok = ok and ((allow_ignore and t == IGNORE_INDEX) or (t >= 0 and (vocab_size is None or t < vocab_size)))
        if not ok:
            limit = f" and below the vocabulary size {vocab_size}" if vocab_size is not None else ""
            raise rec.error(f"{name}[{i}]", f"{_short(t)} is not a token id (an integer >= 0{limit}"
                            f"{', or -100' if allow_ignore else ''})")  # fmt: skip
    return value


def _tokens(rec: Record, d: dict, vocab_size: int | None) -> Tokens:
    """Labels follow transformers' convention: position i holds input_ids[i] (the model shifts)
    or -100; anything else means the labels were shifted or belong to other ids."""
    ids = _token_list(rec, "input_ids", d.get("input_ids"), vocab_size, allow_ignore=False)
    if d.get("labels") is None:
        return Tokens(ids, list(ids))
    labels = _token_list(rec, "labels", d["labels"], vocab_size, allow_ignore=True)
    if len(labels) != len(ids):
        raise rec.error("labels", f"{len(labels)} labels for {len(ids)} input_ids; they must have the same length")
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if lab not in (t, IGNORE_INDEX):
            raise rec.error(f"labels[{i}]", f"{lab} differs from input_ids[{i}]={t}; a label is the token itself "
                            "(trained) or -100 (ignored), the model shifts them")  # fmt: skip
    return Tokens(ids, labels)
