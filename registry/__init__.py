"""The plugin-management domain: tokens, catalogue, operations, approvals, alert actions, audit."""
