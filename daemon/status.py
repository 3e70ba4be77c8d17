"""`pluginmon status`: per-plugin health from the database, and with ``--metrics`` each plugin's own metrics as rules read them (admin plane, psycopg)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pluginmon.alerts.metric_values import DEFAULT_RATE_WINDOW_SECONDS, describe
from pluginmon.storage.plugin_metrics import STATUS_SERIES_SQL, SeriesWindow, series_window

# Series older than this are not shown (the alert engine's default metrics max age).
METRICS_MAX_AGE_SECONDS = 600.0

# (Every LATERAL matches tenant_id too: Citus plans these joins only on the distribution
# column; the same rows elsewhere.)
_STATUS_SQL = """
SELECT p.tenant_id, p.name, p.environment, p.health_score, p.last_health_check,
       s."timestamp", s.up, s.cpu_percent, s.rss_bytes, s.process_count,
       h.labels::text,
       COALESCE(a.firing, '{}'::text[]),
       p.id
  FROM plugins p
  LEFT JOIN LATERAL (
        SELECT "timestamp", up, cpu_percent, rss_bytes, process_count
          FROM plugin_samples
         WHERE plugin_id = p.id AND tenant_id = p.tenant_id
         ORDER BY "timestamp" DESC
         LIMIT 1) s ON true
  LEFT JOIN LATERAL (
        SELECT labels
          FROM plugin_metrics
         WHERE plugin_id = p.id AND tenant_id = p.tenant_id AND metric_name = 'health_score'
         ORDER BY "timestamp" DESC
         LIMIT 1) h ON true
  LEFT JOIN LATERAL (
        -- Acknowledged and silenced alerts are still active: shown, marked as such.
        SELECT array_agg(
                   rule_name || '/' || severity
                   || CASE status WHEN 'firing' THEN '' ELSE ' (' || status || ')' END
                   ORDER BY rule_name, status) AS firing
          FROM plugin_alerts
         WHERE plugin_id = p.id AND tenant_id = p.tenant_id
           AND status IN ('firing', 'acknowledged', 'silenced')
           AND NOT inhibited) a ON true
 WHERE (%(tenant)s::text IS NULL OR p.tenant_id = %(tenant)s::text)
 ORDER BY p.tenant_id, p.name, p.environment
"""


@dataclass(frozen=True, slots=True)
class PluginStatus:
    tenant: str
    plugin: str
    environment: str
    up: bool | None
    cpu_percent: float | None
    rss_bytes: int | None
    processes: int | None
    last_sample: datetime | None
    health_score: float | None
    weakest_component: str | None
    weakest_score: float | None
    weakest_detail: str | None
    firing_alerts: tuple[str, ...]
    # The plugin's own metrics as rules read them (gauge values, counter rates "name/s",
    # histogram quantiles "name:pNN"); None unless asked for.
    metrics: dict[str, float | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["last_sample"] = self.last_sample.isoformat() if self.last_sample else None
        out["firing_alerts"] = list(self.firing_alerts)
        return out


def _weakest(labels_text: str | None) -> tuple[str | None, float | None, str | None]:
    """The weakest component from the health_score series' labels, whatever shape it took."""
    if not labels_text:
        return None, None, None
    try:
        labels = json.loads(labels_text)
    except ValueError:
        return None, None, None
    if not isinstance(labels, dict):
        return None, None, None
    name = labels.get("weakest") or labels.get("weakest_component")
    detail = labels.get("weakest_detail") or labels.get("detail")
    score: float | None = None
    components = labels.get("components")
    if isinstance(components, dict) and components:
        scores: dict[str, float] = {}
        for key, value in components.items():
            raw = value.get("score") if isinstance(value, dict) else value
            if isinstance(raw, int | float):
                scores[str(key)] = float(raw)
        if scores:
            if not isinstance(name, str) or name not in scores:
                name = min(scores, key=lambda k: scores[k])
            score = scores[name]
            entry = components.get(name)
            if isinstance(entry, dict) and detail is None:
                detail = entry.get("detail")
    elif isinstance(components, list):
        best: tuple[float, str, str | None] | None = None
        for entry in components:
            if isinstance(entry, dict) and isinstance(entry.get("score"), int | float):
                candidate = (float(entry["score"]), str(entry.get("name")), entry.get("detail"))
                if best is None or candidate[0] < best[0]:
                    best = candidate
        if best is not None:
            score, name, detail = best
    if isinstance(labels.get("weakest_score"), int | float):
        score = float(labels["weakest_score"])
    return (
        name if isinstance(name, str) else None,
        score,
        detail if isinstance(detail, str) else None,
    )


def fetch_status(
    database_url: str, *, tenant: str | None = None, metrics: bool = False
) -> list[PluginStatus]:
    series: dict[tuple[int, str], list[SeriesWindow]] = defaultdict(list)
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        rows = conn.execute(_STATUS_SQL, {"tenant": tenant}).fetchall()
        if metrics:
            now = datetime.now(UTC)
            since = now - timedelta(seconds=METRICS_MAX_AGE_SECONDS)
            with conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(
                    STATUS_SERIES_SQL,
                    {
                        "since": since,
                        "rate_since": now - timedelta(seconds=DEFAULT_RATE_WINDOW_SECONDS),
                        "tenant": tenant,
                    },
                )
                for record in cursor:
                    window = series_window(record)
                    series[(window.plugin_id, window.environment)].append(window)
    out: list[PluginStatus] = []
    for row in rows:
        name, score, detail = _weakest(row[10])
        out.append(
            PluginStatus(
                tenant=str(row[0]),
                plugin=str(row[1]),
                environment=str(row[2]),
                health_score=None if row[3] is None else round(float(row[3]), 1),
                last_sample=row[5],
                up=row[6],
                cpu_percent=None if row[7] is None else float(row[7]),
                rss_bytes=row[8],
                processes=row[9],
                weakest_component=name,
                weakest_score=score,
                weakest_detail=detail,
                firing_alerts=tuple(row[11]),
                metrics=describe(series.get((row[12], str(row[2])), [])) if metrics else None,
            )
        )
    return out


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def format_table(rows: list[PluginStatus]) -> str:
    if not rows:
        return "no plugins in the database yet"
    header = ("TENANT", "PLUGIN", "ENV", "UP", "CPU%", "MEMORY", "HEALTH", "WEAKEST", "FIRING")
    lines = [header]
    for r in rows:
        weakest = "-"
        if r.weakest_component:
            weakest = r.weakest_component
            if r.weakest_score is not None:
                weakest += f" ({r.weakest_score:.0f})"
        lines.append(
            (
                r.tenant,
                r.plugin,
                r.environment,
                "-" if r.up is None else ("up" if r.up else "DOWN"),
                "-" if r.cpu_percent is None else f"{r.cpu_percent:.1f}",
                _bytes(r.rss_bytes),
                "-" if r.health_score is None else f"{r.health_score:.0f}",
                weakest,
                ", ".join(r.firing_alerts) or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    )


def format_metrics(rows: list[PluginStatus]) -> str:
    """Each plugin's own metrics, one line each, under the plugin."""
    lines: list[str] = []
    for r in rows:
        if not r.metrics:
            continue
        lines.append(f"{r.tenant}/{r.plugin} ({r.environment})")
        width = max(len(name) for name in r.metrics)
        for name, value in r.metrics.items():
            lines.append(f"  {name.ljust(width)}  {'-' if value is None else f'{value:.6g}'}")
    return "\n".join(lines) or "no plugin metrics in the last 10 minutes"
