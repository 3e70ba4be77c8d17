"""The audit trail: appending entries, reading them back, and verifying each tenant's hash chains.

The database chains entries as they are inserted (sql/030_api.sql): each entry takes a lane
of its tenant (concurrent writers chain side by side, sequential ones all use lane 0); per
(tenant, lane) ``seq`` counts 1, 2, 3..., ``prev_hash`` is the previous entry's
``entry_hash`` (or the retention anchor's), and ``entry_hash`` is SHA-256 over a canonical
encoding of every column. This
module recomputes that hash independently, in Python, from the columns as the database
renders them as text, so ``pluginmon audit verify`` does not trust the database's own
function: an entry changed, removed or reordered behind the triggers' back (by a superuser or
the table owner with the triggers disabled) shows up as the first entry that does not check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from pluginmon.registry.actor import Actor
from pluginmon.storage.queries import where_given

GENESIS_HASH = bytes(32)
HASH_VERSION = b"pluginmon-audit-v1;"
# Entries that belong to no tenant: changes to operator tokens themselves. An operator acting
# on a tenant's object writes to that tenant's chain, marked with OPERATOR_MARK. Tenant slugs
# start with a letter or digit, so this never collides with one.
SYSTEM_TENANT = "_system"
# In ``details`` of an entry written by an operator (cross-tenant) token: hashed with the rest.
OPERATOR_MARK = "actor_operator"
REDACTED = "***"

# Keys whose values never reach an audit entry (config secrets, tokens, credentials).
_SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|token|credential|private[_-]?key|api[_-]?key)", re.IGNORECASE
)

# The columns of the canonical encoding, in order, as text (mirrors pluginmon_audit_entry_hash).
_CANONICAL_SELECT = """
    lane::text AS c_lane, seq::text AS c_seq, id::text AS c_id, tenant_id AS c_tenant_id,
    ((extract(epoch FROM occurred_at) * 1000000)::bigint)::text AS c_occurred_us,
    actor AS c_actor, action AS c_action, entity_type AS c_entity_type,
    entity_id AS c_entity_id, plugin_id::text AS c_plugin_id, plugin_name AS c_plugin_name,
    environment AS c_environment, outcome AS c_outcome, request_id AS c_request_id,
    source_address AS c_source_address, details::text AS c_details,
    before_state::text AS c_before_state, after_state::text AS c_after_state
"""
_CANONICAL_COLUMNS = (
    "c_lane",
    "c_seq",
    "c_id",
    "c_tenant_id",
    "c_occurred_us",
    "c_actor",
    "c_action",
    "c_entity_type",
    "c_entity_id",
    "c_plugin_id",
    "c_plugin_name",
    "c_environment",
    "c_outcome",
    "c_request_id",
    "c_source_address",
    "c_details",
    "c_before_state",
    "c_after_state",
)


def redact(value: Any) -> Any:
    """``value`` with every item under a secret-looking key replaced by ``***``."""
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if _SECRET_KEY_RE.search(str(k)) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _field(value: str | None) -> bytes:
    if value is None:
        return b"N;"
    encoded = value.encode("utf-8")
    return str(len(encoded)).encode("ascii") + b":" + encoded + b";"


def entry_hash(canonical: Sequence[str | None], prev_hash: bytes) -> bytes:
    """SHA-256 of one entry: its canonical columns (as text, in order) and the previous hash."""
    parts = [HASH_VERSION, *(_field(v) for v in canonical), _field(prev_hash.hex())]
    return hashlib.sha256(b"".join(parts)).digest()


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(redact(value), sort_keys=True, default=str)


_AUDIT_INSERT = """INSERT INTO audit_log (tenant_id, occurred_at, actor, action, entity_type,
                                  entity_id, plugin_id, plugin_name, environment, outcome,
                                  request_id, source_address, details, before_state,
                                  after_state)
           VALUES ({p[0]}, {p[1]}, {p[2]}, {p[3]}, {p[4]}, {p[5]}, {p[6]}, {p[7]}, {p[8]},
                   {p[9]}, {p[10]}, {p[11]}, coalesce({p[12]}::jsonb, '{{}}'::jsonb),
                   {p[13]}::jsonb, {p[14]}::jsonb)
           RETURNING seq"""


@dataclass(frozen=True, slots=True)
class Write:
    """A data-modifying statement (``$1``... parameters, no RETURNING) that :func:`append`
    runs in the same statement as the entry, so a write and its audit entry cost one round
    trip. It runs as a WITH clause, which PostgreSQL executes exactly once and to
    completion, whether or not anything reads its output (the entry reads nothing of it)."""

    sql: str
    args: tuple[Any, ...] = ()


@functools.lru_cache(maxsize=256)
def _append_sql(write_sql: str | None, write_args: int) -> str:
    # The entry's parameters follow the write's: $k+1...
    params = [f"${write_args + i}" for i in range(1, 16)]
    insert = _AUDIT_INSERT.format(p=params)
    if write_sql is None:
        return insert
    # Both as WITH clauses under a SELECT: Citus refuses an INSERT into the coordinator's
    # audit_log under a WITH that writes a distributed table, and plans this form (each
    # clause on its own); PostgreSQL runs both either way.
    return f"WITH write AS ({write_sql}),\nentry AS ({insert})\nSELECT seq FROM entry"


async def append(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    actor: Actor,
    action: str,
    entity_type: str,
    occurred_at: datetime,
    entity_id: str | None = None,
    plugin_id: int | None = None,
    plugin_name: str | None = None,
    environment: str | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
    outcome: str = "success",
    write: Write | None = None,
) -> int:
    """Append one entry in the caller's transaction; returns its position in the chain.

    Call it last in a transaction: the chain head of the tenant stays locked until commit.
    ``tenant_id`` is the tenant whose object changed, whoever acts; an operator actor is
    marked in ``details`` (OPERATOR_MARK), so the tenant's trail shows who came from outside.
    ``write``: the change the entry records, made in the same statement (see :class:`Write`).
    """
    if actor.operator:
        details = {**(details or {}), OPERATOR_MARK: True}
    write_args = () if write is None else write.args
    seq = await conn.fetchval(
        _append_sql(None if write is None else write.sql, len(write_args)),
        *write_args,
        tenant_id,
        occurred_at,
        actor.name,
        action,
        entity_type,
        entity_id,
        plugin_id,
        plugin_name,
        environment,
        outcome,
        actor.request_id,
        actor.source_address,
        _json(details),
        _json(before),
        _json(after),
    )
    return int(seq)


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    lane: int
    seq: int
    tenant_id: str
    occurred_at: datetime
    actor: str
    action: str
    entity_type: str
    entity_id: str | None
    plugin_name: str | None
    environment: str | None
    outcome: str
    request_id: str | None
    source_address: str | None
    before: Any
    after: Any
    details: Any

    @property
    def actor_operator(self) -> bool:
        """Written by an operator (cross-tenant) token."""
        return isinstance(self.details, dict) and self.details.get(OPERATOR_MARK) is True

    @property
    def target(self) -> str:
        return self.entity_type + ("" if self.entity_id is None else "/" + self.entity_id)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    actor: str | None = None
    action: str | None = None
    # "plugin" (every plugin) or "plugin/resizer" (that one)
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # entries older than this id (paging backwards from the newest)
    before_id: int | None = None
    limit: int = 100


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_QUERY_SELECT = """
SELECT id, lane, seq, tenant_id, occurred_at, actor, action, entity_type, entity_id, plugin_name,
       environment, outcome, request_id, source_address, details::text AS details,
       before_state::text AS before_state, after_state::text AS after_state
  FROM audit_log"""


async def query(conn: asyncpg.Connection, filters: AuditQuery) -> list[AuditEntry]:
    """Entries visible to the connection's tenant, newest first."""
    entity_type: str | None = None
    entity_id: str | None = None
    if filters.target is not None:
        entity_type, sep, rest = filters.target.partition("/")
        entity_id = rest if sep else None
    # Only the filters given (storage.queries.where_given): under a generic plan, "($3 IS
    # NULL OR entity_type = $3)" read a tenant's whole log backwards for one target's entries
    # instead of idx_audit_log_target's few (sql/127).
    where, args = where_given(
        (
            ("actor = {}", filters.actor),
            ("action = {}", filters.action),
            ("entity_type = {}", entity_type),
            ("entity_id = {}", entity_id),
            ("occurred_at >= {}", filters.since),
            ("occurred_at < {}", filters.until),
            ("id < {}", filters.before_id),
        ),
        args=[filters.limit],
    )
    rows = await conn.fetch(_QUERY_SELECT + f"{where} ORDER BY id DESC LIMIT $1", *args)
    return [
        AuditEntry(
            id=r["id"],
            lane=r["lane"],
            seq=r["seq"],
            tenant_id=r["tenant_id"],
            occurred_at=r["occurred_at"],
            actor=r["actor"],
            action=r["action"],
            entity_type=r["entity_type"],
            entity_id=r["entity_id"],
            plugin_name=r["plugin_name"],
            environment=r["environment"],
            outcome=r["outcome"],
            request_id=r["request_id"],
            source_address=r["source_address"],
            before=_loads(r["before_state"]),
            after=_loads(r["after_state"]),
            details=_loads(r["details"]),
        )
        for r in rows
    ]


# --- verifying ---------------------------------------------------------------------------------


class Breach(StrEnum):
    CHANGED = "changed"  # the entry's content no longer matches its hash
    REMOVED = "removed"  # an entry (or the tail) is missing from the sequence
    REORDERED = "reordered"  # the entry does not link to the one before it
    NO_HEAD = "no_head"  # entries without a chain head (the head table was emptied)


@dataclass(frozen=True, slots=True)
class ChainProblem:
    kind: Breach
    lane: int
    seq: int
    entry_id: int | None
    message: str


@dataclass(frozen=True, slots=True)
class LaneVerdict:
    lane: int
    checked: int
    anchor_seq: int
    head_seq: int
    problem: ChainProblem | None


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    """One tenant: each of its lanes checked from its anchor to its head."""

    tenant_id: str
    lanes: tuple[LaneVerdict, ...]

    @property
    def checked(self) -> int:
        return sum(lane.checked for lane in self.lanes)

    @property
    def problem(self) -> ChainProblem | None:
        return next((lane.problem for lane in self.lanes if lane.problem is not None), None)

    @property
    def intact(self) -> bool:
        return self.problem is None


def _entry(seq: int, entry_id: int | None, lane: int) -> str:
    where = f"entry seq={seq}" + ("" if entry_id is None else f" id={entry_id}")
    return where + ("" if lane == 0 else f" in lane {lane}")


async def _chain_tenants(conn: asyncpg.Connection, tenant_id: str | None) -> list[str]:
    if tenant_id is not None:
        return [tenant_id]
    rows = await conn.fetch(
        """SELECT tenant_id FROM audit_chain
           UNION SELECT DISTINCT tenant_id FROM audit_log
           ORDER BY 1"""
    )
    return [r["tenant_id"] for r in rows]


async def _verify_lane(
    conn: asyncpg.Connection, tenant_id: str, lane: int, head: asyncpg.Record | None
) -> LaneVerdict:
    anchor_seq = 0 if head is None else int(head["anchor_seq"])
    head_seq = 0 if head is None else int(head["head_seq"])
    previous = GENESIS_HASH if head is None else bytes(head["anchor_hash"])
    expected = anchor_seq + 1
    checked = 0

    def verdict(kind: Breach, seq: int, entry_id: int | None, message: str) -> LaneVerdict:
        problem = ChainProblem(kind, lane, seq, entry_id, message)
        return LaneVerdict(lane, checked, anchor_seq, head_seq, problem)

    last_id: int | None = None
    cursor = conn.cursor(
        f"SELECT {_CANONICAL_SELECT}, id, seq, prev_hash, entry_hash"  # noqa: S608 - constant
        " FROM audit_log WHERE tenant_id = $1 AND lane = $2 ORDER BY seq, id",
        tenant_id,
        lane,
        prefetch=1000,
    )
    async for row in cursor:
        seq = int(row["seq"])
        entry_id = int(row["id"])
        if head is None:
            message = (
                f"{_entry(seq, entry_id, lane)} exists but its chain has no head "
                "(audit_chain row removed)"
            )
            return verdict(Breach.NO_HEAD, seq, entry_id, message)
        if seq != expected:
            if seq > expected:
                message = (
                    f"{_entry(expected, None, lane)} is missing (removed); the next entry "
                    f"present is seq={seq} id={entry_id}"
                )
                return verdict(Breach.REMOVED, expected, None, message)
            message = f"{_entry(seq, entry_id, lane)} is out of sequence (expected seq={expected})"
            return verdict(Breach.REORDERED, seq, entry_id, message)
        if bytes(row["prev_hash"]) != previous:
            message = (
                f"{_entry(seq, entry_id, lane)} does not follow entry seq={seq - 1}: "
                "reordered, or the entry before it was replaced"
            )
            return verdict(Breach.REORDERED, seq, entry_id, message)
        computed = entry_hash([row[c] for c in _CANONICAL_COLUMNS], previous)
        if computed != bytes(row["entry_hash"]):
            message = (
                f"{_entry(seq, entry_id, lane)} was changed: its content does not match its hash"
            )
            return verdict(Breach.CHANGED, seq, entry_id, message)
        previous = computed
        expected += 1
        checked += 1
        last_id = entry_id
    last_seq = expected - 1
    if head is not None and last_seq != head_seq:
        message = (
            f"entries seq={last_seq + 1}..{head_seq}{'' if lane == 0 else f' in lane {lane}'} "
            f"are missing (removed): the chain head is seq={head_seq} but the last entry "
            f"present is seq={last_seq}"
        )
        return verdict(Breach.REMOVED, last_seq + 1, None, message)
    if head is not None and checked and previous != bytes(head["head_hash"]):
        message = f"{_entry(last_seq, last_id, lane)} does not match the chain head's hash"
        return verdict(Breach.CHANGED, last_seq, last_id, message)
    return LaneVerdict(lane, checked, anchor_seq, head_seq, None)


async def _verify_tenant(conn: asyncpg.Connection, tenant_id: str) -> ChainVerdict:
    heads = {
        int(r["lane"]): r
        for r in await conn.fetch(
            """SELECT lane, head_seq, head_hash, anchor_seq, anchor_hash FROM audit_chain
                WHERE tenant_id = $1""",
            tenant_id,
        )
    }
    present = {
        int(r["lane"])
        for r in await conn.fetch(
            "SELECT DISTINCT lane FROM audit_log WHERE tenant_id = $1", tenant_id
        )
    }
    # Lanes never written to (head 0, no rows) are not chains yet.
    used = {lane for lane, head in heads.items() if head["head_seq"] > 0}
    lanes = [
        await _verify_lane(conn, tenant_id, lane, heads.get(lane))
        for lane in sorted(used | present)
    ]
    return ChainVerdict(tenant_id, tuple(lanes))


async def verify(conn: asyncpg.Connection, *, tenant_id: str | None = None) -> list[ChainVerdict]:
    """Check every tenant's chains (or one tenant's), each from its anchor to its head.

    Runs in one repeatable-read, read-only transaction, so entries appended meanwhile do not
    make the heads and the rows disagree. Needs a role that sees every row (the owner).
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return [await _verify_tenant(conn, t) for t in await _chain_tenants(conn, tenant_id)]
