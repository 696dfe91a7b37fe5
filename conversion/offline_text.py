"""Real English sentences that ship with Python itself: the docstrings of the standard library's source files.

Used as calibration and evaluation text where nothing can be downloaded. The standard library is read as source (with
`ast`, nothing is imported), in a fixed order, and split by file into two disjoint parts, so that text used to fit a
conversion is never the text used to evaluate it.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_MARKS = (">>>", "::", "==", "()", "[", "{", "`", "_", "|", "\\", "->", "http", "www.", "$", "%")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return [doc for doc in (ast.get_docstring(node) for node in nodes) if doc]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if any(mark in sentence for mark in _CODE_MARKS):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return letters / len(sentence) > 0.9


def _sentences(path: Path) -> list[str]:
    found = []
    for doc in _docstrings(path):
        for paragraph in doc.split("\n\n"):
            text = " ".join(paragraph.split())
            found.extend(s for s in _SENTENCE_END.split(text) if _is_prose(s))
    return found


def _parts(part: str, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(chosen, other): even-numbered files make the "calibration" (training) part, odd-numbered ones the other."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"`part` is 'calibration' or 'evaluation', got {part!r}.")
    even, odd = files[0::2], files[1::2]
    return (even, odd) if part == "calibration" else (odd, even)


def stdlib_paragraphs(part: str) -> list[str]:
    """Every prose paragraph of the docstrings of the whole standard library (subpackages included, tests excluded),
    whitespace-normalised, from the ``"calibration"`` (training) or ``"evaluation"`` part of its files (disjoint):
    about 9 MB of English for language-model training offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "idle_test"} & set(p.relative_to(root).parts))
    paragraphs = []
    for path in _parts(part, files)[0]:
        for doc in _docstrings(path):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                letters = sum(c.isalpha() or c.isspace() for c in text)
                if len(text.split()) >= 5 and letters / len(text) > 0.85:
                    paragraphs.append(text)
    return paragraphs


def stdlib_sentences(part: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct sentences from the ``"calibration"`` part (even-numbered files) or the
    ``"evaluation"`` part (odd-numbered files) of the standard library's sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, others = _parts(part, sorted(p for p in root.glob("*.py")))
    other = set()
    for path in others:
        other.update(_sentences(path))
    seen: dict[str, None] = {}
    for path in chosen:
        for sentence in _sentences(path):
            if sentence not in other:  # the same sentence in both parts would leak
                seen.setdefault(sentence, None)
        if len(seen) >= limit:
            break
    return list(seen)[:limit]
