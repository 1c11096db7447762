"""`python -m benchmarks`: run every benchmark and write the summary (see benchmarks/run.py)."""
import sys

from benchmarks.run import main

sys.exit(main())
