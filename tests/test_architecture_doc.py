"""ARCHITECTURE.md matches the tree: every module and package of guide_fast (and kernels/) is named
on the page, and every `guide_fast/...` path the page names exists (issue 11: done when
ARCHITECTURE.md matches the tree)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "ARCHITECTURE.md").read_text()


def _modules():
    for path in sorted((ROOT / "guide_fast").rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        yield path


def test_every_module_is_named():
    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if f"`{p.stem}`" not in PAGE and f"{p.stem}.py" not in PAGE and f"/{p.stem}" not in PAGE]
    assert not missing, f"modules not described in ARCHITECTURE.md: {missing}"


def test_every_package_has_a_row():
    packages = [p.parent.name for p in (ROOT / "guide_fast").rglob("__init__.py") if p.parent != ROOT / "guide_fast"]
    missing = [name for name in packages if f"guide_fast/{name}/" not in PAGE]
    assert not missing, f"packages without a row in ARCHITECTURE.md: {missing}"


def test_named_paths_exist():
    named = set(re.findall(r"`(guide_fast/[\w/]+(?:\.py)?)`", PAGE))
    assert named, "the page names no guide_fast paths (the check itself is broken)"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"
