"""Validation of one plugin config value against the plugin's ``config_schema``: the full JSON
Schema vocabulary (the ``jsonschema`` library, the schema's own draft, formats checked), errors
naming the JSON path and the schema's rule, never the value (it may be a secret)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from pluginmon.registry.errors import InvalidError

_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def json_path(parts: Any) -> str:
    """``$.limits[0].max`` for the path ("limits", 0, "max")."""
    text = "$"
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER_RE.match(str(part)):
            text += f".{part}"
        else:
            text += f"[{json.dumps(str(part))}]"
    return text


def _rule(error: jsonschema.exceptions.ValidationError) -> str:
    """What the schema asked for, in words that quote the schema and never the value."""
    kind = str(error.validator)
    expected = error.validator_value
    words: dict[str, Callable[[], str]] = {
        "type": lambda: (
            f"must be of type {' or '.join(expected) if isinstance(expected, list) else expected}"
        ),
        "enum": lambda: f"must be one of {json.dumps(expected)}",
        "const": lambda: f"must equal {json.dumps(expected)}",
        "minimum": lambda: f"must be >= {expected}",
        "maximum": lambda: f"must be <= {expected}",
        "exclusiveMinimum": lambda: f"must be > {expected}",
        "exclusiveMaximum": lambda: f"must be < {expected}",
        "multipleOf": lambda: f"must be a multiple of {expected}",
        "minLength": lambda: f"must be at least {expected} character(s) long",
        "maxLength": lambda: f"must be at most {expected} character(s) long",
        "pattern": lambda: f"must match the pattern {json.dumps(expected)}",
        "format": lambda: f"must be a valid {json.dumps(expected)}",
        "minItems": lambda: f"must have at least {expected} item(s)",
        "maxItems": lambda: f"must have at most {expected} item(s)",
        "uniqueItems": lambda: "must not repeat items",
        "minProperties": lambda: f"must have at least {expected} propert(y/ies)",
        "maxProperties": lambda: f"must have at most {expected} propert(y/ies)",
        # The missing names come from the schema, not from the value.
        "required": lambda: error.message.replace("'", '"'),
        "additionalProperties": lambda: "has properties the schema does not allow",
        "unevaluatedProperties": lambda: "has properties the schema does not allow",
        "propertyNames": lambda: "has a property name the schema does not allow",
        "dependentRequired": lambda: (
            f"lacks properties that others require ({json.dumps(expected)})"
        ),
        "contains": lambda: "must contain an item matching the schema's 'contains'",
        "false": lambda: "is not allowed here by the schema",
    }
    phrase = words.get(kind)
    return phrase() if phrase else f"does not satisfy the schema's {json.dumps(kind)}"


def value_schema(schema: Mapping[str, Any], key: str) -> Mapping[str, Any] | bool | None:
    """The subschema ``key``'s value must satisfy: ``properties``, then a matching
    ``patternProperties``, then ``additionalProperties``; None when the schema allows the key
    with no constraint; False when it forbids the key."""
    properties = schema.get("properties")
    if isinstance(properties, Mapping) and key in properties:
        found: Mapping[str, Any] | bool = properties[key]
        return found
    patterns = schema.get("patternProperties")
    if isinstance(patterns, Mapping):
        for pattern, sub in patterns.items():
            if re.search(pattern, key):
                return sub  # type: ignore[no-any-return]
    additional = schema.get("additionalProperties", schema.get("unevaluatedProperties"))
    if additional is False:
        return False
    if isinstance(additional, Mapping):
        return additional
    return None


def validate_value(schema: Mapping[str, Any] | None, key: str, value: Any, *, secret: bool) -> None:
    """InvalidError naming the key's JSON path (``$.<key>...``) and the rule it breaks; the
    root schema is kept for ``$ref``s; ``format`` is checked (date, date-time, email, ipv4,
    ipv6, uuid, regex, ...)."""
    if schema is None:
        return
    sub = value_schema(schema, key)
    if sub is False:
        raise InvalidError(
            f"config key {key!r} is not in the plugin's config_schema (it allows no other keys)",
            field="key",
            code="unknown_config_key",
        )
    if sub is None or sub is True:
        return
    names = schema.get("propertyNames")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    root = cls(schema, format_checker=cls.FORMAT_CHECKER)
    if isinstance(names, Mapping) and root.evolve(schema=names).is_valid(key) is False:
        raise InvalidError(
            f"config key {key!r} is not allowed by the config_schema's propertyNames",
            field="key",
            code="unknown_config_key",
        )
    if isinstance(sub, Mapping) and sub.get("writeOnly") is True and not secret:
        raise InvalidError(
            f"config key {key!r} is writeOnly in the config_schema: set it with secret true",
            field="secret",
        )
    errors = list(root.evolve(schema=sub).iter_errors(value))
    if not errors:
        return
    best = jsonschema.exceptions.best_match(errors)
    assert best is not None
    where = json_path([key, *best.absolute_path])
    inner = json_path(best.absolute_path)[1:]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise InvalidError(
        f"config {where} {_rule(best)}{more}",
        field="value" + inner,
        code="schema_violation",
    )
