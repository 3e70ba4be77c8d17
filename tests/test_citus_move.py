"""Moving to Citus and growing it, on a real local cluster: a PostgreSQL-backend database that
becomes a Citus database with its data (docs/scaling.md, "Moving a running installation"),
and a worker added to a running cluster that takes shards after a rebalance.

Skipped, with the reason, when no Citus build is found on the machine (tests/citus_cluster.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from pluginmon.registry import audit
from pluginmon.registry.tokens import Role
from pluginmon.storage.migrate import Backend, migrate
from tests.api_helpers import api_server
from tests.citus_cluster import CitusCluster, running_cluster
from tests.dbutil import drop_on_server, with_database
from tests.writer_helpers import copy_samples, create_plugins, sample_row


@pytest.fixture(scope="module")
def cluster() -> Iterator[CitusCluster]:
    with running_cluster("pluginmon-test-citus-move-") as started:
        yield started


def _tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def _audit_verdicts(url: str) -> dict[str, tuple[int, object]]:
    conn = await asyncpg.connect(url)
    try:
        verdicts = await audit.verify(conn)
    finally:
        await conn.close()
    return {v.tenant_id: (v.checked, v.problem) for v in verdicts}


def _counts(url: str, tenants: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per tenant: plugins, samples, operations (as the owner, who sees every row)."""
    counts = {}
    with psycopg.connect(url) as conn:
        for tenant in tenants:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM plugins WHERE tenant_id = %(t)s),"
                " (SELECT count(*) FROM plugin_samples WHERE tenant_id = %(t)s),"
                " (SELECT count(*) FROM plugin_operations WHERE tenant_id = %(t)s)",
                {"t": tenant},
            ).fetchone()
            assert row is not None
            counts[tenant] = (int(str(row[0])), int(str(row[1])), int(str(row[2])))
    return counts


def _plugin_ids(url: str, tenant: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id FROM plugins WHERE tenant_id = %s ORDER BY name", (tenant,)
        ).fetchall()
    return [int(str(row[0])) for row in rows]


def _distribution(url: str, tables: tuple[str, ...]) -> dict[str, str]:
    """Each table's Citus kind: 'h' distributed (hash), 'n' reference, absent: local."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT logicalrelid::regclass::text, partmethod FROM pg_dist_partition"
            " WHERE logicalrelid::regclass::text = ANY(%s)",
            (list(tables),),
        ).fetchall()
    return {str(table): str(kind) for table, kind in rows}


async def _write_through_api(url: str, tenants: list[str]) -> None:
    """Each tenant's writer registers two plugins and records an operation on one: audited
    writes, so each tenant's chain has entries to verify after the move."""
    async with api_server(url) as api:
        for tenant in tenants:
            await api.token(f"w-{tenant}", tenant=tenant, role=Role.WRITER)
            for name in ("api-a", f"only-{tenant}"):
                reply = await api.call(
                    "POST", "/api/v1/plugins", token=f"w-{tenant}", body={"name": name}
                )
                assert reply.status == 201, reply.body
            reply = await api.call(
                "POST",
                "/api/v1/plugins/api-a/operations",
                token=f"w-{tenant}",
                body={"type": "configure", "environment": "production"},
            )
            assert reply.status == 201, reply.body


async def _read_through_api(url: str, tenants: list[str]) -> dict[str, list[str]]:
    """What each tenant's writer token lists (the tokens survived the move)."""
    seen = {}
    async with api_server(url) as api:
        for tenant in tenants:
            await api.token(f"w2-{tenant}", tenant=tenant, role=Role.WRITER)
            reply = await api.call("GET", "/api/v1/plugins?limit=100", token=f"w2-{tenant}")
            assert reply.status == 200, reply.body
            seen[tenant] = sorted(p["name"] for p in reply.body["items"])
            # Another tenant's plugin by name: not found (row-level security on the shards).
            other = next(t for t in tenants if t != tenant)
            hidden = await api.call("GET", f"/api/v1/plugins/only-{other}", token=f"w2-{tenant}")
            assert hidden.status == 404, hidden.body
    return seen


def test_a_postgres_backend_database_becomes_a_citus_database_with_its_data(
    cluster: CitusCluster,
) -> None:
    name = cluster.create_plain_database(prefix="conv")
    url = with_database(cluster.url(), name)
    tenants = [_tenant(), _tenant()]
    try:
        before = migrate(url)
        assert before.backend is Backend.POSTGRES
        for tenant in tenants:
            plugin_ids = asyncio.run(create_plugins(url, tenant=tenant, count=3))
            rows = [sample_row(n, plugin_ids, tenant=tenant) for n in range(300)]
            asyncio.run(copy_samples(url, rows))
        asyncio.run(_write_through_api(url, tenants))
        counts_before = _counts(url, tenants)
        chains_before = asyncio.run(_audit_verdicts(url))
        assert counts_before == {t: (5, 300, 1) for t in tenants}
        assert all(chains_before[t][0] >= 3 and chains_before[t][1] is None for t in tenants)

        # The operator's part (docs/scaling.md): the citus extension on every node, the
        # workers added; then `pluginmon migrate` with backend = "citus".
        cluster.enable_citus(name)
        after = migrate(url, backend=Backend.CITUS)
        assert after.backend is Backend.CITUS
        assert {100, 101, 102, 103} <= {int(f[:3]) for f in after.applied}, after.applied
        # 128's BRIN indexes became B-trees (columnar partitions keep no BRIN).
        with psycopg.connect(url) as conn:
            time_indexes = conn.execute(
                "SELECT tablename, indexdef LIKE '%USING btree (\"timestamp\")' FROM pg_indexes"
                " WHERE indexname IN ('idx_plugin_samples_time', 'idx_plugin_metrics_time')"
                " ORDER BY 1"
            ).fetchall()
        assert time_indexes == [("plugin_metrics", True), ("plugin_samples", True)]

        kinds = _distribution(url, ("tenants", "plugins", "plugin_samples", "plugin_operations"))
        assert kinds == {
            "tenants": "n",
            "plugins": "h",
            "plugin_samples": "h",
            "plugin_operations": "h",
        }
        assert _counts(url, tenants) == counts_before
        # The hash chains came across whole: same entries, still intact.
        assert asyncio.run(_audit_verdicts(url)) == chains_before
        # The API reads each tenant's own rows on Citus, and new samples go in through a worker.
        seen = asyncio.run(_read_through_api(url, tenants))
        assert seen == {
            t: sorted(["api-a", f"only-{t}", *(f"plugin-{n:05d}" for n in (1, 2, 3))])
            for t in tenants
        }
        ids = _plugin_ids(url, tenants[0])
        worker = with_database(cluster.url(node=cluster.workers[0]), name)
        asyncio.run(
            copy_samples(worker, [sample_row(n, ids, tenant=tenants[0]) for n in range(1000, 1050)])
        )
        assert _counts(url, tenants)[tenants[0]] == (5, 350, 1)
        again = migrate(url)
        assert (again.backend, again.applied) == (Backend.CITUS, ())
    finally:
        for node in cluster.nodes:
            drop_on_server(cluster.url(node=node), name)


def test_a_worker_added_later_takes_shards_after_a_rebalance(cluster: CitusCluster) -> None:
    with cluster.database(prefix="grow") as url:
        migrate(url)
        tenants = [_tenant() for _ in range(6)]
        for tenant in tenants:
            plugin_ids = asyncio.run(create_plugins(url, tenant=tenant, count=2))
            asyncio.run(
                copy_samples(url, [sample_row(n, plugin_ids, tenant=tenant) for n in range(100)])
            )
        asyncio.run(_write_through_api(url, tenants[:2]))
        counts_before = _counts(url, tenants)
        name = url.rsplit("/", 1)[1]
        new_worker = cluster.start_node("worker-new")
        try:
            cluster.create_on(new_worker, name)
            cluster.enable_citus(name, workers=[new_worker])
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
                conn.execute("SELECT citus_rebalance_wait()")
                moved = conn.execute(
                    "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_node n"
                    " ON n.groupid = p.groupid WHERE n.nodeport = %s",
                    (new_worker.port,),
                ).fetchone()
            assert moved is not None
            assert int(str(moved[0])) > 0
            assert _counts(url, tenants) == counts_before
            # Reads under row-level security and COPY through the new worker still work.
            seen = asyncio.run(_read_through_api(url, tenants[:2]))
            assert seen == {
                t: sorted(["api-a", f"only-{t}", "plugin-00001", "plugin-00002"])
                for t in tenants[:2]
            }
            ids = _plugin_ids(url, tenants[0])
            asyncio.run(
                copy_samples(
                    with_database(cluster.url(node=new_worker), name),
                    [sample_row(n, ids, tenant=tenants[0]) for n in range(1000, 1040)],
                )
            )
            assert _counts(url, tenants)[tenants[0]] == (4, 140, 1)
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "SELECT citus_drain_node('127.0.0.1', %s, shard_transfer_mode => 'block_writes')",
                    (new_worker.port,),
                )
                conn.execute("SELECT citus_remove_node('127.0.0.1', %s)", (new_worker.port,))
            new_worker.stop(mode="immediate")
            new_worker.remove()
