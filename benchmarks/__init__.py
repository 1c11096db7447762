"""guide-fast benchmarks: one script per measured thing, one runner (python -m benchmarks)."""
