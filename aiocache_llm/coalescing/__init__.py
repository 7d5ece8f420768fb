"""Layer 2: single-flight coalescing, in one process and across a fleet."""
