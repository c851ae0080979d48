"""Tokenizer: prompts and chat messages to ids, ids back to text incrementally."""

from __future__ import annotations

import bisect
import functools
import itertools
import json
from pathlib import Path

from kubellm.runtime.errors import RequestError


class Tokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path)
        self.eos_token_ids = self._eos_ids(path)
        self.vocab_size = len(self.hf)
        # Characters the longest token covers (byte-level vocabularies spell a token by its bytes, at least
        # one per character): a text longer than max_tokens times this has more than max_tokens tokens.
        self.max_token_chars = max(map(len, self.hf.get_vocab()), default=1) or 1
        # A batch's prompts share their words, and lists repeat across requests: each word is looked up once.
        self.word_ids = functools.lru_cache(maxsize=4096)(self._word_ids)
        self.ids_containing = functools.lru_cache(maxsize=4096)(self._ids_containing)
        self._token_text = functools.lru_cache(maxsize=65536)(lambda t: self.hf.decode([t]))

    def _eos_ids(self, path: Path) -> set[int]:
        ids = set()
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None and not ids:
            ids.add(self.hf.eos_token_id)
        return ids

    def encode_prompt(self, prompt, field: str = "prompt", max_tokens: int | None = None) -> list[int]:
        """A string, a list of token ids, or OpenAI-style chat messages -> token ids.

        `max_tokens`: the most a prompt may have (the engine's session_len less one). A prompt certain to
        have more is refused before it is tokenized, so that its size costs the engine thread no time."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(f"{field}: empty prompt; give at least one character of text")
            _check_unicode(prompt, field)
            self._check_chars(len(prompt), max_tokens, field)
            return self.hf.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            if max_tokens is not None and len(prompt) > max_tokens:
                raise RequestError(f"{field}: the prompt is {len(prompt)} tokens but at most {max_tokens} fit "
                                   f"(session_len less one to generate); shorten it or raise session_len")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return list(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.encode_chat(list(prompt), field, max_tokens)
        if isinstance(prompt, dict) and "messages" in prompt:   # a conversation with tools: OpenAI's two lists
            unknown = sorted(set(prompt) - {"messages", "tools"})
            if unknown:
                raise RequestError(f"{field}: a conversation holds 'messages' and 'tools', not {unknown[0]!r}")
            messages, tools = prompt["messages"], prompt.get("tools")
            if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RequestError(f"{field}.messages: expected a non-empty list of chat messages")
            return self.encode_chat(list(messages), f"{field}.messages", max_tokens, tools=tools)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise RequestError(f"{field}: empty prompt; give text, token ids or chat messages")
        raise RequestError(f"{field}: expected a string, a list of token ids, a list of {{'role', 'content'}} "
                           f"messages or {{'messages', 'tools'}}, got {type(prompt).__name__}")

    def encode_chat(self, messages: list[dict], field: str = "prompt", max_tokens: int | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        """OpenAI-style messages (an assistant's may carry `tool_calls` instead of content; a "tool" message its
        `tool_call_id` and `name`) and an optional OpenAI `tools` list, rendered by the model's chat template
        (`apply_chat_template(messages, tools=tools)`: a template that supports tools lists their definitions)."""
        from jinja2 import TemplateError

        messages = [_template_message(m, f"{field}[{i}]") for i, m in enumerate(messages)]
        if tools is not None:
            _check_tools(tools, field.removesuffix(".messages") + ".tools")
        if not self.hf.chat_template:
            raise RequestError(f"{field}: this model has no chat template; send plain text prompts instead")
        # A message counts one character at least: a template may render even an empty one; tools count their JSON.
        chars = sum(len(m["role"]) + len(m["content"] or "") + len(json.dumps(m.get("tool_calls", ""))) + 1
                    for m in messages) + (len(json.dumps(tools)) if tools else 0)
        self._check_chars(chars, max_tokens, field)
        try:
            text = self.hf.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                               tokenize=False)
        except TemplateError as err:   # the template's own rules (roles alternating, a known role, ...)
            raise RequestError(f"{field}: the model's chat template refused these messages: {err}") from None
        # The template already holds any BOS token it wants.
        return self.hf.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """A token's text decoded alone (logprobs' `token`); cached, as the same tokens recur."""
        return self._token_text(token_id)

    def _check_chars(self, chars: int, max_tokens: int | None, field: str) -> None:
        if max_tokens is not None and chars > max_tokens * self.max_token_chars:
            raise RequestError(f"{field}: the prompt is {chars} characters, more than {max_tokens} tokens (session_len "
                               f"less one) of at most {self.max_token_chars} characters each can hold; shorten it "
                               "or raise session_len")

    def _word_ids(self, word: str) -> list[list[int]]:
        """Tokenizations of a word as it may appear in text: alone and after a space."""
        variants = {tuple(self.hf.encode(word, add_special_tokens=False)),
                    tuple(self.hf.encode(" " + word, add_special_tokens=False))}
        return [list(v) for v in variants if v]

    def _ids_containing(self, word: str) -> tuple[int, ...]:
        """Every vocabulary token whose text contains `word`.

        One search through all token texts joined (str.find, in C) rather than a Python test per token: a
        bad word costs about 0.1 ms instead of 3 ms on a 49k vocabulary, on the engine thread."""
        if not hasattr(self, "_token_texts"):
            self._token_texts = self.hf.batch_decode([[i] for i in range(self.vocab_size)])
            self._joined = _SEPARATOR.join(self._token_texts)
            self._starts = list(itertools.accumulate((len(t) + 1 for t in self._token_texts[:-1]), initial=0))
        if _SEPARATOR in word:   # a match could span two tokens: test each token
            return tuple(i for i, text in enumerate(self._token_texts) if word in text)
        found, pos = [], self._joined.find(word)
        while pos >= 0:
            i = bisect.bisect_right(self._starts, pos) - 1
            found.append(i)
            if len(found) == _SEEK_HITS:   # a common word: testing each remaining token is now the faster way
                texts = self._token_texts
                found += [j for j in range(i + 1, len(texts)) if word in texts[j]]
                break
            if i + 1 == len(self._starts):
                break
            pos = self._joined.find(word, self._starts[i + 1])   # the next token: one hit per token
        return tuple(found)


def _template_message(m: dict, field: str) -> dict:
    """A message checked and shaped for chat templates: a tool call's `arguments` (OpenAI sends JSON text) becomes
    the object that templates write with `tojson` (as vLLM does), so it is not quoted twice."""
    role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if not isinstance(role, str) or not (isinstance(content, str) or (content is None and calls)):
        raise RequestError(f"{field}: a chat message needs string 'role' and 'content' keys (content may be null "
                           f"beside tool_calls), got {m!r}")
    _check_unicode(role, f"{field}.role")
    if content is not None:
        _check_unicode(content, f"{field}.content")
    for key in ("tool_call_id", "name"):
        if key in m and not isinstance(m[key], str):
            raise RequestError(f"{field}.{key}: expected a string, got {type(m[key]).__name__}")
    if calls is None:
        return m
    if not isinstance(calls, list):
        raise RequestError(f"{field}.tool_calls: expected a list of tool calls, got {type(calls).__name__}")
    shaped = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{field}.tool_calls[{j}]: expected {{'type': 'function', 'function': {{'name', "
                               f"'arguments'}}}}, got {call!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as err:
                raise RequestError(f"{field}.tool_calls[{j}].function.arguments: not valid JSON ({err})") from None
        shaped.append({**call, "function": {**function, "arguments": arguments}})
    return {**m, "tool_calls": shaped}


def _check_tools(tools, field: str) -> None:
    if not isinstance(tools, list):
        raise RequestError(f"{field}: expected a list of OpenAI tools, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"{field}[{i}]: expected {{'type': 'function', 'function': {{'name', 'description', "
                               f"'parameters'}}}}, got {tool!r}")


def _check_unicode(text: str, field: str) -> None:
    """Python strings may hold lone surrogates (JSON's "\\ud800" decodes to one), which are not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{field}: character {err.start} is a lone surrogate (U+{ord(text[err.start]):04X}), "
                           "which is not Unicode text; send valid UTF-8") from None


_SEPARATOR = "\x00"   # between token texts in Tokenizer._joined; a word holding it takes the slow path
_SEEK_HITS = 2048     # a seek per hit costs ~0.6 us, a test per token ~60 ns: past this many hits, test them all


class IncrementalDetokenizer:
    """Decodes a growing id list to text deltas without re-decoding everything each step.

    A few tokens of context before the new ones keep word-boundary spaces right, and text
    ending in an incomplete UTF-8 character is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tok = tokenizer.hf
        self.skip = skip_special_tokens
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)

    def delta(self, all_ids: list[int]) -> str:
        prefix = self.tok.decode(all_ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        text = self.tok.decode(all_ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
        return text[len(prefix):]
