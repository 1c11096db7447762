"""Where the tests find the official reference facts (parameter names and shapes, detector
outputs). Copies travel with the tests in tests/data/; when the shared/ folder sits beside the
repository (as on the development and CI machines) test_reference_data checks the copies
against it."""
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
KEYLISTS = DATA / "keylists"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
