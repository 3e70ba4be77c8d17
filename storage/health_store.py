"""Health scores in the database (asyncpg): health_score rows in plugin_metrics, plugins.health_score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pluginmon.storage.alert_state import QUERY_TIMEOUT_SECONDS, Connection


@dataclass(frozen=True, slots=True)
class HealthWrite:
    tenant_id: str
    plugin_id: int
    environment: str
    score: float
    labels_json: str  # the plugin_metrics row's labels, already serialised
    update_plugin: bool = True  # also set plugins.health_score / last_health_check
    write_row: bool = True  # False: only the plugins update (the row is not due)


async def write_health(conn: Connection, rows: Sequence[HealthWrite], at: datetime) -> None:
    """One 'health_score' gauge row per plugin marked ``write_row``, and
    plugins.health_score/last_health_check for those marked ``update_plugin``."""
    if not rows:
        return
    updates = [r for r in rows if r.update_plugin]
    if updates:
        await conn.execute(
            """UPDATE plugins p SET health_score = v.score, last_health_check = $3
                 FROM unnest($1::bigint[], $2::real[]) AS v(id, score)
                WHERE p.id = v.id""",
            [r.plugin_id for r in updates],
            [r.score for r in updates],
            at,
            timeout=QUERY_TIMEOUT_SECONDS,
        )
    written = [r for r in rows if r.write_row]
    if not written:
        return
    await conn.copy_records_to_table(
        "plugin_metrics",
        records=[
            (
                at,
                r.tenant_id,
                r.plugin_id,
                r.environment,
                "health_score",
                "gauge",
                float(r.score),
                r.labels_json,
            )
            for r in written
        ],
        columns=[
            "timestamp",
            "tenant_id",
            "plugin_id",
            "environment",
            "metric_name",
            "metric_kind",
            "value",
            "labels",
        ],
        timeout=QUERY_TIMEOUT_SECONDS,
    )
