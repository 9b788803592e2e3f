"""The README describes the tree as it is: every entry of its Layout tree and every repository path
it names exists, and every package under src/unimedvl appears in the tree."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _layout_block() -> list[str]:
    section = README[README.index("## Layout"):]
    block = section[section.index("```") + 3:]
    return block[: block.index("```")].strip("\n").splitlines()


def _tree_entries() -> list[Path]:
    """Paths of the tree's first column: names, or comma-separated names, resolved by indentation."""
    entries, stack = [], []  # stack of (indent, directory)
    for line in _layout_block():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head = re.split(r"\s{2,}", line.strip())[0]
        if indent > 0 and not stack:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        base = stack[-1][1] if stack else REPO
        names = [n.strip() for n in head.split(",")]
        if not all(re.fullmatch(r"[\w./-]+", n) for n in names):
            continue  # a continuation line of a description
        for name in names:
            path = base / name.rstrip("/")
            entries.append(path)
            if name.endswith("/"):
                stack.append((indent, path))
    return entries


def test_every_tree_entry_exists():
    entries = _tree_entries()
    assert REPO / "src" / "unimedvl" / "inference" / "presets.py" in entries  # the parser walks the nesting
    missing = [str(p.relative_to(REPO)) for p in entries if not p.exists()]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_package_is_in_the_tree():
    entries = set(_tree_entries())
    packages = [p for p in (REPO / "src" / "unimedvl").iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    absent = [p.name for p in packages if p not in entries]
    assert not absent, f"packages missing from the README Layout tree: {absent}"


def test_paths_named_in_the_text_exist():
    spans = re.findall(r"`([^`\n]+)`", README)
    named = {m for span in spans for m in re.findall(r"(?<![\w/])((?:[\w.-]+/)+[\w.-]+\.(?:py|yaml|sh))\b", span)}
    assert len(named) >= 8
    roots = (REPO, REPO / "src", REPO / "src" / "unimedvl")
    missing = [n for n in sorted(named) if not any((root / n).exists() for root in roots)]
    assert not missing, f"README names paths that do not exist: {missing}"
