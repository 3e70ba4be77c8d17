"""Process lifecycle: config, CLI, wiring, scheduler jobs, HTTP endpoints, shutdown."""
