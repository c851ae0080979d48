"""A REST request body's fields, checked one by one (pure, no torch): the error a bad one gets, naming it.

    value = field(body, "top_p", (int, float), lo=0, hi=1)   # None when absent or null; else BadRequest
"""

from __future__ import annotations


class BadRequest(Exception):
    """A request the gateway refuses: HTTP `status` with OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "an object"}.get(t, t.__name__) for t in types)


def check(value, name: str, types, *, lo=None, hi=None):
    """`value` (not None) checked against `types` and bounds; BadRequest naming `name` otherwise."""
    allowed = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise BadRequest(f"'{name}' must be {type_names(types)}, got {_short(value)}", name)
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise BadRequest(f"'{name}' is out of range, got {_short(value)}", name)
    if lo is not None and value < lo:
        raise BadRequest(f"'{name}' must be >= {lo}, got {value!r}", name)
    if hi is not None and value > hi:
        raise BadRequest(f"'{name}' must be <= {hi}, got {value!r}", name)
    return value


def field(body: dict, key: str, types, *, lo=None, hi=None, name: str | None = None):
    """body[key] checked against `types` (and bounds); None when absent or null. `name`: what errors call it."""
    value = body.get(key)
    return None if value is None else check(value, name or key, types, lo=lo, hi=hi)


def words(body: dict, key: str, name: str | None = None) -> list[str]:
    """A string or a list of strings (stop words), as a list; [] when absent."""
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadRequest(f"'{name or key}' must be a string or a list of strings", name or key)


def check_prompt_count(count: int, param: str, most: int) -> None:
    if count > most:
        raise BadRequest(f"'{param}': {count} prompts in one request, more than max_prompts_per_request ({most}: "
                         "spec.limits.maxPromptsPerRequest, --max-prompts-per-request); split them over several "
                         "requests", param)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
