"""Layer 1 implementations: ``memory`` (one process) and ``redis`` (a fleet)."""
