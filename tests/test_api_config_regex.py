"""Regexes in a plugin's config_schema are matched in linear time (RE2): a pattern RE2 cannot
compile is refused at registration (create and update) naming its place in the schema; a
backtracking-prone pattern (``^(a+)+$``) answers at once on the value that takes Python's
``re`` exponential time; one stored before the check fails closed; every draft's regex
keywords are ours."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from pluginmon.registry import schema_regex
from pluginmon.registry.config_validation import validate_value
from pluginmon.registry.errors import InvalidError
from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness
from tests.config_helpers import config_api

EVIL = "^(a+)+$"


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with config_api(migrated_db, location=None) as h:
        await h.token("ci", tenant="a", role=Role.WRITER)
        yield h


async def _register(api: ApiHarness, name: str, schema: dict[str, Any]) -> Any:
    return await api.call(
        "POST", "/api/v1/plugins", token="ci", body={"name": name, "config_schema": schema}
    )


async def _put(api: ApiHarness, plugin: str, key: str, value: Any) -> Any:
    return await api.call(
        "PUT",
        f"/api/v1/plugins/{plugin}/config/{key}?environment=production",
        token="ci",
        body={"value": value, "secret": False},
    )


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        (
            {"properties": {"n": {"type": "string", "pattern": "^(a)\\1$"}}},
            "config_schema.properties.n.pattern: not a linear-time (RE2) pattern",
        ),
        (
            {"patternProperties": {"^(?=x)": {"type": "integer"}}},
            'config_schema.patternProperties["^(?=x)"]: not a linear-time (RE2) pattern',
        ),
        (
            {"$defs": {"d": {"prefixItems": [{"pattern": "(?<=a)b"}]}}},
            "config_schema.$defs.d.prefixItems[0].pattern: not a linear-time (RE2) pattern",
        ),
    ],
)
async def test_registration_refuses_patterns_re2_cannot_compile(
    api: ApiHarness, schema: dict[str, Any], where: str
) -> None:
    reply = await _register(api, "p1", schema)
    assert reply.status == 422, reply.body
    assert reply.error["field"] == "config_schema"
    assert where in reply.error["message"]
    assert await api.fetch("SELECT 1 FROM plugins WHERE name = 'p1'") == []


async def test_update_refuses_them_too_and_data_keywords_are_not_regexes(api: ApiHarness) -> None:
    # A {"pattern": ...} inside enum/const/default is data, not a regex.
    data = {"properties": {"n": {"enum": [{"pattern": "(a)\\1"}], "default": {"pattern": "\\1"}}}}
    assert (await _register(api, "p2", data)).status == 201
    changed = await api.call(
        "PATCH",
        "/api/v1/plugins/p2",
        token="ci",
        body={"config_schema": {"properties": {"n": {"pattern": "(a)\\1"}}}},
    )
    assert changed.status == 422, changed.body
    assert "config_schema.properties.n.pattern: not a linear-time" in changed.error["message"]
    stored = await api.fetch("SELECT config_schema::text AS s FROM plugins WHERE name = 'p2'")
    assert json.loads(stored[0]["s"]) == data


async def test_backtracking_pattern_is_matched_in_linear_time(api: ApiHarness) -> None:
    """The reproduction: with Python's re, 24 characters took 1.45 s, tripling every 2 more;
    40 would take hours (the test would never end). RE2 compiles the pattern, so it is accepted."""
    schema = {"properties": {"n": {"type": "string", "pattern": EVIL}}}
    assert (await _register(api, "p3", schema)).status == 201
    bad = await _put(api, "p3", "n", "a" * 40 + "!")
    assert bad.status == 422, bad.body
    assert bad.error["code"] == "schema_violation"
    assert f"must match the pattern {json.dumps(EVIL)}" in bad.error["message"]
    long_bad = await _put(api, "p3", "n", "a" * 10_000 + "!")
    assert long_bad.status == 422, long_bad.body
    good = await _put(api, "p3", "n", "a" * 10_000)
    assert good.status == 200, good.body
    assert good.body["value"] == "a" * 10_000


async def test_pattern_properties_key_of_128_chars(api: ApiHarness) -> None:
    closed = {"patternProperties": {EVIL: {"type": "integer"}}, "additionalProperties": False}
    assert (await _register(api, "p4", closed)).status == 201
    refused = await _put(api, "p4", "a" * 127 + "b", 1)
    assert refused.status == 422, refused.body
    assert refused.error["code"] == "unknown_config_key"
    # (A key matched by patternProperties under additionalProperties false is refused by
    # sql/001's trigger, which knows only "properties": hence an open schema below.)
    open_schema = {"patternProperties": {EVIL: {"type": "integer"}}}
    assert (await _register(api, "p4o", open_schema)).status == 201
    typed = await _put(api, "p4o", "a" * 128, "x")
    assert typed.status == 422, typed.body
    assert "must be of type integer" in typed.error["message"]
    ok = await _put(api, "p4o", "a" * 128, 7)
    assert ok.status == 200, ok.body
    unmatched = await _put(api, "p4o", "a" * 127 + "b", "x")
    assert unmatched.status == 200, unmatched.body


async def test_a_stored_unsafe_pattern_fails_closed(api: ApiHarness) -> None:
    """A schema stored before registration checked its regexes (written here as the owner):
    the value is refused naming the schema, never matched with a backtracking engine."""
    assert (await _register(api, "p5", {"type": "object"})).status == 201
    stored = {"properties": {"n": {"type": "string", "pattern": "^(a)\\1$"}}}
    await api.fetch(
        "UPDATE plugins SET config_schema = $1::jsonb WHERE name = 'p5'", json.dumps(stored)
    )
    # Python's re would accept "aa" here; RE2 cannot compile the pattern at all.
    reply = await _put(api, "p5", "n", "aa")
    assert reply.status == 422, reply.body
    assert reply.error["field"] == "config_schema"
    assert "cannot be matched in linear time" in reply.error["message"]
    assert await api.fetch("SELECT 1 FROM plugin_config") == []


async def test_a_stored_backtracking_pattern_validates_a_long_value(api: ApiHarness) -> None:
    assert (await _register(api, "p6", {"type": "object"})).status == 201
    stored = {
        "properties": {
            "n": {"type": "string", "pattern": EVIL},
            "m": {"type": "object", "patternProperties": {EVIL: {"type": "integer"}}},
        }
    }
    await api.fetch(
        "UPDATE plugins SET config_schema = $1::jsonb WHERE name = 'p6'", json.dumps(stored)
    )
    bad = await _put(api, "p6", "n", "a" * 10_000 + "!")
    assert (bad.status, bad.error["code"]) == (422, "schema_violation")
    nested = await _put(api, "p6", "m", {"a" * 10_000: "not an integer"})
    assert nested.status == 422, nested.body
    assert "must be of type integer" in nested.error["message"]
    skipped = await _put(api, "p6", "m", {"a" * 10_000 + "!": "no pattern matches this key"})
    assert skipped.status == 200, skipped.body


@pytest.mark.parametrize(
    "draft",
    [
        jsonschema.Draft3Validator,
        jsonschema.Draft4Validator,
        jsonschema.Draft6Validator,
        jsonschema.Draft7Validator,
        jsonschema.Draft201909Validator,
        jsonschema.Draft202012Validator,
    ],
)
def test_every_drafts_regex_keywords_are_re2(draft: type[Any]) -> None:
    cls = schema_regex.linear_validator(draft)
    for keyword in ("pattern", "patternProperties", "additionalProperties"):
        assert cls.VALIDATORS[keyword] is schema_regex._KEYWORDS[keyword]
    if "unevaluatedProperties" in draft.VALIDATORS:
        assert cls.VALIDATORS["unevaluatedProperties"] is schema_regex._unevaluated_properties
    # The other keywords are the draft's own.
    assert cls.VALIDATORS["type"] is draft.VALIDATORS["type"]


def test_unevaluated_properties_and_format_regex_use_re2() -> None:
    schema = {
        "properties": {
            "m": {
                "type": "object",
                "allOf": [{"patternProperties": {EVIL: {"type": "integer"}}}],
                "unevaluatedProperties": False,
            },
            "r": {"type": "string", "format": "regex"},
        }
    }
    validate_value(schema, "m", {"a" * 10_000: 1}, secret=False)
    with pytest.raises(InvalidError, match="has properties the schema does not allow"):
        validate_value(schema, "m", {"a" * 10_000 + "!": 1}, secret=False)
    validate_value(schema, "r", "^[a-z]+$", secret=False)
    # Python's re compiles a lookahead; as a pattern pluginmon would match it could not work.
    with pytest.raises(InvalidError, match='must be a valid "regex"'):
        validate_value(schema, "r", "(?=a)b", secret=False)
