"""Message schemas: a JSON Schema subset, checked without dependencies. Pure.

Supported keywords: ``type`` (``object``, ``array``, ``string``, ``number``, ``integer``,
``boolean``, ``null``, or a list of them), ``properties``, ``required``,
``additionalProperties`` (true/false), ``items``, ``enum``, ``const``, ``minimum``,
``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``, ``minLength``, ``maxLength``,
``pattern``, ``minItems``, ``maxItems``, and the annotations ``$schema``, ``title``,
``description``. A schema using anything else is refused when it is registered, so no
rule is ever silently ignored.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._errors import SchemaError

KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "minimum",
            "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems",
            "maxItems", "$schema", "title", "description"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_DEPTH = 32
MAX_SCHEMA_BYTES = 64 * 1024
"""Largest schema text (UTF-8 JSON) that travels in a signed schema document."""


def parse_schema(text: str) -> dict[str, Any]:
    """A schema from its JSON text, checked (:func:`check_schema`); :class:`SchemaError`
    naming the problem: too long, not JSON (line and column), or a keyword not supported."""
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError("(root)", "size", f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError("(root)", "json", f"not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise SchemaError("(root)", "depth", f"schemas nest at most {MAX_DEPTH} deep") from None
    check_schema(schema)
    return schema  # type: ignore[no-any-return]


def check_schema(schema: Any, where: str = "") -> None:
    """Raise :class:`SchemaError` if ``schema`` uses a keyword or a value this checker does not know."""
    _check_schema(schema, where or "(root)", 0)


def _check_schema(schema: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise SchemaError(where, "depth", f"schemas nest at most {MAX_DEPTH} deep")
    if not isinstance(schema, dict):
        raise SchemaError(where, "schema", "a schema is an object (dict)")
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise SchemaError(where, sorted(unknown)[0], f"unsupported keyword(s): {', '.join(sorted(unknown))}")
    kinds = schema.get("type")
    if kinds is not None:
        for kind in kinds if isinstance(kinds, list) else [kinds]:
            if kind not in TYPES:
                raise SchemaError(where, "type", f"unknown type {kind!r}; the types are {', '.join(TYPES)}")
    for name, sub in (schema.get("properties") or {}).items():
        _check_schema(sub, f"{where}.{name}" if where != "(root)" else name, depth + 1)
    if "items" in schema:
        _check_schema(schema["items"], f"{where}[]", depth + 1)
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as exc:
            raise SchemaError(where, "pattern", f"not a regular expression: {exc}") from None
    if "required" in schema and not (isinstance(schema["required"], list)
                                     and all(isinstance(r, str) for r in schema["required"])):
        raise SchemaError(where, "required", "required is a list of property names")


def validate(schema: dict[str, Any], value: Any, where: str = "") -> None:
    """Raise :class:`SchemaError` naming the first field that breaks a rule of ``schema``."""
    _validate(schema, value, where)


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _validate(schema: dict[str, Any], value: Any, where: str) -> None:
    field = where or "(root)"
    kinds = schema.get("type")
    if kinds is not None:
        allowed = kinds if isinstance(kinds, list) else [kinds]
        actual = _type_of(value)
        if actual not in allowed and not (actual == "integer" and "number" in allowed):
            raise SchemaError(field, "type", f"must be {' or '.join(allowed)}, not {actual}")
    if "const" in schema and value != schema["const"]:
        raise SchemaError(field, "const", f"must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(field, "enum", f"must be one of {schema['enum']!r}, not {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for rule, ok, text in (("minimum", lambda b: value >= b, "at least"), ("maximum", lambda b: value <= b, "at most"),
                               ("exclusiveMinimum", lambda b: value > b, "more than"),
                               ("exclusiveMaximum", lambda b: value < b, "less than")):
            if rule in schema and not ok(schema[rule]):
                raise SchemaError(field, rule, f"must be {text} {schema[rule]!r}, not {value!r}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaError(field, "minLength", f"must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(field, "maxLength", f"must have at most {schema['maxLength']} characters")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            raise SchemaError(field, "pattern", f"must match {schema['pattern']!r}")
    if isinstance(value, (list, tuple)):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise SchemaError(field, "minItems", f"must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaError(field, "maxItems", f"must have at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(schema["items"], item, f"{where}[{i}]")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaError(f"{where}.{name}" if where else name, "required", "is required")
        properties = schema.get("properties", {})
        for name, item in value.items():
            path = f"{where}.{name}" if where else str(name)
            if name in properties:
                _validate(properties[name], item, path)
            elif schema.get("additionalProperties") is False:
                raise SchemaError(path, "additionalProperties", "is not a property this schema allows")
