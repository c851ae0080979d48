"""pydantic JSON schema -> a structural OpenAPI v3 schema, and the checks that it is one.

How the pydantic JSON schema becomes a *structural* OpenAPI v3 schema (what the API server
needs to default, prune and validate with CEL):

- every `$ref` is inlined from `$defs` (siblings of the `$ref`, such as a field's description,
  win over the referenced definition's); `title` is dropped;
- `Optional[X]` (`anyOf: [X, {type: null}]`) becomes plain `X`, and a `default: null` is dropped:
  an absent field is how "unset" is written, and the API server prunes explicit nulls of
  non-nullable fields before defaulting;
- `exclusiveMinimum: N` (JSON schema 2020-12) becomes `minimum: N, exclusiveMinimum: true`
  (OpenAPI v3.0), likewise for the maximum;
- `additionalProperties: false` (pydantic's `extra="forbid"`) is dropped: a structural schema
  prunes unknown fields, and `kubectl apply` (server-side field validation `Strict`) rejects them;
- `int | str` becomes `x-kubernetes-int-or-string: true` (any other union is an error);
- free-form objects (`dict[str, Any]`) become `type: object` with
  `x-kubernetes-preserve-unknown-fields: true`; `dict[str, str]` becomes `additionalProperties:
  {type: string}`;
- a nested model field with a `default_factory` (e.g. `engine`) gets `default: {}`, so the API
  server fills in the nested defaults even when the user leaves the whole block out;
- every list without `maxItems` gets `maxItems: 64` (bounded cost for CEL);
- any JSON-schema keyword not listed here is an error, so a new construct in `spec.py` cannot
  silently produce a schema the API server would refuse.
"""

from __future__ import annotations

import math
import re
from typing import Any

DEFAULT_MAX_ITEMS = 64
# Keys a node of apiextensions.k8s.io/v1 JSONSchemaProps may carry (the subset we emit).
_STRUCTURAL_KEYS = {
    "type", "description", "default", "enum", "format", "nullable",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern",
    "items", "minItems", "maxItems",
    "properties", "required", "additionalProperties", "minProperties", "maxProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
    "x-kubernetes-embedded-resource",
}
_TYPES = {"object", "array", "string", "integer", "number", "boolean"}
# JSON-schema keywords copied through unchanged.
_PASSTHROUGH = ("description", "enum", "format", "multipleOf", "minimum", "maximum", "minLength",
                "maxLength", "pattern", "minItems", "maxItems", "minProperties", "maxProperties")
# Output key order (readability of the generated YAML only).
_ORDER = ["description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum",
          "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "minItems", "maxItems",
          "minProperties", "maxProperties", "nullable", "x-kubernetes-preserve-unknown-fields",
          "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "properties", "required",
          "additionalProperties", "items", "x-kubernetes-validations"]


class SchemaError(ValueError):
    """spec.py uses a JSON-schema construct that has no structural OpenAPI v3 equivalent."""


def _resolve(node: dict, defs: dict, path: str) -> dict:
    """Inline `$ref` (and a one-element `allOf`, pydantic's older spelling of a described ref)."""
    node = dict(node)
    if "allOf" in node:
        if len(node["allOf"]) != 1:
            raise SchemaError(f"{path}: allOf with {len(node['allOf'])} members is not structural")
        node = {**_resolve(node["allOf"][0], defs, path), **{k: v for k, v in node.items() if k != "allOf"}}
    if "$ref" in node:
        ref = node.pop("$ref")
        match = re.fullmatch(r"#/\$defs/(.+)", ref)
        if not match or match.group(1) not in defs:
            raise SchemaError(f"{path}: cannot resolve $ref {ref!r}")
        node = {**_resolve(defs[match.group(1)], defs, path), **node}
    return node


def _is_optional(node: dict) -> bool:
    return any(option.get("type") == "null" for option in node.get("anyOf", ()))


def _unwrap_optional(node: dict, defs: dict, path: str) -> dict:
    """anyOf [X, null] -> X, keeping the outer description/default."""
    node = _resolve(node, defs, path)
    if "anyOf" not in node:
        return node
    options = [option for option in node["anyOf"] if option.get("type") != "null"]
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    if outer.get("default", 0) is None:
        del outer["default"]
    if sorted(option.get("type") for option in options) == ["integer", "string"] \
            and all(set(option) == {"type"} for option in options):  # int | str: a quantity, a port name
        return {**outer, "x-kubernetes-int-or-string": True}
    if len(options) != 1:
        raise SchemaError(f"{path}: a union of {len(options)} types is not structural")
    return {**_resolve(options[0], defs, path), **outer}


def ordered(node: dict) -> dict:
    return {key: node[key] for key in sorted(node, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))}


def to_structural(schema: dict, defs: dict | None = None, path: str = "") -> dict:
    """Convert one pydantic JSON-schema node (and everything under it) to structural OpenAPI v3."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = _unwrap_optional({k: v for k, v in schema.items() if k != "$defs"}, defs, path or ".")
    out: dict[str, Any] = {}
    known = set(_PASSTHROUGH) | {"title", "type", "default", "exclusiveMinimum", "exclusiveMaximum",
                                 "properties", "required", "additionalProperties", "items",
                                 "x-kubernetes-int-or-string"}
    unknown = set(node) - known
    if unknown:
        raise SchemaError(f"{path or '.'}: no structural equivalent for {sorted(unknown)}")

    for key in _PASSTHROUGH:
        if key in node:
            out[key] = node[key]
    if "default" in node:
        out["default"] = node["default"]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            value = node[bound]
            if isinstance(value, bool):  # already OpenAPI v3.0 form
                out[bound] = value
                continue
            if limit in out:
                raise SchemaError(f"{path}: both {limit} and {bound}")
            out[limit], out[bound] = value, True

    if node.get("x-kubernetes-int-or-string"):
        out["x-kubernetes-int-or-string"] = True
        return ordered(out)
    kind = node.get("type")
    if kind is None:
        raise SchemaError(f"{path or '.'}: no type")
    if kind not in _TYPES:
        raise SchemaError(f"{path or '.'}: type {kind!r} is not structural")
    out["type"] = kind

    if kind == "object":
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            out["properties"] = {}
            for name, child in properties.items():
                converted = to_structural(child, defs, f"{path}.{name}")
                required = name in node.get("required", ())
                if (not required and not _is_optional(child) and "default" not in converted
                        and converted["type"] == "object" and "properties" in converted
                        and not converted.get("required")):
                    converted = ordered({**converted, "default": {}})  # a model with default_factory
                out["properties"][name] = converted
            if node.get("required"):
                out["required"] = list(node["required"])
            # additionalProperties: false (extra="forbid") is what a structural schema does anyway.
            if extra not in (None, False):
                raise SchemaError(f"{path}: both properties and additionalProperties")
        elif extra is True or extra is None or extra == {}:
            out["x-kubernetes-preserve-unknown-fields"] = True  # dict[str, Any]
        elif isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs, f"{path}.*")
        else:
            raise SchemaError(f"{path}: an object with no properties that allows none")
    elif kind == "array":
        if "items" not in node:
            raise SchemaError(f"{path}: an array without items")
        out["items"] = to_structural(node["items"], defs, f"{path}[*]")
        out.setdefault("maxItems", DEFAULT_MAX_ITEMS)
    return ordered(out)


# -- checks ------------------------------------------------------------------------------------
def _default_problems(value: Any, node: dict, path: str) -> list[str]:
    """Does a default value validate against its node? (The API server refuses CRDs where not.)"""
    kind = node.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind in checks and not isinstance(value, checks[kind]):
        return [f"{path}: default {value!r} is not {kind}"]
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{path}: default {value!r} is not an integer"]
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return [f"{path}: default {value!r} is not a number"]
    problems = []
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{path}: default {value!r} not in enum")
    if kind in ("integer", "number"):
        low, high = node.get("minimum", -math.inf), node.get("maximum", math.inf)
        if value < low or (node.get("exclusiveMinimum") and value == low):
            problems.append(f"{path}: default {value!r} below minimum")
        if value > high or (node.get("exclusiveMaximum") and value == high):
            problems.append(f"{path}: default {value!r} above maximum")
    if kind == "string":
        if len(value) > node.get("maxLength", math.inf) or len(value) < node.get("minLength", 0):
            problems.append(f"{path}: default {value!r} has the wrong length")
        if "pattern" in node and not re.search(node["pattern"], value):
            problems.append(f"{path}: default {value!r} does not match {node['pattern']!r}")
    if kind == "object" and isinstance(value, dict):
        properties = node.get("properties", {})
        for name in node.get("required", ()):
            if name not in value and "default" not in properties.get(name, {}):
                problems.append(f"{path}: default lacks required {name!r}")
        for name, item in value.items():
            if name in properties:
                problems += _default_problems(item, properties[name], f"{path}.{name}")
            elif not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
                problems.append(f"{path}: default has unknown field {name!r}")
    return problems


def structural_problems(node: Any, path: str = "", *, root: bool = True) -> list[str]:
    """Everything that keeps `node` from being a structural schema the API server accepts ([] if fine).

    Every node has a type (unless it preserves unknown fields or is int-or-string); no $ref,
    no unions, no `additionalProperties` beside `properties`, no boolean `additionalProperties`,
    OpenAPI v3.0 boolean `exclusiveMinimum`/`exclusiveMaximum`, arrays have items, defaults
    validate, and only JSONSchemaProps keys are used. At the root, `metadata` may restrict only
    `name` and `generateName`.
    """
    where = path or "."
    if not isinstance(node, dict):
        return [f"{where}: not a schema object"]
    problems = [f"{where}: key {key!r} is not allowed in a structural schema"
                for key in sorted(set(node) - _STRUCTURAL_KEYS)]
    kind = node.get("type")
    free = node.get("x-kubernetes-preserve-unknown-fields") is True or node.get("x-kubernetes-int-or-string") is True
    if kind is None and not free:
        problems.append(f"{where}: no type")
    elif kind is not None and kind not in _TYPES:
        problems.append(f"{where}: type {kind!r}")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            problems.append(f"{where}: {bound} must be a boolean in OpenAPI v3.0")
    if "additionalProperties" in node:
        if not isinstance(node["additionalProperties"], dict):
            problems.append(f"{where}: additionalProperties must be a schema, not {node['additionalProperties']!r}")
        if "properties" in node:
            problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
        else:
            problems += structural_problems(node["additionalProperties"], f"{path}.*", root=False)
    if kind == "array":
        if "items" not in node:
            problems.append(f"{where}: an array without items")
        else:
            problems += structural_problems(node["items"], f"{path}[*]", root=False)
    elif "items" in node:
        problems.append(f"{where}: items on a non-array")
    for name in node.get("required", ()):
        if name not in node.get("properties", {}):
            problems.append(f"{where}: required {name!r} is not a property")
    for name, child in node.get("properties", {}).items():
        if root and name == "metadata":
            extra = set(child.get("properties", {})) - {"name", "generateName"}
            if extra or set(child) - {"type", "properties"}:
                problems.append(".metadata: only name and generateName may be restricted")
        problems += structural_problems(child, f"{path}.{name}", root=False)
    if "default" in node:
        if root:
            problems.append(".: no default at the root")
        problems += _default_problems(node["default"], node, where)
    for rule in node.get("x-kubernetes-validations", ()):
        if set(rule) - {"rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf"} \
                or "rule" not in rule:
            problems.append(f"{where}: malformed x-kubernetes-validations entry {rule!r}")
        elif "fieldPath" in rule and lookup(node, rule["fieldPath"]) is None:
            problems.append(f"{where}: fieldPath {rule['fieldPath']!r} is not in the schema")
    return problems


def lookup(node: dict, field_path: str) -> dict | None:
    """The schema node a `.a.b` fieldPath names, relative to `node`."""
    for part in field_path.lstrip(".").split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node
