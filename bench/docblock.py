"""The marked block a benchmark owns in a docs page: ``<!-- name:begin ... -->`` ... ``<!-- name:end -->``.

Each bench script rewrites only its own block, so several scripts (and hand-written text) share one page.
"""
from __future__ import annotations

from pathlib import Path


def write_block(doc: Path, begin: str, end: str, section: str, *, title: str, after_title: bool = False) -> None:
    """Replace the block between ``begin`` and ``end`` in ``doc`` with ``section``. Absent: insert it right after
    the page's first line (``after_title``) or append it. A missing page is created with ``title``."""
    doc = Path(doc)
    block = f"{begin}\n{section.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else f"{title}\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    elif after_title:
        head, _, rest = text.partition("\n")
        text = head + "\n\n" + block + "\n" + (("\n" + rest.lstrip("\n")) if rest.strip() else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")
