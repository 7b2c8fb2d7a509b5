"""Integrations with training engines (imported on demand; the core does not need them)."""
