"""Code blocks of the project's Markdown pages, so tests run the documentation as printed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(page: str, language: str, heading: str | None = None) -> list[str]:
    """The ```language blocks of ``page`` (a path from the repository root), within the section that starts at
    the ``## heading`` line (to the next ``## ``) when ``heading`` is given."""
    text = (ROOT / page).read_text()
    if heading is not None:
        text = text[text.index(f"## {heading}\n"):]
        text = text[: text.find("\n## ", 1)] if "\n## " in text[1:] else text
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)
