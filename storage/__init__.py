"""Database access: pool, migrations, backends, batched writer, spool, queries."""
