"""Long-running consumers of the log: workers and the projector."""
