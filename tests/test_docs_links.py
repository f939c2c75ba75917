"""The docs that the code cites exist: every ``docs/<file>.md#anchor`` named in the package, the kernels,
the benchmarks or the README is a file under ``docs/`` with a heading of that anchor (GitHub's rules),
the links inside ``docs/`` resolve too, and nothing cites the design notes kept outside the repository.
"""

from __future__ import annotations

import pathlib
import re
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where citations of docs/ are looked for.
CITING = ("fastrl", "kernels", "benchmarks", "README.md")
# Where a citation of the notes outside the repository must not appear.
NO_OUTSIDE_NOTES = ("fastrl", "kernels", "tests")
SKIP_DIRS = {"__pycache__", ".git", ".venv"}

# ``docs/losses.md#grpo-family``, ``../docs/design.md``; the path stops at ".md", the anchor at the
# first character that cannot be in one.
CITATION = re.compile(r"(?<![\w.-])(?:\.\./)*docs/((?:[\w.-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
# A Markdown link inside docs/: ``[text](design.md#testing)``, ``[text](#notation)``.
DOC_LINK = re.compile(r"\]\(([^)\s]*)\)")
# The project's notes outside the repository (shared/LOSSES.md, ../shared/DESIGN.md, or the bare name).
OUTSIDE_NOTE = re.compile(r"(?:\.\./)*shared/\w+\.md|\b(?:LOSSES|DESIGN|GPU|STYLE|PEERS)\.md\b")

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HTML_ID = re.compile(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", re.I)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: the rendered text in lower case, punctuation and
    symbols dropped (letters, digits, ``_`` and ``-`` kept), each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "")
    text = re.sub(r"\*+|(?<![0-9A-Za-z])_+|_+(?![0-9A-Za-z])", "", text)  # emphasis markers, not snake_case
    kept = []
    for ch in text.strip().lower():
        category = unicodedata.category(ch)
        if ch in " -_" or category[0] in "LNM":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor of a Markdown file: its headings' (repeats numbered ``-1``, ``-2``, ... as GitHub
    does), outside fenced code blocks, and explicit ``<a id=...>`` / ``<a name=...>`` ones."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fence = None
    for line in markdown.splitlines():
        marker = _FENCE.match(line)
        if marker:
            token = marker.group(1)[0]
            if fence is None:
                fence = token
            elif fence == token:
                fence = None
            continue
        if fence is not None:
            continue
        found.update(_HTML_ID.findall(line))
        heading = _HEADING.match(line)
        if heading:
            slug = github_anchor(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _text_files(root: pathlib.Path, names) -> list[pathlib.Path]:
    files = []
    for name in names:
        path = root / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            if SKIP_DIRS.intersection(p.relative_to(root).parts):
                continue
            files.append(p)
    return files


def _read(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files (images, the built extension)


def _target_problem(docs: pathlib.Path, file: str, anchor: str | None, cache: dict) -> str | None:
    """Why ``docs/<file>#<anchor>`` does not resolve, or None when it does."""
    target = (docs / file).resolve()
    if not target.is_file():
        return f"no file docs/{file}"
    if anchor is None:
        return None
    if target not in cache:
        cache[target] = anchors(target.read_text(encoding="utf-8"))
    if anchor not in cache[target]:
        return f"docs/{file} has no heading with anchor #{anchor}"
    return None


def broken_citations(root: pathlib.Path, names=CITING) -> list[str]:
    """``"<file>:<line>: <citation>: <problem>"`` for every ``docs/<file>.md[#anchor]`` cited in the
    files under ``names`` (relative to ``root``) that names no file under ``root/docs`` or no anchor of it."""
    docs, cache, problems = root / "docs", {}, []
    for path in _text_files(root, names):
        text = _read(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in CITATION.finditer(line):
                problem = _target_problem(docs, match.group(1), match.group(2), cache)
                if problem:
                    problems.append(f"{path.relative_to(root)}:{number}: {match.group(0)}: {problem}")
    return problems


def _prose_lines(markdown: str):
    """``(line number, line)`` of a Markdown file outside fenced code blocks, inline code spans removed."""
    fence = None
    for number, line in enumerate(markdown.splitlines(), 1):
        marker = _FENCE.match(line)
        if marker:
            token = marker.group(1)[0]
            fence = token if fence is None else (None if fence == token else fence)
            continue
        if fence is None:
            yield number, re.sub(r"(`+).*?\1", "", line)


def broken_doc_links(docs: pathlib.Path) -> list[str]:
    """The relative Markdown links between (and within) the files of ``docs`` that do not resolve."""
    cache, problems = {}, []
    for path in sorted(docs.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for number, line in _prose_lines(text):
            for match in DOC_LINK.finditer(line):
                link = match.group(1)
                if not link or re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, mailto:, ...
                    continue
                file, _, anchor = link.partition("#")
                target = path if not file else (path.parent / file)
                if not target.resolve().is_relative_to(docs.resolve()):
                    continue  # a link out of docs/ (to the code): not checked here
                rel = target.resolve().relative_to(docs.resolve()).as_posix()
                if not file.endswith(".md") and file:
                    if not target.exists():
                        problems.append(f"{path.relative_to(docs)}:{number}: {link}: no file {rel}")
                    continue
                problem = _target_problem(docs, rel, anchor or None, cache)
                if problem:
                    problems.append(f"{path.relative_to(docs)}:{number}: {link}: {problem}")
    return problems


def outside_note_citations(root: pathlib.Path, names=NO_OUTSIDE_NOTES) -> list[str]:
    """``"<file>:<line>: <match>"`` for every citation of the notes kept outside the repository
    (``shared/LOSSES.md`` and the like) in the files under ``names``; this test file is left out."""
    found = []
    for path in _text_files(root, names):
        if path.resolve() == pathlib.Path(__file__).resolve():
            continue
        text = _read(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in OUTSIDE_NOTE.finditer(line):
                found.append(f"{path.relative_to(root)}:{number}: {match.group(0)}")
    return found


# ---------------------------------------------------------------------------------------------------
# The helpers themselves


@pytest.mark.parametrize("heading, anchor", [
    ("GRPO family", "grpo-family"),
    ("Listwise, unpaired and reward-model losses", "listwise-unpaired-and-reward-model-losses"),
    ("`grpo_loss` options", "grpo_loss-options"),
    ("**Bold** and _emphasis_", "bold-and-emphasis"),
    ("Plackett–Luce", "plackettluce"),  # an en dash is punctuation: dropped
    ("What's new? (v2.0)", "whats-new-v20"),
    ("[Linked](https://example.com) heading", "linked-heading"),
    ("Über straße", "über-straße"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_anchors_number_repeats_and_skip_code_blocks():
    text = "# Title\n## Notes\n```\n# not a heading\n```\n## Notes\n### Notes ###\n<a id=\"custom\"></a>\n"
    assert anchors(text) == {"title", "notes", "notes-1", "notes-2", "custom"}


def _planted_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "losses.md").write_text("# Losses\n## GRPO family\nSee [design](design.md#testing).\n"
                                                 "And [here](#grpo-family), [gone](#nowhere).\n"
                                                 "Code: `f[grid](...)`\n```\n[x](#in-a-fence)\n```\n")
    (tmp_path / "docs" / "design.md").write_text("# Design\n## Testing\n")
    (tmp_path / "fastrl").mkdir()
    (tmp_path / "fastrl" / "good.py").write_text('"""Formulas: ``docs/losses.md#grpo-family``, docs/design.md."""\n')
    (tmp_path / "fastrl" / "bad.py").write_text('"""See ``docs/losses.md#grpo-famly`` and ../docs/missing.md."""\n')
    (tmp_path / "fastrl" / "old.py").write_text('"""Formulas: ``shared/LOSSES.md``; see ../shared/DESIGN.md."""\n')
    (tmp_path / "README.md").write_text("Read [the losses](docs/losses.md#grpo-family).\n")
    return tmp_path


def test_broken_citations_are_found(tmp_path):
    root = _planted_tree(tmp_path)
    problems = broken_citations(root, names=("fastrl", "README.md"))
    assert problems == ["fastrl/bad.py:1: docs/losses.md#grpo-famly: docs/losses.md has no heading with anchor "
                        "#grpo-famly", "fastrl/bad.py:1: ../docs/missing.md: no file docs/missing.md"]


def test_broken_doc_links_are_found(tmp_path):
    root = _planted_tree(tmp_path)
    assert broken_doc_links(root / "docs") == ["losses.md:4: #nowhere: docs/losses.md has no heading with anchor "
                                               "#nowhere"]


def test_outside_note_citations_are_found(tmp_path):
    root = _planted_tree(tmp_path)
    assert outside_note_citations(root, names=("fastrl",)) == ["fastrl/old.py:1: shared/LOSSES.md",
                                                               "fastrl/old.py:1: ../shared/DESIGN.md"]


# ---------------------------------------------------------------------------------------------------
# The repository


def test_cited_docs_exist():
    assert broken_citations(ROOT) == []


def test_links_inside_docs_resolve():
    assert broken_doc_links(DOCS) == []


def test_nothing_cites_notes_outside_the_repository():
    assert outside_note_citations(ROOT) == []
