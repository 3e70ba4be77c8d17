"""The /api/v1 endpoint of a plugin's daily usage analytics (uptime, CPU time, memory percentiles, restarts, operations). Glue only: registry.analytics reads."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

from pydantic import AwareDatetime, ConfigDict, Field

from pluginmon.daemon.api_http import Call, Route
from pluginmon.daemon.api_models import ENVIRONMENT_PATTERN, Query, Response
from pluginmon.registry import analytics
from pluginmon.registry.plugins import DEFAULT_ENVIRONMENT


class AnalyticsQuery(Query):
    environment: str = Field(default=DEFAULT_ENVIRONMENT, pattern=ENVIRONMENT_PATTERN)
    # ``from`` is a Python keyword: the parameter's name is the alias.
    since: AwareDatetime | None = Field(
        default=None,
        alias="from",
        description="ISO-8601 with an offset; days starting at or after it (default: 30 days "
        "before to)",
    )
    until: AwareDatetime | None = Field(
        default=None,
        alias="to",
        description="ISO-8601 with an offset; days starting before it (default: now); at most "
        f"{analytics.MAX_RANGE.days} days after from",
    )


class DayOut(Response):
    day: str = Field(description="the UTC day, YYYY-MM-DD")
    period_start: datetime
    sample_count: int | None
    observed_seconds: float | None = Field(description="seconds covered by samples")
    up_seconds: float | None
    uptime_ratio: float | None = Field(
        description="up_seconds / observed_seconds; a stretch without samples counts neither way"
    )
    cpu_seconds: float | None
    rss_bytes_p50: float | None
    rss_bytes_p95: float | None
    rss_bytes_p99: float | None
    restarts: int | None
    operations: int | None = Field(description="operations started that day")
    operation_failures: int | None = Field(description="of those, the ones that failed")
    computed_through: datetime | None = Field(
        description="the end of the window computed: the day's end, or the last full hour today"
    )
    invocations: int = Field(description="written by the platform")
    errors: int = Field(description="written by the platform")
    active_users: int = Field(description="written by the platform")
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None


class AnalyticsOut(Response):
    # ``from`` again: the range answered, under the query's names.
    model_config = ConfigDict(frozen=True, serialize_by_alias=True)

    plugin: str
    environment: str
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    items: list[DayOut]


async def read_analytics(call: Call) -> AnalyticsOut:
    query: AnalyticsQuery = call.query
    span = analytics.analytics_range(start=query.since, end=query.until, now=call.now)
    rows = await analytics.daily_analytics(
        call.conn, call.params["name"], environment=query.environment, span=span
    )
    return AnalyticsOut(
        plugin=call.params["name"],
        environment=query.environment,
        from_=span.start,
        to=span.end,
        items=[
            DayOut.model_validate({"day": row.period_start.date().isoformat(), **asdict(row)})
            for row in rows
        ],
    )


def analytics_routes() -> list[Route]:
    # fmt: off
    return [
        Route("GET", "/plugins/{name}/analytics",
              "A plugin's daily analytics: uptime, CPU time, memory percentiles, restarts, "
              "operations and failures per UTC day", AnalyticsOut, read_analytics,
              query=AnalyticsQuery, tag="analytics", errors=(404, 422),
              description=(
                  "Rows of days starting in [from, to), computed hourly by the maintenance "
                  "job (today's up to the last full hour) and kept a year. 422 naming from "
                  "or to for a bad time, from not before to, or a range over 366 days.")),
    ]
    # fmt: on
