"""In-memory backends: one process, no server."""
