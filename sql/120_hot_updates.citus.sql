-- 120 on Citus: left as it is. The common file sets fillfactor 70 on plugins and
-- plugin_environments (room for HOT updates); whether Citus 12 passes a table's storage
-- parameters on to its existing and future shards was not checked, so distributed tables keep
-- theirs.
SELECT 1;
