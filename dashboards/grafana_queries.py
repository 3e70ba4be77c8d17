"""What Grafana does to our dashboards' queries: variables, macros, and the queries in the JSON.

Shared by the dashboard tests and bench/dashboard_queries.py (neither may import the other).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent
# A quoted string in a query (PromQL or SQL), so that "$" inside one is not a variable.
QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


# -- Grafana interpolation ---------------------------------------------------------------------
#
# What Grafana does to a query before the data source runs it, for the parts our dashboards
# use: template variables (frontend, `interpolateVariable` of the SQL and Prometheus data
# sources) and then, for PostgreSQL, the backend macro engine
# (pkg/tsdb/grafana-postgresql-datasource/macros.go, without the timescaledb option).


@dataclass(frozen=True, slots=True)
class Variable:
    """A dashboard variable's current selection; ``multi`` if the variable is multi/All."""

    values: tuple[str, ...]
    multi: bool = False
    all_value: str | None = None  # the variable's allValue, when "All" is selected


@dataclass(frozen=True, slots=True)
class GrafanaContext:
    time_from: datetime
    time_to: datetime
    interval: str = "1m"  # $__interval as Grafana renders it for the panel width
    variables: Mapping[str, Variable] = field(default_factory=dict)
    rate_interval: str = "1m"  # Prometheus $__rate_interval
    timescaledb: bool = False  # the PostgreSQL data source's "TimescaleDB" switch


_INTERVAL_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
# Grafana's variable syntax: $name, [[name:format]], ${name.field:format}
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)
# The macro engine's own expression (macros.go: sExpr).
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")


def interval_seconds(text: str) -> float:
    match = _INTERVAL.match(text.strip().strip("'"))
    if not match:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return float(match.group(1)) * _INTERVAL_UNITS[match.group(2)]


def rfc3339nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: trailing zeros of the fraction dropped."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += "." + f"{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def go_float(value: float) -> str:
    """Go's %v of a float64 (strconv 'g', shortest digits, exponent form from 1e+06 on)."""
    if value == 0:
        return "0"
    decimal = Decimal(repr(value)).normalize()
    sign, digits, exponent = decimal.as_tuple()
    assert isinstance(exponent, int)
    text_digits = "".join(map(str, digits))
    point = len(text_digits) + exponent  # position of the decimal point
    exp10 = point - 1
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:
        mantissa = text_digits[0] + ("." + text_digits[1:] if len(text_digits) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text_digits}"
    if point >= len(text_digits):
        return prefix + text_digits + "0" * (point - len(text_digits))
    return f"{prefix}{text_digits[:point]}.{text_digits[point:]}"


def _sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _format_variable(variable: Variable, fmt: str | None, dialect: str) -> str:
    values = variable.values
    if variable.all_value is not None and fmt is None:
        return variable.all_value
    if fmt == "sqlstring":
        return ",".join(_sql_quote(value) for value in values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "raw":
        return ",".join(values)
    if fmt is not None:
        raise ValueError(f"variable format {fmt!r} is not supported by this expander")
    if dialect == "sql":
        # SQL data sources: multi-value or All -> quoted list; single value -> as is.
        return ",".join(_sql_quote(v) for v in values) if variable.multi else values[0]
    # Prometheus: multi -> regex alternation of escaped values; single -> the value.
    if variable.multi:
        escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value) for value in values]
        return "(" + "|".join(escaped) + ")" if len(escaped) > 1 else escaped[0]
    return values[0]


def interpolate_variables(text: str, context: GrafanaContext, *, dialect: str) -> str:
    """Replace template variables and Grafana's global variables; leave macros alone."""
    span = (context.time_to - context.time_from).total_seconds()
    interval = interval_seconds(context.interval)
    builtins = {
        "__interval": context.interval,
        "__interval_ms": str(int(interval * 1000)),
        "__range": f"{int(span)}s",
        "__range_s": str(int(span)),
        "__range_ms": str(int(span * 1000)),
        "__rate_interval": context.rate_interval,
        "__from": str(int(context.time_from.timestamp() * 1000)),
        "__to": str(int(context.time_to.timestamp() * 1000)),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if match.group(5):
            raise ValueError(f"variable fields (${{{name}.{match.group(5)}}}) are not supported")
        if name in builtins:
            return builtins[name]
        variable = context.variables.get(name)
        if variable is None:
            return match.group(0)  # Grafana leaves unknown names (and macros) untouched
        return _format_variable(variable, fmt, dialect)

    return _VARIABLE.sub(replace, text)


def _evaluate_macro(name: str, args: list[str], context: GrafanaContext) -> str:
    start, end = rfc3339nano(context.time_from), rfc3339nano(context.time_to)
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{start}' AND '{end}'"
    if name == "__timeFrom":
        return f"'{start}'"
    if name == "__timeTo":
        return f"'{end}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(args) < 2:
            raise ValueError(f"macro {name} needs time column and interval")
        if context.timescaledb:
            group = f"time_bucket('{interval_seconds(args[1]):.3f}s',{args[0]})"
            return group + ' AS "time"' if name == "__timeGroupAlias" else group
        seconds = go_float(interval_seconds(args[1]))
        group = f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
        return group + ' AS "time"' if name == "__timeGroupAlias" else group
    if name == "__unixEpochFilter":
        return (
            f"{args[0]} >= {int(context.time_from.timestamp())} AND "
            f"{args[0]} <= {int(context.time_to.timestamp())}"
        )
    raise ValueError(f"unknown macro {name!r}")


def expand_macros(sql: str, context: GrafanaContext) -> str:
    """The PostgreSQL data source's macro engine."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "__timeGroup":
            # macros.go: a $__timeGroup directly followed by ',' gets the alias (pre-5.3 use).
            index = sql.find(match.group(0))
            after = index + len(match.group(0))
            if index >= 0 and after < len(sql) and sql[after] == ",":
                name = "__timeGroupAlias"
        args = [arg.strip(" ") for arg in match.group(2).split(",")]
        return _evaluate_macro(name, args, context)

    return _MACRO.sub(replace, sql)


def grafana_sql(sql: str, context: GrafanaContext) -> str:
    """A dashboard's rawSql as the PostgreSQL server receives it."""
    expanded = expand_macros(interpolate_variables(sql, context, dialect="sql"), context)
    leftover = re.findall(r"\$[\w{]+", QUOTED_STRING.sub("''", expanded))
    assert not leftover, f"not interpolated: {leftover} in {expanded}"
    return expanded


def prometheus_context() -> GrafanaContext:
    """The selection the Prometheus dashboard tests use: tenant acme, two environments."""
    end = datetime(2026, 1, 1, tzinfo=UTC)
    return GrafanaContext(
        time_from=end - timedelta(hours=1),
        time_to=end,
        interval="1m",
        rate_interval="1m",
        variables={
            "tenant": Variable(("acme",)),
            "environment": Variable(("production", "staging"), multi=True),
            "plugin": Variable(("resizer",)),
            "top": Variable(("10",)),
        },
    )


def grafana_promql(expr: str, context: GrafanaContext) -> str:
    """A dashboard's PromQL as Prometheus receives it."""
    expanded = interpolate_variables(expr, context, dialect="prometheus")
    assert "$" not in expanded, f"not interpolated: {expanded}"
    return expanded


# -- Dashboard JSON ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DashboardQuery:
    """One query found in a dashboard: where it sits, its text, and its result format."""

    dashboard: str
    location: str  # "panel <id> <title> [refId]", "variable <name>", "annotation <name>"
    title: str
    text: str
    format: str  # time_series | table | variable | annotation
    datasource_uid: str


def load_dashboard(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def dashboard_files(kind: str) -> list[Path]:
    return sorted((DASHBOARDS_DIR / kind).glob("*.json"))


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(path: Path) -> list[DashboardQuery]:
    """Every query of a dashboard: panel targets, template variables, annotations."""
    data = load_dashboard(path)
    name = path.name
    found: list[DashboardQuery] = []
    for panel in iter_panels(data["panels"]):
        for target in panel.get("targets", []):
            uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid", "")
            text = target.get("rawSql") or target.get("expr")
            assert text, f"{name}: panel {panel['id']} target {target['refId']} has no query"
            found.append(
                DashboardQuery(
                    name,
                    f"panel {panel['id']} {panel['title']!r} [{target['refId']}]",
                    panel["title"],
                    text,
                    target.get("format", "time_series"),
                    uid,
                )
            )
    for variable in data["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query if isinstance(query, str) else query.get("rawSql") or query.get("query")
        found.append(
            DashboardQuery(
                name,
                f"variable {variable['name']}",
                variable["name"],
                text,
                "variable",
                variable["datasource"]["uid"],
            )
        )
    for annotation in data["annotations"]["list"]:
        if annotation.get("builtIn"):
            continue
        target = annotation.get("target") or {}
        text = target.get("rawSql") or annotation.get("expr") or target.get("expr")
        assert text, f"{name}: annotation {annotation['name']} has no query"
        found.append(
            DashboardQuery(
                name,
                f"annotation {annotation['name']}",
                annotation["name"],
                text,
                "annotation",
                annotation["datasource"]["uid"],
            )
        )
    return found
