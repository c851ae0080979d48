"""Tools through the model's own chat template: a tiny tokenizer with a Hermes / Qwen2.5-style template that
supports tools (`tools=` in apply_chat_template), rendering the tool definitions and a tool-call round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubellm.runtime.engine.tokenizer import Tokenizer
from kubellm.runtime.errors import RequestError

# Qwen2.5-Instruct's template, shortened and on one line (the same tool parts: <tools> in the system prompt, <tool_call> JSON for an
# assistant's calls, <tool_response> for a tool's answer).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nFunction signatures:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "Call them within <tool_call></tool_call> XML tags.<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{% if message.content %}{{ message.content }}"
    "{% endif %}"
    "{% for tool_call in message.tool_calls or [] %}{% set tool_call = tool_call.function %}"
    "\n<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ROUND_TRIP = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},   # OpenAI sends arguments as JSON text
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temperature_c": 21}'},
]


def with_tools_template(model_dir: Path, target: Path) -> Path:
    """A copy of a tiny checkpoint whose chat template supports tools."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return target


@pytest.fixture(scope="module")
def tokenizer(tiny_llama, tmp_path_factory):
    return Tokenizer(with_tools_template(Path(tiny_llama), tmp_path_factory.mktemp("tools") / "model"))


def rendered(tokenizer: Tokenizer, prompt) -> str:
    return tokenizer.hf.decode(tokenizer.encode_prompt(prompt))


def test_tools_are_rendered_by_the_template(tokenizer):
    text = rendered(tokenizer, {"messages": ROUND_TRIP[:1], "tools": TOOLS})
    assert "<tools>" in text and json.dumps(TOOLS[0]) in text   # the whole definition, as the template writes it
    assert text.endswith("<|im_start|>assistant\n")
    assert "<tools>" not in rendered(tokenizer, ROUND_TRIP[:1])   # no tools: the template's plain branch


def test_a_tool_call_round_trip_renders_call_and_response(tokenizer):
    text = rendered(tokenizer, {"messages": ROUND_TRIP, "tools": TOOLS})
    # arguments given as JSON text are an object for the template: written once, not as a quoted string
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature_c": 21}\n</tool_response>' in text
    assert text.index("<tool_call>") < text.index("<tool_response>") < text.rindex("<|im_start|>assistant")


@pytest.mark.parametrize("prompt,message", [
    ({"messages": ROUND_TRIP, "tools": {"name": "x"}}, r"prompt\.tools: expected a list of OpenAI tools"),
    ({"messages": ROUND_TRIP, "tools": [{"type": "function"}]}, r"prompt\.tools\[0\]: expected"),
    ({"messages": [{**ROUND_TRIP[1], "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"prompt\.messages\[0\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ({"messages": [{"role": "assistant", "content": None}]}, r"prompt\.messages\[0\]: a chat message needs"),
    ({"messages": ROUND_TRIP, "tool": TOOLS}, r"prompt: a conversation holds 'messages' and 'tools', not 'tool'"),
])
def test_bad_tools_and_tool_calls_are_refused_naming_the_field(tokenizer, prompt, message):
    with pytest.raises(RequestError, match=message):
        tokenizer.encode_prompt(prompt)
