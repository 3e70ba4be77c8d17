-- 075 dependencies: what the dependency evaluation (registry/dependencies.py) computes, per
-- environment. plugin_dependencies (001) holds one row per declared edge; whether an edge is
-- satisfied depends on where its dependent runs (2.0 of the dependency in staging, 1.4 in
-- production), so the per-environment result has its own table, and the edge's own
-- satisfied/conflict/conflict_reason/resolved_version columns summarise it: satisfied in every
-- environment where the dependent is deployed; conflict in any; the first problem's reason.
--
-- in_cycle: the edge is on a cycle of runtime dependencies in some environment. Alert
-- inhibition follows runtime edges that are not (storage/alert_inputs.py): along a cycle,
-- two plugins that are both down would otherwise silence each other.

ALTER TABLE plugin_dependencies
    ADD COLUMN in_cycle boolean NOT NULL DEFAULT false,
    -- Target of the composite foreign key below (keeps a state in its edge's tenant).
    ADD CONSTRAINT plugin_dependencies_id_tenant_key UNIQUE (id, tenant_id);

CREATE TABLE plugin_dependency_states (
    tenant_id         text        NOT NULL,
    dependency_id     bigint      NOT NULL,
    environment       text        NOT NULL,
    satisfied         boolean     NOT NULL,
    conflict          boolean     NOT NULL,
    problem           text        CONSTRAINT plugin_dependency_states_problem_check CHECK (problem IN (
                                      'not_deployed', 'not_installed', 'disabled', 'no_version',
                                      'out_of_range', 'invalid_range', 'conflict', 'cycle')),
    -- One line in the manner of npm's ERESOLVE report: who wants what, what is installed.
    reason            text        NOT NULL,
    installed_version text,
    -- When this result last changed (an unchanged result is not rewritten).
    changed_at        timestamptz NOT NULL,
    CONSTRAINT plugin_dependency_states_pkey PRIMARY KEY (dependency_id, environment),
    CONSTRAINT plugin_dependency_states_conflict_unsatisfied CHECK (NOT (conflict AND satisfied)),
    CONSTRAINT plugin_dependency_states_problem_iff_unsatisfied CHECK ((problem IS NULL) = satisfied),
    -- CASCADE: a result means nothing without its edge.
    CONSTRAINT plugin_dependency_states_dependency_fkey FOREIGN KEY (dependency_id, tenant_id)
        REFERENCES plugin_dependencies (id, tenant_id) ON DELETE CASCADE
);

-- Partial, like 001's on plugin_dependencies: the problems of a tenant in an environment
-- (`pluginmon deps check`, GET /dependencies/problems).
CREATE INDEX idx_plugin_dependency_states_problems
    ON plugin_dependency_states (tenant_id, environment)
    WHERE NOT satisfied;

SELECT pluginmon_enable_tenant_rls('plugin_dependency_states');

-- The API declares edges and recomputes its tenant's results in the request's transaction.
GRANT SELECT, INSERT, UPDATE, DELETE ON plugin_dependencies, plugin_dependency_states TO pluginmon_api;
