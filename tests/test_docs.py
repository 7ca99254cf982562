"""docs/FLORA.md is what the code cites: every citation must name a section that exists."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CITING = ("flora_ext", "csrc", "tests", "examples", "benchmarks", "tools")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".md"}


def _headings():
    text = (ROOT / "docs" / "FLORA.md").read_text()
    return re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)


def _citations():
    files = [f for d in CITING for f in (ROOT / d).rglob("*") if f.suffix in SUFFIXES]
    files += [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    found = []
    for f in files:
        text = f.read_text(errors="replace")
        for match in re.finditer(r"FLORA\.md,? (§[0-9.]+(?:, §[0-9.]+)*|\"[^\"]+\")", text):
            found.append((f.relative_to(ROOT), match.group(1)))
    return found


def test_code_cites_sections_that_exist():
    headings = _headings()
    numbers = {h.split()[0] for h in headings if h.startswith("§")}
    citations = _citations()
    assert any(str(where).startswith("flora_ext") for where, _ in citations)
    for where, cited in citations:
        if cited.startswith('"'):
            assert any(cited.strip('"') in h for h in headings), (where, cited)
        else:
            for number in re.findall(r"§[0-9]+(?:\.[0-9]+)*", cited):
                assert number in numbers, (where, cited)


def test_many_processes_section_covers_the_distributed_code():
    headings = _headings()
    for number in ("§10", "§10.1", "§10.2", "§10.3", "§10.4"):
        assert any(h.startswith(number + " ") for h in headings), number
