"""Examples a reference worker can run (see docs/workflows.md)."""
