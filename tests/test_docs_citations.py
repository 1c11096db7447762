"""Every spec citation in the repository resolves to a page of docs/ and to a numbered heading
on that page (docs/README.md describes the scheme).

A citation is a page followed by a section: `docs/eg3d.md §4.7`, `docs/guide.md §3.5(a)`,
`docs/face_models.md §1-2`, `docs/eg3d.md Appendix A` (outside docs/ the page is always written
with its `docs/` prefix). A bare `§N` (a list such as `§1.1, §2.1`, or a
later reference in the same file) belongs to the nearest page named before it in the file
(the first one after it when none comes before); inside a docs page, a bare `§N` that does not
continue a list after another page's name refers to that page itself. Citations of the old
spec locations outside the repository are refused, and so are citations by section title.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

from reference_data import SHARED

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCAN_DIRS = ("guide_fast", "kernels", "benchmarks", "profiling", "tests", "docs")
SCAN_FILES = ("README.md", "ARCHITECTURE.md", "Makefile", "setup.py")
SUFFIXES = {".py", ".sh", ".md"}
THIS_FILE = Path(__file__).resolve()

# Page names that are spec pages even without a docs/ prefix (the old spec set and ours).
SPEC_NAMES = {"guide", "eg3d", "face_models", "performance", "formats", "environment", "goae",
              "architecture", "style"}
NUM = r"\d+(?:\.\d+)*"          # 4, 4.1, 4.1.2 -- a sentence-ending dot is not part of it
PAGE_RE = re.compile(
    r"(?P<prefix>(?:\.\./)*(?:[\w-]+/)*)(?P<page>[A-Za-z_][\w-]*)\.md\b"
    r"(?:[ \t]*\(?[ \t]*(?:Appendix|App\.)[ \t]*(?P<appendix>[A-Z])\b)?"
    r"(?P<title>[ \t]+[\"“][^\"”\n]{3,80}[\"”])?"
)
SECTION_RE = re.compile(rf"§[ \t]*(?P<num>{NUM})(?:[ \t]*[-–][ \t]*§?[ \t]*(?P<end>{NUM}))?")
HEADING_RE = re.compile(rf"^#{{2,6}}[ \t]+(?:§[ \t]*(?P<num>{NUM})|Appendix[ \t]+(?P<appendix>[A-Z]))\b", re.M)
ISSUE_RE = re.compile(r"\bissues?[ \t]+#?\d+[ \t,]*$")
# between two citations of one list: separators only (", §2.1", " and §4.3", "(a)/§7")
LIST_GAP_RE = re.compile(r"^(?:[\s,;/&+]|and|or|\([a-z]\)|step \d+)*$")
# the spec folders outside the repository, which a clone does not have
FORBIDDEN_RE = re.compile(r"\.\./shared\b|\bshared/(?:specs|reference)/[\w-]+\.md|(?<![\w/])specs/")


def scanned_files() -> list[Path]:
    files = [ROOT / f for f in SCAN_FILES if (ROOT / f).is_file()]
    for d in SCAN_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and p.resolve() != THIS_FILE and "__pycache__" not in p.parts:
                files.append(p)
    return files


@lru_cache(maxsize=None)
def doc_sections(page: str) -> frozenset[str] | None:
    """Numbers ('4.7') and appendices ('Appendix A') with a heading on docs/<page>.md, None if no page."""
    path = DOCS / f"{page}.md"
    if not path.is_file():
        return None
    out = set()
    for m in HEADING_RE.finditer(path.read_text(encoding="utf-8")):
        out.add(m["num"] if m["num"] else f"Appendix {m['appendix']}")
    return frozenset(out)


def _is_spec_page(m: re.Match) -> bool:
    prefix = m["prefix"]
    return m["page"] in SPEC_NAMES or bool(re.search(r"(?:^|/)(?:docs|specs|reference|shared)/$", prefix))


def citations(path: Path, text: str):
    """(line, cited text, page, section or None, problem or None) for every citation in text."""
    in_docs = path.parent == DOCS
    own_page = path.stem if in_docs and doc_sections(path.stem) else None

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pages = [m for m in PAGE_RE.finditer(text) if _is_spec_page(m)]
    for m in pages:
        cited = m.group(0).strip()
        if m["title"]:
            yield line_of(m.start()), cited, m["page"], None, "cites a section by its title: cite its § number"
        elif m["appendix"]:
            yield line_of(m.start()), cited, m["page"], f"Appendix {m['appendix']}", None
        else:
            yield line_of(m.start()), cited, m["page"], None, None
        if "docs/" not in m["prefix"] and m["prefix"]:
            yield line_of(m.start()), cited, m["page"], None, "cites a spec outside the repository: cite docs/<page>.md"
        elif not m["prefix"] and not in_docs:
            yield line_of(m.start()), cited, m["page"], None, f"write the page as docs/{m['page']}.md"

    last_end, last_page = None, None
    for s in SECTION_RE.finditer(text):
        if own_page and text[text.rfind("\n", 0, s.start()) + 1:].startswith("#"):
            continue  # a docs page's own heading
        if ISSUE_RE.search(text, max(0, s.start() - 20), s.start()):
            continue  # "issue 13 §6": an item of an issue's text, not a docs section
        before = [m for m in pages if m.end() <= s.start()]
        nearest = before[-1] if before else None
        adjacent = nearest is not None and re.fullmatch(r"[ \t]*\(?[ \t]*", text[nearest.end():s.start()])
        continues = last_end is not None and LIST_GAP_RE.match(text[last_end:s.start()])
        if adjacent:
            page = nearest["page"]
        elif continues:
            page = last_page
        elif own_page:
            page = own_page
        elif nearest is not None:
            page = nearest["page"]
        elif pages:
            page = pages[0]["page"]
        else:
            yield line_of(s.start()), s.group(0), None, s["num"], "a bare § citation in a file that names no docs page"
            last_end, last_page = s.end(), None
            continue
        for num in filter(None, (s["num"], s["end"])):
            yield line_of(s.start()), s.group(0), page, num, None
        last_end, last_page = s.end(), page


def check_text(path: Path, text: str) -> list[str]:
    """'file:line: citation: what is wrong' for every citation in text that does not resolve."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    for m in FORBIDDEN_RE.finditer(text):
        out.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}: a path outside the "
                   "repository; cite docs/<page>.md instead")
    for line, cited, page, section, problem in citations(path, text):
        where = f"{rel}:{line}: {cited!r}"
        if problem:
            out.append(f"{where}: {problem}")
            continue
        known = doc_sections(page)
        if known is None:
            out.append(f"{where}: no page docs/{page}.md")
        elif section is not None and section not in known:
            shown = section if section.startswith("Appendix") else "§" + section
            out.append(f"{where}: docs/{page}.md has no heading {shown}")
    return out


def problems() -> list[str]:
    out = []
    for path in scanned_files():
        out += check_text(path, path.read_text(encoding="utf-8", errors="replace"))
    return out


def test_every_citation_resolves_to_a_docs_section():
    found = problems()
    assert not found, f"{len(found)} citation(s) do not resolve to docs/:\n" + "\n".join(found)


def test_the_scan_sees_the_citations():
    # The scan must find the codebase's citations, else the test above passes vacuously.
    total = sum(1 for p in scanned_files() if DOCS not in p.parents
                for c in citations(p, p.read_text(encoding="utf-8", errors="replace")) if c[3] is not None)
    assert total >= 150


@pytest.mark.parametrize("text,expected", [
    ("see docs/eg3d.md §4.1.", [("eg3d", "4.1")]),                            # sentence end
    ("(docs/eg3d.md §7.1-7.2) embed", [("eg3d", "7.1"), ("eg3d", "7.2")]),     # range
    ("docs/guide.md §3.5(a): local", [("guide", "3.5")]),
    ("docs/face_models.md §1.1, §2.1 and later §1.3", [("face_models", "1.1"), ("face_models", "2.1"),
                                                       ("face_models", "1.3")]),
    ("docs/guide.md §3.5/§7; docs/eg3d.md §4.5–4.6",
     [("guide", "3.5"), ("guide", "7"), ("eg3d", "4.5"), ("eg3d", "4.6")]),
    ("names (docs/eg3d.md Appendix A)", [("eg3d", "Appendix A")]),
    ("docs/guide.md §3.4 (issue 13 §6 asks for it)", [("guide", "3.4")]),     # an issue's item
])
def test_citation_forms(text, expected):
    got = [(page, sec) for _, _, page, sec, problem in citations(ROOT / "x.py", text) if sec and not problem]
    assert got == expected
    assert check_text(ROOT / "x.py", text) == []


@pytest.mark.parametrize("text", [
    "spec at ../shared/specs/guide.md §3",
    "from specs/performance.md: targets",
    'see performance.md "The floor" for the numbers',
    "a bare §4.2 with no page at all",
    "docs/guide.md §42.7 does not exist",
    "docs/nonexistent.md §1",
    "eg3d.md §4.7 without the docs/ prefix",
])
def test_bad_citations_are_reported(text):
    assert check_text(ROOT / "x.py", text)


def test_docs_headings_are_numbered_once():
    for path in sorted(DOCS.glob("*.md")):
        if path.name == "README.md":
            continue
        nums = [m["num"] or m["appendix"] for m in HEADING_RE.finditer(path.read_text(encoding="utf-8"))]
        assert nums, f"{path.name} has no numbered headings"
        dupes = sorted({n for n in nums if nums.count(n) > 1})
        assert not dupes, f"{path.name}: headings numbered more than once: {dupes}"


SPEC_SOURCES = {"guide": SHARED.parent / "specs" / "guide.md", "eg3d": SHARED.parent / "specs" / "eg3d.md",
                "face_models": SHARED / "face_models.md"}


@pytest.mark.parametrize("page", sorted(SPEC_SOURCES))
def test_docs_keep_the_numbering_of_the_original_specs(page):
    """Old citations were written against the original specs' numbering; every numbered
    section there has the same number here (checked where the originals are present)."""
    source = SPEC_SOURCES[page]
    if not source.is_file():
        pytest.skip("the original spec pages are not beside this checkout")
    numbers = set(re.findall(rf"^#{{2,4}}[ \t]+({NUM})\.?[ \t]", source.read_text(encoding="utf-8"), re.M))
    missing = sorted(numbers - doc_sections(page), key=lambda n: [int(x) for x in n.split(".")])
    assert not missing, f"docs/{page}.md lacks sections {missing}"
