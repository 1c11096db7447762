"""`python -m guide_fast ...` (what `torchrun ... -m guide_fast unlearn ...` runs): the guide-fast command."""
import sys

from .cli import main

sys.exit(main())
