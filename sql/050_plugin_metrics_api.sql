-- 050 plugin metrics through the management API: reads of a plugin's own series and pushes
-- from batch jobs, both under the token's tenant (pluginmon.tenant_id, set per request).
--
-- Reads go through pluginmon_tenant.plugin_metrics (003), the tenant-checked view that exists
-- on both backends (TimescaleDB refuses row-level security on the compressed hypertable).
-- Writes go through pluginmon_api_push_metrics(), a SECURITY DEFINER function: the API role
-- gets no privilege on plugin_metrics itself, the function stamps the rows with the session's
-- tenant (pluginmon_current_tenant(), never a caller's value) and refuses a plugin id of
-- another tenant. Same code on both backends, one INSERT ... SELECT FROM unnest per push.

GRANT USAGE ON SCHEMA pluginmon_tenant TO pluginmon_api;
GRANT SELECT ON pluginmon_tenant.plugin_metrics TO pluginmon_api;

CREATE FUNCTION pluginmon_api_push_metrics(push_plugin_id bigint, push_environment text,
                                           pushed_at timestamptz, metric_names text[],
                                           metric_kinds text[], metric_values double precision[],
                                           metric_labels jsonb[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    tenant text := pluginmon_current_tenant();
    stored bigint;
BEGIN
    IF tenant IS NULL THEN
        RAISE EXCEPTION 'no tenant set for this session' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM plugins p WHERE p.id = push_plugin_id AND p.tenant_id = tenant) THEN
        RAISE EXCEPTION 'plugin % is not one of this tenant''s', push_plugin_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF cardinality(metric_names) <> cardinality(metric_kinds)
       OR cardinality(metric_names) <> cardinality(metric_values)
       OR cardinality(metric_names) <> cardinality(metric_labels) THEN
        RAISE EXCEPTION 'metric arrays differ in length' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, metric_name,
                                metric_kind, value, labels)
    SELECT pushed_at, tenant, push_plugin_id, push_environment, m.name, m.kind, m.value, m.labels
      FROM unnest(metric_names, metric_kinds, metric_values, metric_labels)
           AS m(name, kind, value, labels);
    GET DIAGNOSTICS stored = ROW_COUNT;
    RETURN stored;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION pluginmon_api_push_metrics(bigint, text, timestamptz, text[], '
                   'text[], double precision[], jsonb[]) SET search_path = pg_catalog, %I',
                   current_schema());
END
$$;

REVOKE ALL ON FUNCTION pluginmon_api_push_metrics(bigint, text, timestamptz, text[], text[],
                                                  double precision[], jsonb[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pluginmon_api_push_metrics(bigint, text, timestamptz, text[], text[],
                                                     double precision[], jsonb[]) TO pluginmon_api;
