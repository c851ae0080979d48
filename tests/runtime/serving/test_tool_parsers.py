"""Tool-call parsers (serving/tool_parsers.py): each format's replies -> content and calls, the same whether the
reply comes whole or in pieces of any size, content streamed as soon as it cannot be a marker."""

from __future__ import annotations

import json
import random

import pytest
from kubellm.runtime.serving.tool_parsers import (
    Call,
    Content,
    ToolCallStream,
    parse_tool_calls,
    parser_from_chat_template,
)

W = '{"city": "Paris"}'

CASES = [
    # parser, reply, content, [(name, arguments)]
    ("hermes", "plain text", "plain text", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", W)]),
    ("hermes", ('Let me look.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
               '"arguments": {"x": [1, 2]}}</tool_call>'), "Let me look.\n", [("a", "{}"), ("b", '{"x": [1, 2]}')]),
    ("hermes", '<tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call>', None, [("a", '{"k": 1}')]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"k": 1}}', None, [("a", '{"k": 1}')]),   # unclosed at the end
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call> and then', " and then", [("a", "{}")]),
    ("hermes", '{"name": "a", "parameters": {}}', '{"name": "a", "parameters": {}}', []),   # not its format
    ("hermes", "a < b and <tool", "a < b and <tool", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", W)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"y": 2}}<|eom_id|>',
     None, [("a", "{}"), ("b", '{"y": 2}')]),
    ("llama3_json", '  {"name": "a", "parameters": {"q": "caf\u00e9"}}', None, [("a", '{"q": "caf\u00e9"}')]),
    ("llama3_json", "{broken", "{broken", []),
    ("llama3_json", 'The answer is {"name": "a", "parameters": {}}', 'The answer is {"name": "a", "parameters": {}}',
     []),   # a call is the whole reply
    ("llama3_json", '{"name": "a", "parameters": {}} trailing', '{"name": "a", "parameters": {}} trailing', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [("get_weather", W)]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"z": null}}]',
     "Sure. ", [("a", "{}"), ("b", '{"z": null}')]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b[ARGS]{}', None,
     [("get_weather", W), ("b", "{}")]),
    ("mistral", '[TOOL_CALLS]a[CALL_ID]abc123xyz[ARGS]{"n": 1}', None, [("a", '{"n": 1}')]),
    ("mistral", "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
    ("auto", '<tool_call>{"name": "a", "arguments": {}}</tool_call>', None, [("a", "{}")]),
    ("auto", '[TOOL_CALLS][{"name": "a", "arguments": {}}]', None, [("a", "{}")]),
    ("auto", '<|python_tag|>{"name": "a", "parameters": {}}', None, [("a", "{}")]),
    ("auto", '{"name": "a", "parameters": {}}', None, [("a", "{}")]),
    ("auto", '{"answer": 42}', '{"answer": 42}', []),   # JSON that is not a call stays content
    ("auto", "no calls here", "no calls here", []),
]


@pytest.mark.parametrize("parser, reply, content, calls", CASES)
def test_whole_replies(parser, reply, content, calls):
    got_content, got_calls = parse_tool_calls(parser, reply)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert [c.index for c in got_calls] == list(range(len(calls)))
    for call in got_calls:
        assert isinstance(json.loads(call.arguments), dict)


def _events_in_pieces(parser: str, reply: str, rng: random.Random) -> list:
    stream, events, i = ToolCallStream(parser), [], 0
    while i < len(reply):
        n = rng.randint(1, 7)
        events += stream.feed(reply[i:i + n])
        i += n
    return events + stream.finish()


@pytest.mark.parametrize("parser, reply, content, calls", CASES)
def test_pieces_of_any_size_give_the_same_content_and_calls(parser, reply, content, calls):
    for seed in range(20):
        events = _events_in_pieces(parser, reply, random.Random(seed))
        text = "".join(e.text for e in events if isinstance(e, Content))
        got = [(e.name, e.arguments) for e in events if isinstance(e, Call)]
        assert got == calls
        assert (text if text.strip() or not calls else None) == content


def test_content_is_streamed_before_the_call_and_a_call_as_soon_as_it_closes():
    stream = ToolCallStream("hermes")
    assert stream.feed("Checking the ") == [Content("Checking the ")]
    assert stream.feed("weather <tool") == [Content("weather ")]   # "<tool" may start a marker: held
    assert stream.feed('_call>{"name": "w", ') == []
    assert stream.feed('"arguments": {}}</tool_call>') == [Call(0, "w", "{}")]
    assert stream.feed("\n<tool_call>") == []
    assert stream.finish() == [Content("\n<tool_call>")]   # an unclosed block that does not parse: given back


def test_a_less_than_sign_that_is_no_marker_is_streamed():
    stream = ToolCallStream("auto")
    assert stream.feed("1 <") == [Content("1 ")]
    assert stream.feed(" 2") == [Content("< 2")]


def test_an_unknown_parser_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, auto"):
        ToolCallStream("pythonic")


@pytest.mark.parametrize("template, parser", [
    ("{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n{{ call }}\n</tool_call>", "hermes"),
    ("[AVAILABLE_TOOLS] {{ tools }} [/AVAILABLE_TOOLS] ... [TOOL_CALLS] {{ calls }}", "mistral"),
    ("{%- if tools %}<|python_tag|>{{ x }}{% endif %}", "llama3_json"),
    ('{{ tools }} Respond in the format {"name": function name, "parameters": dictionary}', "llama3_json"),
    ("{{ messages }}", None),
    (None, None),
])
def test_the_parser_a_chat_template_asks_for(template, parser):
    assert parser_from_chat_template(template) == parser
