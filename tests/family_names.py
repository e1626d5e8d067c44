"""Where code names a model family (issue 9: nothing in `pipeline/` names one), comments and documentation aside.

A hit is an occurrence of a registered family's name (`models.FAMILIES`, any case, also inside identifiers such
as `t5_params`) in a token of the source that is not documentation: comments, docstrings (any bare string
statement, so the attribute docstrings below pydantic fields and dataclass fields too) and the text of
`description=` keywords are dropped; every other string (messages, titles, defaults) and every identifier counts.

    python -m tests.family_names              # pipeline/*.py: one line per hit, then the count
    python -m tests.family_names models/*.py  # any files
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    token: str
    count: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.token[:100]!r}"


def family_pattern() -> re.Pattern[str]:
    """The registered families' names, any case."""
    from models import FAMILIES

    return re.compile("|".join(re.escape(name) for name in FAMILIES), re.IGNORECASE)


def documentation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of the bare string statements (docstrings) and `description=` texts of `source`."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            text = node
        elif isinstance(node, ast.keyword) and node.arg == "description":
            text = node.value
        else:
            continue
        spans.append(((text.lineno, text.col_offset), (text.end_lineno, text.end_col_offset)))
    return spans


def hits(source: str, path: str = "<source>", pattern: re.Pattern[str] | None = None) -> list[Hit]:
    """Every token of `source` outside comments and documentation that names a family."""
    pattern = pattern or family_pattern()
    spans = documentation_spans(source)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or any(a <= tok.start and tok.end <= b for a, b in spans):
            continue
        count = len(pattern.findall(tok.string))
        if count:
            out.append(Hit(path, tok.start[0], tok.string, count))
    return out


def hits_in(paths: list[Path]) -> list[Hit]:
    pattern = family_pattern()
    out = []
    for path in paths:
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        out += hits(path.read_text(encoding="utf-8"), str(shown), pattern)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in argv] or sorted((ROOT / "pipeline").rglob("*.py"))
    found = hits_in(paths)
    for hit in found:
        print(hit)
    print(f"{sum(h.count for h in found)} occurrence(s) in {len(found)} token(s) of {len(paths)} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
