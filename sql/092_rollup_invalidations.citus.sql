-- 092, Citus backend: nothing to change. The PostgreSQL backend's invalidation log needs a
-- statement trigger on plugin_samples and plugin_metrics, and Citus refuses triggers on the
-- distributed tables (100 distributes them); 101 restates the refreshes for Citus as one
-- pushed-down INSERT ... SELECT ... ON CONFLICT per refresh, over the lookback.
SELECT 1;
