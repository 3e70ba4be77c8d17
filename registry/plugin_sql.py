"""The plugin catalogue's read SQL: a plugin row with its environments, and a page of plugins
as the API's JSON (registry.plugins runs them)."""

from __future__ import annotations


def _json_time(column: str) -> str:
    """SQL writing the timestamptz ``column`` as the API writes a time (pydantic's form):
    RFC 3339 in UTC with a ``Z``, microseconds unless they are zero; NULL stays NULL.
    ``column`` is a name from this module, never input."""
    return (
        f"replace(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
        " '.000000Z', 'Z')"
    )


def _finite(column: str) -> str:
    """SQL for the double ``column`` with NaN and Infinity (which its check lets through, and
    PostgreSQL's JSON would write as strings) as NULL, as pydantic writes them."""
    return f"nullif(nullif({column}, 'NaN'), 'Infinity')"


# A plugin's environments as a JSON array, in EnvironmentState's (and the API's) field order.
_ENVIRONMENTS_JSON = f"""
       coalesce((SELECT json_agg(json_build_object(
                     'environment', e.environment, 'version', e.version, 'status', e.status,
                     'enabled', e.enabled, 'health_score', e.health_score,
                     'last_health_check', {_json_time("e.last_health_check")},
                     'cpu_usage', {_finite("e.cpu_usage")}, 'memory_usage', e.memory_usage,
                     'updated_at', {_json_time("e.updated_at")})
                     ORDER BY e.environment)
                   FROM plugin_environments e
                  WHERE e.plugin_id = p.id AND e.tenant_id = p.tenant_id), '[]'::json)"""  # noqa: S608 - constant

# health_score is real (float4) in the table: 66.67 would read back as 66.66999816894531, so
# it is rounded here, where the list's JSON below rounds it the same way.
_HEALTH_SCORE = "round(p.health_score::numeric, 2)::float8"

SELECT = f"""
SELECT p.id, p.name, p.version, p.description, p.installed_from::text AS installed_from,
       p.installed_by, p.installed_at, p.config_schema::text AS config_schema, p.status,
       p.enabled, p.dependencies, {_HEALTH_SCORE} AS health_score, p.last_health_check,
       p.cpu_usage, p.memory_usage, p.created_at, p.updated_at,
       {_ENVIRONMENTS_JSON}::text AS environments
  FROM plugins p
"""  # noqa: S608 - built from this module's constants only

# A page of plugins: the list's filters, its order and its limit ($1 status, $2 enabled, $3 limit),
# the same for the rows (registry.plugins.list_plugins) and for the API's JSON (LIST_JSON).
PAGE = """ WHERE ($1::text IS NULL OR p.status = $1) AND ($2::boolean IS NULL OR p.enabled = $2)
 ORDER BY p.name LIMIT $3"""

# A page of plugins as the API writes them, one JSON object a row (a Plugin without its id,
# in the same field order), written by the database: a list is the API's dearest read, and
# decoding 100 rows into dataclasses and encoding them again took a quarter of the event
# loop's time under bench/api.py's mix. One row a plugin, not one json_agg over a LIMITed
# subquery: Citus plans no correlated subquery (the environments) over a subquery in FROM.
# Equal by value to the models' JSON (tests/test_api_encoded.py): the same keys in the same
# order, the same strings and times; a whole float may be written 70 where pydantic writes
# 70.0 (the same JSON number), floats as the session's extra_float_digits says (the default,
# 1, writes the shortest exact form).
LIST_JSON = f"""
SELECT json_build_object(
           'name', p.name, 'version', p.version, 'description', p.description,
           'installed_from', p.installed_from, 'installed_by', p.installed_by,
           'installed_at', {_json_time("p.installed_at")}, 'config_schema', p.config_schema,
           'status', p.status, 'enabled', p.enabled, 'dependencies', p.dependencies,
           'health_score', {_HEALTH_SCORE},
           'last_health_check', {_json_time("p.last_health_check")},
           'cpu_usage', {_finite("p.cpu_usage")}, 'memory_usage', p.memory_usage,
           'created_at', {_json_time("p.created_at")}, 'updated_at', {_json_time("p.updated_at")},
           'environments', {_ENVIRONMENTS_JSON.strip()})::text AS item
  FROM plugins p{PAGE}
"""  # noqa: S608 - built from this module's constants only


# The same with the tenant as $2 in the subquery too: Citus routes a locking query to one
# shard group only when every distributed table in it is filtered by the tenant itself.
SELECT_OF_TENANT = SELECT.replace("e.tenant_id = p.tenant_id", "e.tenant_id = $2")
assert SELECT_OF_TENANT != SELECT
