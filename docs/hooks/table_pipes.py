"""MkDocs hook: a `\\|` inside a code span of a table row renders as `|`, as it does on GitHub.

GitHub's tables need the pipe escaped even inside backticks; Python-Markdown splits cells around code spans on
its own and would print the backslash. Only table rows outside fenced blocks are touched.
"""

from __future__ import annotations

import re
from typing import Any

CODE_SPAN = re.compile(r"`[^`\n]*`")


def _unescape(match: re.Match[str]) -> str:
    return match.group(0).replace("\\|", "|")


def on_page_markdown(markdown: str, **_: Any) -> str:
    lines, fenced = [], False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("|"):
            line = CODE_SPAN.sub(_unescape, line)
        lines.append(line)
    return "\n".join(lines)
