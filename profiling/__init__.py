"""Profiling entry points; run them from the repository root as `python -m profiling.<name>`."""
