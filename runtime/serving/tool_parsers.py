"""A chat model's tool calls, parsed out of its text (pure, no torch): what the REST gateway turns into OpenAI's
`message.tool_calls` (and, streaming, `delta.tool_calls`).

    stream = ToolCallStream("hermes")
    for piece in texts:
        for event in stream.feed(piece): ...     # Content("Let me look.") / Call(0, "get_weather", '{"city": "Paris"}')
    for event in stream.finish(): ...

    content, calls = parse_tool_calls("hermes", text)   # the same, for a whole reply

The formats (vLLM's `--tool-call-parser` names):
  hermes        Hermes / Qwen 2.5+ / Qwen 3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several
                in a row; the text before the first is the message's content.
  llama3_json   Llama 3.1+: the whole reply is `{"name": ..., "parameters": {...}}` (several joined by `;`),
                optionally after `<|python_tag|>`; a reply that does not parse is content.
  mistral       Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the v11 tokenizer's
                `[TOOL_CALLS]name[ARGS]{...}` (one per call); the text before is content.
  auto          any of the three, told apart by their markers (the router, which has no chat template to go by).

A call region that does not parse is given back as content, text and all: nothing the model wrote is lost.
One code path for both: a whole reply is parsed by feeding it to a stream at once, so streamed and unary
replies always agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json", "mistral", "auto")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
MISTRAL_START, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
PYTHON_TAG = "<|python_tag|>"
# Special tokens that close a Llama 3 call turn, which a reply detokenized with its special tokens may end with.
_LLAMA_TRAILERS = ("<|eom_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Call:
    index: int        # the call's position in the reply (OpenAI's tool_calls[i].index)
    name: str
    arguments: str    # a JSON object's text, as OpenAI's function.arguments


def parser_from_chat_template(template: str | None) -> str | None:
    """The format a chat template writes tool calls in (its own markers), else None (unknown)."""
    if not template:
        return None
    if HERMES_START in template:
        return "hermes"
    if MISTRAL_START in template:
        return "mistral"
    if PYTHON_TAG in template or ("tools" in template and '"parameters"' in template):
        return "llama3_json"
    return None


def _call(obj, index: int) -> Call | None:
    """One {"name", "arguments"|"parameters"} object -> a Call, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):   # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(index, obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list | None:
    """Consecutive JSON values in `text`, separated by whitespace, `;` or `,`; None if anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _calls(values, first: int) -> list[Call] | None:
    """JSON values (objects, or lists of them) -> Calls numbered from `first`; None unless every one is a call."""
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls = [_call(v, first + i) for i, v in enumerate(flat)]
    return calls if calls and all(calls) else None


def _parse_hermes_block(block: str, index: int) -> Call | None:
    values = _json_values(block.strip())
    return _call(values[0], index) if values and len(values) == 1 else None


def _parse_mistral(region: str, first: int) -> list[Call] | None:
    """The text after `[TOOL_CALLS]` (every marker of a v11 reply included) -> its calls."""
    if MISTRAL_ARGS in region:   # v11: name[ARGS]{...}, each call after its own [TOOL_CALLS]
        calls = []
        for part in region.split(MISTRAL_START):
            if not part.strip():
                continue
            name, sep, args = part.partition(MISTRAL_ARGS)
            name = name.split(MISTRAL_CALL_ID)[0].strip()
            values = _json_values(args) if sep else None
            if not values or len(values) != 1 or not (call := _call({"name": name, "arguments": values[0]},
                                                                    first + len(calls))):
                return None
            calls.append(call)
        return calls or None
    values = _json_values(region.replace(MISTRAL_START, " "))
    return _calls(values, first) if values else None


def _parse_llama(region: str, first: int) -> list[Call] | None:
    text = region.strip()
    for trailer in _LLAMA_TRAILERS:
        text = text.removesuffix(trailer)
    text = text.replace(PYTHON_TAG, " ")
    values = _json_values(text)
    return _calls(values, first) if values else None


def _held_prefix(text: str, markers) -> int:
    """How many characters at the end of `text` could be the start of a marker (held back until known)."""
    most = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), most, -1):
            if text.endswith(marker[:n]):
                most = n
                break
    return most


class ToolCallStream:
    """A reply's text in pieces -> Content and Call events, in order (see the module's docstring).

    State: `content` mode streams text, holding back a tail that may be a marker's start; at a marker the
    rest is a call region, buffered and parsed (hermes: each `</tool_call>` block as it closes; the others at
    the end). Whatever does not parse comes back as Content at the end."""

    def __init__(self, parser: str):
        if parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {parser!r}")
        self.parser = parser
        self.kind: str | None = None   # the format found: hermes, mistral, llama3_json (None: content so far)
        self.pending = ""              # content held back, or the call region's text
        self.started = False           # any text streamed yet (a Llama 3 call is the whole reply)
        self.calls = 0
        self.leftover = ""             # what did not parse, or was written between hermes blocks

    def _markers(self) -> dict[str, str]:
        markers = {"hermes": {HERMES_START: "hermes"}, "mistral": {MISTRAL_START: "mistral"}, "llama3_json": {},
                   "auto": {HERMES_START: "hermes", MISTRAL_START: "mistral"}}[self.parser]
        if self.parser in ("llama3_json", "auto") and not self.started:
            markers = {**markers, PYTHON_TAG: "llama3_json"}
        return markers

    def feed(self, text: str) -> list:
        if not text:
            return []
        self.pending += text
        out = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list) -> bool:
        """Moves on as far as the text allows; True if it should be called again."""
        if self.kind is None:
            if not self.started and self.parser in ("llama3_json", "auto"):
                stripped = self.pending.lstrip()
                if stripped.startswith("{"):   # a Llama 3 call is the whole reply: hold it all
                    self.kind = "llama3_json"
                    return False
                if not stripped or (len(stripped) < len(PYTHON_TAG) and PYTHON_TAG.startswith(stripped)):
                    return False   # only spaces so far, or perhaps the tag: wait
            markers = self._markers()
            found = [(self.pending.find(m), m) for m in markers if m in self.pending]
            if found:
                at, marker = min(found)
                if self.pending[:at]:
                    out.append(Content(self.pending[:at]))
                self.kind, self.pending, self.started = markers[marker], self.pending[at:], True
                return True
            hold = _held_prefix(self.pending, markers)
            ready = self.pending[:len(self.pending) - hold]
            if ready:
                out.append(Content(ready))
                self.started, self.pending = True, self.pending[len(ready):]
            return False
        if self.kind != "hermes":
            return False   # mistral, llama3_json: parsed at the end
        if not self.pending.startswith(HERMES_START):   # between blocks: look for the next one
            start = self.pending.find(HERMES_START)
            cut = start if start >= 0 else len(self.pending) - _held_prefix(self.pending, (HERMES_START,))
            self.leftover += self.pending[:cut]
            self.pending = self.pending[cut:]
            if start < 0:
                return False
        end = self.pending.find(HERMES_END)
        if end < 0:
            return False
        call = _parse_hermes_block(self.pending[len(HERMES_START):end], self.calls)
        if call:
            out.append(call)
            self.calls += 1
        else:
            self.leftover += self.pending[:end + len(HERMES_END)]
        self.pending = self.pending[end + len(HERMES_END):]
        return bool(self.pending)

    def finish(self) -> list:
        """The events the end of the reply settles: held-back content, the last calls, what did not parse."""
        out, region, self.pending = [], self.pending, ""
        if self.kind is None:
            if region:
                out.append(Content(region))
        elif self.kind == "hermes":
            if region.startswith(HERMES_START) and (call := _parse_hermes_block(region[len(HERMES_START):],
                                                                               self.calls)):
                out.append(call)   # an unclosed last block (the reply ended before </tool_call>)
                self.calls += 1
            else:
                self.leftover += region
        else:
            calls = (_parse_mistral(region[len(MISTRAL_START):], self.calls) if self.kind == "mistral"
                     else _parse_llama(region, self.calls))
            if calls:
                out.extend(calls)
                self.calls += len(calls)
            else:
                self.leftover += region
        if self.leftover.strip():   # the spaces between hermes blocks are no content
            out.append(Content(self.leftover))
            self.leftover = ""
        return out


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[Call]]:
    """A whole reply -> (its content, None where there is none but calls; its calls)."""
    stream = ToolCallStream(parser)
    events = stream.feed(text) + stream.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls = [e for e in events if isinstance(e, Call)]
    if calls and not content.strip():
        return None, calls
    return content, calls
