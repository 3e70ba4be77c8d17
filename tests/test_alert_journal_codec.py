"""The alert journal's codec (pydantic TypeAdapters over AlertWrite/OutboxWrite/DeliveryRecord):
round trips, journals written by the hand-written codec before it, and clear errors (no
database)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pluginmon.storage.alert_journal import (
    AlertJournal,
    JournalFormatError,
    decode_alert_write,
    decode_delivery,
    decode_outbox_write,
    encode_alert_write,
    encode_delivery,
    encode_outbox_write,
)
from pluginmon.storage.alert_state import AlertWrite
from pluginmon.storage.outbox_store import DeliveryRecord, OutboxWrite

DATA = Path(__file__).resolve().parent / "data"
T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LABELS = {
    "alertname": "CpuHigh",
    "environment": "production",
    "instance": "host-a",
    "plugin": "resizer",
    "severity": "critical",
    "tenant": "acme",
}
FIRING = AlertWrite(
    id=None,
    tenant_id="acme",
    plugin_id=3,
    environment="production",
    rule_name="CpuHigh",
    fingerprint="0123456789abcdef",
    severity="critical",
    status="firing",
    inhibited=False,
    value=90.5,
    labels=LABELS,
    annotations={"summary": "resizer cpu 90%"},
    started_at=T,
    fired_at=T + timedelta(seconds=10),
    resolved_at=None,
    silenced_until=None,
    last_active_at=T + timedelta(seconds=10),
    last_evaluated_at=T + timedelta(seconds=10),
    notified_at=T + timedelta(seconds=10),
    instance="host-a",
)
NOTIFICATION = OutboxWrite(
    tenant_id="acme",
    plugin_id=3,
    environment="production",
    receiver="ops",
    receiver_kind="webhook",
    group_key='{}:{environment="production", plugin="resizer", tenant="acme"}',
    idempotency_key="0f" * 16,
    body='{"version":"4","status":"firing"}',
    fingerprints=("0123456789abcdef",),
    created_at=T + timedelta(seconds=10),
    instance="host-a",
)
# Exactly what the hand-written v1 codec (before the TypeAdapters) wrote for FIRING.
V1_ALERT = (
    '{"annotations": {"summary": "resizer cpu 90%"}, "environment": "production", '
    '"fingerprint": "0123456789abcdef", "fired_at": "2026-03-01T12:00:10+00:00", "id": null, '
    '"inhibited": false, "instance": "host-a", "labels": {"alertname": "CpuHigh", '
    '"environment": "production", "instance": "host-a", "plugin": "resizer", '
    '"severity": "critical", "tenant": "acme"}, "last_active_at": "2026-03-01T12:00:10+00:00", '
    '"last_evaluated_at": "2026-03-01T12:00:10+00:00", "notified_at": '
    '"2026-03-01T12:00:10+00:00", "plugin_id": 3, "resolved_at": null, "rule_name": "CpuHigh", '
    '"severity": "critical", "silenced_until": null, "started_at": "2026-03-01T12:00:00+00:00", '
    '"status": "firing", "tenant_id": "acme", "v": 1, "value": 90.5}'
)


def test_round_trip_keeps_every_field_nan_and_none() -> None:
    pending = replace(FIRING, status="pending", value=math.nan, fired_at=None, notified_at=None)
    for write in (FIRING, replace(FIRING, id=41, value=None), pending):
        text = encode_alert_write(write)
        assert json.loads(text)["v"] == 2
        decoded = decode_alert_write(text)
        if write.value is not None and math.isnan(write.value):
            assert decoded.value is not None
            assert math.isnan(decoded.value)
            decoded = replace(decoded, value=write.value)
        assert decoded == write
    assert decode_outbox_write(encode_outbox_write(NOTIFICATION)) == NOTIFICATION
    assert "NaN" in encode_alert_write(pending)  # not null: the value is kept


def test_the_document_keeps_the_v1_shape() -> None:
    """v2 is v1 plus the plugin's name (v1 named it in the labels only)."""
    new = json.loads(encode_alert_write(replace(FIRING, plugin="resizer")))
    old = json.loads(V1_ALERT)
    assert new.pop("plugin") == "resizer"
    assert (new.pop("v"), old.pop("v")) == (2, 1)
    assert sorted(new) == sorted(old)
    # timestamps now end in Z rather than +00:00; both name the same instant
    assert new["started_at"] == "2026-03-01T12:00:00Z"
    assert {k: v for k, v in new.items() if not k.endswith("_at")} == {
        k: v for k, v in old.items() if not k.endswith("_at")
    }
    assert decode_alert_write(V1_ALERT) == FIRING


def test_entries_of_plugins_without_an_id_keep_the_plugin_name() -> None:
    """Journaled before the plugin had a database id (evaluated before migrations or during
    an outage): plugin_id null, the name kept for the lookup at replay."""
    alert = replace(FIRING, plugin_id=None, plugin="resizer")
    assert decode_alert_write(encode_alert_write(alert)) == alert
    note = replace(NOTIFICATION, plugin_id=None, plugin="resizer")
    assert decode_outbox_write(encode_outbox_write(note)) == note
    document = json.loads(encode_outbox_write(note))
    assert (document["plugin_id"], document["plugin"], document["v"]) == (None, "resizer", 2)


def test_delivery_marks_round_trip_and_refuse_unknown_outcomes() -> None:
    mark = DeliveryRecord(
        idempotency_key="0f" * 16,
        receiver="ops",
        outcome="delivered",
        attempts=3,
        at=T + timedelta(seconds=12),
        status_code=200,
    )
    assert decode_delivery(encode_delivery(mark)) == mark
    bad = encode_delivery(replace(mark, outcome="maybe"))
    with pytest.raises(JournalFormatError, match="outcome: 'maybe'"):
        decode_delivery(bad)


def test_entries_without_an_owner_decode_with_an_empty_instance() -> None:
    old = json.loads(V1_ALERT)
    del old["instance"]
    assert decode_alert_write(json.dumps(old)).instance == ""


def test_a_journal_written_by_the_v1_codec_replays(tmp_path: Path) -> None:
    """tests/data/alert-journal-v1 was written by AlertJournal with the hand-written codec
    (a pending write with value NaN, then the firing write and its notification)."""
    directory = tmp_path / "journal"
    shutil.copytree(DATA / "alert-journal-v1", directory)
    journal = AlertJournal(directory)
    try:
        first, second = journal.read()
    finally:
        journal.close()
    (pending,) = first.entries
    assert isinstance(pending, AlertWrite)
    assert (pending.status, pending.fired_at, pending.instance) == ("pending", None, "host-a")
    assert pending.value is not None
    assert math.isnan(pending.value)
    assert second.entries == (FIRING, NOTIFICATION)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"v": 3}', "alert entry format 3 is not supported"),
        ("[1, 2]", "alert entry is not a JSON object"),
        ("{not json", "alert entry is not JSON"),
        (
            V1_ALERT.replace('"plugin_id": 3, ', ""),
            "malformed alert entry: plugin_id: Field required",
        ),
        (
            V1_ALERT.replace('"inhibited": false', '"inhibited": "perhaps"'),
            "malformed alert entry: inhibited: Input should be a valid boolean",
        ),
        (
            V1_ALERT.replace("2026-03-01T12:00:00+00:00", "2026-03-01T12:00:00"),
            "malformed alert entry: started_at: timestamp without a zone",
        ),
    ],
)
def test_bad_entries_are_refused_with_the_field_named(text: str, message: str) -> None:
    with pytest.raises(JournalFormatError) as refused:
        decode_alert_write(text)
    assert message in str(refused.value)
