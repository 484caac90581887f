"""The README's Python examples run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    assert capsys.readouterr().out  # every example prints something a reader can compare


def _resolves(dotted: str) -> bool:
    import importlib
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_docs_name_code_that_exists():
    """Every `decompose.x.y` name and `decompose/x.py` path quoted in README.md and docs/ (the
    CHANGELOG excepted: it records names as they were) exists, so a move cannot leave the docs
    pointing at nothing."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    stale = []
    for f in files:
        if f.name == "CHANGELOG.md":
            continue
        text = f.read_text()
        for p in set(re.findall(r"`(decompose/[\w/]+\.py)", text)):
            if not (root / p).exists():
                stale.append(f"{f.name}: {p}")
        for d in set(re.findall(r"`(decompose(?:\.\w+)+)", text)):
            if not _resolves(d):
                stale.append(f"{f.name}: {d}")
    assert not stale, stale
