"""A chat request's `messages` (and tools) -> the conversation the worker renders with the model's chat
template (pure, no torch). Messages in OpenAI's shape: system / developer / user / assistant / tool roles (any
role the template takes), text content (a string, null, or text parts), an assistant's `tool_calls`, a tool
message's `tool_call_id`, a `name`. What an openai client sends back of an earlier reply (`refusal`,
`annotations`, ... left null or empty) is accepted; anything else is refused naming it.
"""

from __future__ import annotations

import json

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.openai_tools import ToolPlan
from kubellm.runtime.serving.rest_fields import BadRequest

MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
# What an earlier reply's message carries back when a client appends it to the conversation as is.
ECHOED_EMPTY = {"refusal", "audio", "function_call", "annotations", "reasoning_content", "reasoning"}


def _content(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # content parts: text only
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise BadRequest(f"messages[{i}].content[{j}]: only text parts are served"
                                 + (f" (got a {kind!r} part)" if kind else ""), f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")


def _tool_calls(calls, i: int) -> list[dict]:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise BadRequest(f"'{where}' must be a list of {{id, type, function: {{name, arguments}}}}", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"'{where}[{j}]' must be {{id, type: \"function\", function: {{name, arguments}}}}",
                             f"{where}[{j}]")
        args = function.get("arguments", "{}")
        if isinstance(args, str):   # OpenAI's: JSON text; chat templates take the object (as vLLM passes it)
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise BadRequest(f"'{where}[{j}].function.arguments' is not JSON: {args[:60]!r}",
                                 f"{where}[{j}].function.arguments") from None
        if not isinstance(args, dict):
            raise BadRequest(f"'{where}[{j}].function.arguments' must be a JSON object",
                             f"{where}[{j}].function.arguments")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise BadRequest(f"'{where}[{j}].id' must be a string", f"{where}[{j}].id")
        out.append({"id": call_id or f"call_{i}_{j}", "type": "function",
                    "function": {"name": function["name"], "arguments": args}})
    return out


def chat_messages(messages) -> list[dict]:
    """`messages`, checked, in the shape chat templates take (a tool call's arguments as an object)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}].role")
        for key, value in m.items():
            if key not in MESSAGE_FIELDS and not (key in ECHOED_EMPTY and not value):
                raise BadRequest(f"'messages[{i}].{key}' is not served in a message (it takes role, content, name, "
                                 "tool_calls, tool_call_id)", f"messages[{i}].{key}")
        message = {"role": m["role"], "content": _content(m.get("content"), i)}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise BadRequest(f"'messages[{i}].{key}' must be a string", f"messages[{i}].{key}")
                message[key] = m[key]
        if m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        out.append(message)
    return out


def conversation(messages, tools: ToolPlan | None) -> llm_pb2.Prompt:
    """The Prompt of a chat request: its messages, and its tools where they are to be rendered (not for
    tool_choice "none")."""
    conv = llm_pb2.Conversation()
    for m in chat_messages(messages):
        msg = llm_pb2.ChatMessage(role=m["role"], content=m["content"], tool_call_id=m.get("tool_call_id", ""),
                                  name=m.get("name", ""))
        if "tool_calls" in m:
            msg.tool_calls_json = json.dumps(m["tool_calls"], ensure_ascii=False)
        conv.messages.append(msg)
    if tools is not None and tools.rendered:
        conv.tools_json = json.dumps(tools.tools, ensure_ascii=False)
    return llm_pb2.Prompt(chat=conv)
