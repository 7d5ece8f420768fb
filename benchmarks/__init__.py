"""Side-by-side benchmarks against the libraries people use today: ``python -m benchmarks``."""
