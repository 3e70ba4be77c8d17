"""Validation of one plugin config value against the plugin's ``config_schema``: the full JSON
Schema vocabulary (the ``jsonschema`` library, the schema's own draft, formats checked), errors
naming the JSON path and the schema's rule, never the value (it may be a secret). In a secret's
path, the object keys the value brought itself (not declared in a ``properties``) are masked."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from pluginmon.registry.errors import InvalidError
from pluginmon.registry.schema_regex import (
    UnsafePatternError,
    linear_format_checker,
    linear_validator,
    search,
)

_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Masked:
    """A path part that came from a secret value (an object key it brought itself)."""

    def __repr__(self) -> str:
        return "<key>"


MASKED_KEY: Final = _Masked()

# How the keywords of a schema path (jsonschema's ``absolute_schema_path``) step into the
# instance: keywords that step into an object by a name the schema declares, by a key of the
# value's own, or into an array; and keywords whose next schema-path part is only their
# argument (a subschema's index or name) and does not step into the instance.
_DECLARED_STEP: Final = frozenset({"properties"})
_OWN_KEY_STEP: Final = frozenset({"additionalProperties", "unevaluatedProperties"})
_OWN_KEY_STEP_WITH_ARGUMENT: Final = frozenset({"patternProperties"})
_ITEM_STEP: Final = frozenset({"additionalItems", "unevaluatedItems", "contains"})
_ITEM_STEP_WITH_ARGUMENT: Final = frozenset({"prefixItems"})
_ARGUMENT_ONLY: Final = frozenset(
    {"allOf", "anyOf", "oneOf", "dependentSchemas", "dependencies", "$defs", "definitions"}
)


def _steps(schema_path: Sequence[Any]) -> list[str | None]:
    """For each step into the instance along ``schema_path``: the declared property name it
    took, or None (a key of the value's own, or an array item)."""
    steps: list[str | None] = []
    parts = list(schema_path)
    i = 0
    while i < len(parts):
        part = parts[i]
        following = parts[i + 1] if i + 1 < len(parts) else None
        if part in _DECLARED_STEP and following is not None:
            steps.append(str(following))
            i += 2
        elif part in _OWN_KEY_STEP_WITH_ARGUMENT or part in _ITEM_STEP_WITH_ARGUMENT:
            steps.append(None)
            i += 2
        elif part == "items":
            steps.append(None)
            i += 2 if isinstance(following, int) else 1  # the tuple form of drafts 4-2019
        elif part in _OWN_KEY_STEP or part in _ITEM_STEP:
            steps.append(None)
            i += 1
        elif part in _ARGUMENT_ONLY:
            i += 2
        else:
            i += 1
    return steps


def secret_path(
    instance_path: Sequence[str | int], schema_path: Sequence[Any]
) -> list[str | int | _Masked]:
    """``instance_path`` with every object key the value brought itself masked: a key is kept
    only where the schema path stepped in through ``properties`` by that very name. When the
    two paths cannot be matched step for step, every key is masked (fail closed)."""
    steps = _steps(schema_path)
    parts = list(instance_path)
    if len(steps) != len(parts):
        return [p if isinstance(p, int) else MASKED_KEY for p in parts]
    return [
        p if isinstance(p, int) or (step is not None and step == p) else MASKED_KEY
        for p, step in zip(parts, steps, strict=True)
    ]


def json_path(parts: Any) -> str:
    """``$.limits[0].max`` for the path ("limits", 0, "max"); a masked part is ``[<key>]``."""
    text = "$"
    for part in parts:
        if isinstance(part, _Masked):
            text += "[<key>]"
        elif isinstance(part, int):
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
            if search(pattern, key):
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
    ipv6, uuid, regex, ...). Every regex of the schema is matched with RE2 (linear time); one
    RE2 refuses (a schema stored before registration checked that) fails closed."""
    if schema is None:
        return
    try:
        _validate(schema, key, value, secret=secret)
    except UnsafePatternError as exc:
        raise InvalidError(
            f"the plugin's config_schema holds a regex that cannot be matched in linear time "
            f"({exc}); register the plugin's config_schema again",
            field="config_schema",
            code="invalid_json_schema",
        ) from None


def _validate(schema: Mapping[str, Any], key: str, value: Any, *, secret: bool) -> None:
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
    cls = linear_validator(
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    )
    root = cls(schema, format_checker=linear_format_checker(cls))
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
    # A secret's own object keys may be secret too (a map of token name to token).
    path: Sequence[str | int | _Masked] = (
        secret_path(best.absolute_path, best.absolute_schema_path)
        if secret
        else list(best.absolute_path)
    )
    where = json_path([key, *path])
    inner = json_path(path)[1:]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise InvalidError(
        f"config {where} {_rule(best)}{more}",
        field="value" + inner,
        code="schema_violation",
    )
