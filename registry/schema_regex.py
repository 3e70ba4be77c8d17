"""Linear-time (RE2) regexes for plugin ``config_schema``s: the check that refuses, at
registration, a ``pattern``/``patternProperties`` RE2 cannot compile, and the jsonschema
validator classes whose regex keywords (``pattern``, ``patternProperties``, the property lookups
behind ``additionalProperties`` and ``unevaluatedProperties``, ``format: regex``) match with RE2.

jsonschema matches with Python's backtracking ``re``: a schema pattern such as ``^(a+)+$``
takes exponential time on ``"a" * 40 + "!"``, and validation runs in the API server, next to
sampling and /metrics. RE2 matches in time linear in the text whatever the pattern; what it
cannot match that way (backreferences, lookaround) it refuses to compile, hence the check at
registration. A schema stored before that check and holding such a pattern makes validation
fail closed (UnsafePatternError), never fall back to ``re``.

Patterns are searched unanchored, as JSON Schema says. RE2's syntax is close to the ECMA-262
subset that JSON Schema recommends for interoperability.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import jsonschema
import jsonschema.validators
import re2
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

_IDENTIFIER_RE: Final = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")  # $defs too
# Keywords whose values are data, not subschemas: a {"pattern": ...} in there is not a regex.
_DATA_KEYWORDS: Final = frozenset({"enum", "const", "default", "examples"})


class UnsafePatternError(ValueError):
    """A schema regex RE2 refuses (not matchable in linear time, or too big)."""


def _options() -> Any:
    options = re2.Options()
    # RE2 would also print every refused pattern to stderr; ours become errors instead.
    options.log_errors = False
    return options


_OPTIONS: Final = _options()


def _compile(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else exc
        why = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
        raise UnsafePatternError(
            f"not a linear-time (RE2) pattern: {why} (no backreferences or lookaround)"
        ) from None
    except (UnicodeError, TypeError):
        raise UnsafePatternError("not a linear-time (RE2) pattern: not valid text") from None


# Schemas are few and their patterns repeat on every validation; a bounded cache of the
# compiled ones (only schema patterns go here, never values checked as ``format: regex``).
_compiled: Final = functools.lru_cache(maxsize=1024)(_compile)


def search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` (a schema regex) occurs in ``text``; linear in len(text)."""
    return bool(_compiled(pattern).search(text) is not None)


def _where(path: list[str | int]) -> str:
    text = "config_schema"
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER_RE.fullmatch(part):
            text += f".{part}"
        else:
            text += f"[{json.dumps(part)}]"
    return text


def unsafe_patterns(schema: Any) -> list[str]:
    """Every ``pattern`` and ``patternProperties`` key in ``schema`` that RE2 refuses, as
    ``config_schema.properties.n.pattern: not a linear-time (RE2) pattern: ...``."""
    problems: list[str] = []

    def walk(node: Any, path: list[str | int]) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, [*path, i])
            return
        if not isinstance(node, Mapping):
            return
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            try:
                _compiled(pattern)
            except UnsafePatternError as exc:
                problems.append(f"{_where([*path, 'pattern'])}: {exc}")
        patterns = node.get("patternProperties")
        if isinstance(patterns, Mapping):
            for key in patterns:
                try:
                    _compiled(str(key))
                except UnsafePatternError as exc:
                    problems.append(f"{_where([*path, 'patternProperties', str(key)])}: {exc}")
        for key, value in node.items():
            if key not in _DATA_KEYWORDS:
                walk(value, [*path, str(key)])

    walk(schema, [])
    return problems


# -- the keywords, as jsonschema's own but matching with RE2 ---------------------------------------

_Errors = Iterator[ValidationError]


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> _Errors:
    if validator.is_type(instance, "string") and not search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> _Errors:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [
        key
        for key in instance
        if key not in properties and not any(search(p, key) for p in patterns)
    ]


def _additional_properties(validator: Any, extra: Any, instance: Any, schema: Any) -> _Errors:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        yield ValidationError(
            f"Additional properties are not allowed ({', '.join(map(repr, sorted(extras)))})"
        )


def _is_valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _evaluated_keys(validator: Any, instance: Mapping[str, Any], schema: Any) -> set[str]:
    """The keys of ``instance`` that ``schema`` evaluates (for ``unevaluatedProperties``):
    jsonschema's find_evaluated_property_keys_by_schema (draft 2020-12 rules), with RE2."""
    if validator.is_type(schema, "boolean"):
        return set()
    keys: set[str] = set()
    for ref_keyword in ("$ref", "$dynamicRef", "$recursiveRef"):
        ref = schema.get(ref_keyword)
        if ref is not None:
            # $recursiveRef (2019-09) is resolved as a plain $ref: the dynamic-scope rule of
            # $recursiveAnchor is not followed (a plugin schema using it evaluates fewer keys).
            resolved = validator._resolver.lookup(ref)
            inner = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys |= _evaluated_keys(inner, instance, resolved.contents)
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        keys |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        subschema = schema.get(keyword)
        if subschema is not None:
            keys |= {k for k, v in instance.items() if _is_valid(validator.descend(v, subschema))}
    for pattern in schema.get("patternProperties", {}):
        keys |= {k for k in instance if search(pattern, k)}
    for name, subschema in schema.get("dependentSchemas", {}).items():
        if name in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _is_valid(validator.descend(instance, subschema)):
                keys |= _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        branch = "then" if _is_valid(validator.descend(instance, schema["if"])) else "else"
        if branch == "then":
            keys |= _evaluated_keys(validator, instance, schema["if"])
        if branch in schema:
            keys |= _evaluated_keys(validator, instance, schema[branch])
    return keys


def _unevaluated_properties(
    validator: Any, unevaluated: Any, instance: Any, schema: Any
) -> _Errors:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    bad = [
        key
        for key in instance
        if key not in evaluated
        and not _is_valid(validator.descend(instance[key], unevaluated, path=key, schema_path=key))
    ]
    if bad:
        yield ValidationError(
            f"Unevaluated properties are not allowed ({', '.join(map(repr, sorted(bad)))})"
        )


_KEYWORDS: Final[Mapping[str, Callable[..., _Errors]]] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
}


_LINEAR: Final[dict[type[Validator], type[Validator]]] = {}
_CHECKERS: Final[dict[type[Validator], jsonschema.FormatChecker]] = {}


def linear_validator(cls: type[Validator]) -> type[Validator]:
    """``cls`` (a jsonschema draft's validator class) with every regex keyword on RE2."""
    if cls in _LINEAR:
        return _LINEAR[cls]
    mine = {name: fn for name, fn in _KEYWORDS.items() if name in cls.VALIDATORS}
    extended: type[Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        cls, validators=mine
    )
    # Two threads may both build one; either class is right and the last one is kept.
    _LINEAR[cls] = extended
    return extended


def _is_regex(instance: object) -> bool:
    if isinstance(instance, str):
        _compile(instance)  # not cached: this text is a value, not a schema
    return True


def linear_format_checker(cls: type[Validator]) -> jsonschema.FormatChecker:
    """``cls``'s format checker with ``format: regex`` meaning "RE2 compiles it"."""
    if cls in _CHECKERS:
        return _CHECKERS[cls]
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = dict(cls.FORMAT_CHECKER.checkers)
    if "regex" in checker.checkers:
        checker.checks("regex", raises=UnsafePatternError)(_is_regex)
    _CHECKERS[cls] = checker
    return checker
