"""OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` on a chat request (pure, no torch): checked, and
what they ask of the model: tools rendered by its chat template (or not: `none`), its reply parsed for calls
(`auto`), or its reply constrained to a valid call by a JSON schema (`required`, a named function), as vLLM
does, so that those calls always parse.

    plan = tool_plan(body)                  # None: no tools in play
    plan.mode, plan.tools, plan.guided_json, plan.calls_from_constrained(text)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kubellm.runtime.serving.rest_fields import BadRequest
from kubellm.runtime.serving.tool_parsers import Call

MAX_TOOLS = 128   # OpenAI's limit on tools per request
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")   # OpenAI's function names (vLLM's too), dots for namespaced ones
_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict]          # the request's tools, as the chat template takes them (OpenAI's shape)
    mode: str                  # "none": not rendered; "auto": parsed from the reply; "required" / "named": constrained
    name: str | None = None    # the named function
    parallel: bool = True      # parallel_tool_calls: false keeps one call

    @property
    def rendered(self) -> bool:
        return self.mode != "none"

    @property
    def guided_json(self) -> dict | None:
        """The schema a constrained reply follows (vLLM's): the named function's parameters, or for
        `required` a non-empty array of {name, parameters} objects, one of the tools each."""
        if self.mode == "named":
            return self._parameters(self.name)
        if self.mode != "required":
            return None
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                              "parameters": self._parameters(t["function"]["name"])},
             "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def _parameters(self, name: str) -> dict:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or _ANY_OBJECT
        raise KeyError(name)

    def calls_from_constrained(self, text: str) -> list[Call] | None:
        """A constrained reply -> its calls; None if it does not parse (a named call cut short by max_tokens; a
        `required` array cut short keeps its whole calls)."""
        try:
            value = json.loads(text)
        except ValueError:
            if self.mode == "named":
                return None
            value = None
        if self.mode == "named":
            return [Call(0, self.name, json.dumps(value, ensure_ascii=False))] if isinstance(value, dict) else None
        if value is None:
            value = _complete_items(text)   # cut short: the calls written whole before the cut
        if not isinstance(value, list) or not value:
            return None
        calls = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                    not isinstance(item.get("parameters", {}), dict):
                return None
            calls.append(Call(i, item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
        return calls

    def keep(self, calls: list[Call]) -> list[Call]:
        """parallel_tool_calls false: the first call only."""
        return calls if self.parallel else calls[:1]


def _complete_items(text: str) -> list | None:
    """The whole items of a JSON array cut short (`[{...}, {...}, {"na`): a `required` reply that max_tokens ended
    keeps the calls it wrote in full."""
    start = text.lstrip()
    if not start.startswith("["):
        return None
    decoder, items, i = json.JSONDecoder(), [], len(text) - len(start) + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            item, i = decoder.raw_decode(text, i)
        except ValueError:
            return items or None
        items.append(item)


def _check_tool(tool, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise BadRequest(f"'{where}' must be an object {{\"type\": \"function\", \"function\": {{...}}}}", where)
    if tool.get("type", "function") != "function":
        raise BadRequest(f"'{where}.type' must be \"function\" (the only tool type served), got "
                         f"{tool.get('type')!r}", f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise BadRequest(f"'{where}.function' must be an object with a 'name'", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f"'{where}.function.name' must be 1 to 64 letters, digits, '_', '-' or '.', got "
                         f"{name!r}", f"{where}.function.name")
    if function.get("description") is not None and not isinstance(function["description"], str):
        raise BadRequest(f"'{where}.function.description' must be a string", f"{where}.function.description")
    params = function.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f"'{where}.function.parameters' must be a JSON schema (an object)",
                         f"{where}.function.parameters")
    if function.get("strict") is not None and not isinstance(function["strict"], bool):
        raise BadRequest(f"'{where}.function.strict' must be a boolean", f"{where}.function.strict")
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise BadRequest(f"'{where}.function.{unknown[0]}' is not a field of a function (name, description, "
                         "parameters, strict)", f"{where}.function.{unknown[0]}")
    clean = {"name": name, **({"description": function["description"]} if function.get("description") else {}),
             **({"parameters": params} if params is not None else {})}
    return {"type": "function", "function": clean}


def tool_plan(body: dict) -> ToolPlan | None:
    """The request's tools and tool_choice, checked; None when no tools are given (and tool_choice asks none)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice in (None, "none", "auto"):
            return None
        raise BadRequest("'tool_choice' asks for a tool call, but the request has no 'tools'; give the tools "
                         "(or tool_choice \"none\")", "tool_choice")
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"'tools': {len(tools)} tools, more than {MAX_TOOLS}; send fewer", "tools")
    checked = [_check_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise BadRequest(f"'tools[{i}].function.name': {name!r} is given twice; names must be unique",
                             f"tools[{i}].function.name")
    if choice is None or choice == "auto":
        return ToolPlan(checked, "auto", parallel=parallel is not False)
    if choice in ("none", "required"):
        return ToolPlan(checked, choice, parallel=parallel is not False)
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str):
            raise BadRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}", "tool_choice")
        if function["name"] not in names:
            raise BadRequest(f"'tool_choice.function.name': {function['name']!r} is not one of the tools "
                             f"({', '.join(names)})", "tool_choice.function.name")
        return ToolPlan(checked, "named", function["name"], parallel=parallel is not False)
    raise BadRequest(f"'tool_choice' must be \"none\", \"auto\", \"required\" or a named function, got "
                     f"{choice!r}", "tool_choice")
