-- 132, PostgreSQL and Citus backends: nothing to do. 129 already left pluginmon's health_score
-- rows out of their rollups' refresh; on TimescaleDB
-- (132_health_rows_out_of_metric_aggregates.timescaledb.sql) this version does the same for
-- the continuous aggregates.
SELECT 1;
