"""Semantic-cache quality: labelled pairs and their evaluation harness.

Run with ``python -m benchmarks semantic``; see ``README.md`` in this folder.
"""
