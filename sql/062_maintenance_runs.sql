-- 062: when the periodic maintenance last ran, for the whole database.
--
-- Every daemon runs the maintenance job on its interval and takes the advisory lock with a
-- try-lock, so with N daemons the work ran up to N times an interval (once for each daemon
-- whose turn found the lock free). The daemon that holds the lock now reads this row first
-- and skips the run when the last one started less than (most of) an interval ago; otherwise
-- it records its start, runs, and records its end. The row is read and written only under
-- the lock, with the server's clock, so daemons with skewed clocks agree. A run whose daemon
-- died (finished_at not after started_at) does not count: the next daemon runs at once.
CREATE TABLE maintenance_runs (
    job          text        PRIMARY KEY,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    instance     text        NOT NULL DEFAULT ''
);
