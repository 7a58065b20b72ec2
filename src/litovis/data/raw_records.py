"""Building blocks shared by the raw-format readers: errors, cells, JSON records, image paths.

A whole source that cannot be read (missing file, missing columns, unparsable JSON file) raises
`SourceError` naming the file; one bad record raises `RowError` inside the reader, which turns it
into a drop with its reason. Local image references are resolved against the dataset root and
refused when they escape it (after `..` and symlinks are resolved) unless explicitly allowed.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


class SourceError(ValueError):
    """A raw source cannot be read at all (missing file or column, unreadable container)."""


class RowError(Exception):
    """One raw record is malformed; readers turn it into a drop with `reason` and `detail`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def require_file(path: str | Path, what: str = "source file") -> Path:
    """`path` as a `Path`, or `SourceError` if it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} not found: {p}")
    return p


def require_columns(path: Path, found: Iterable[str], required: Iterable[str]) -> None:
    """Raise `SourceError` naming the file, the missing columns and the columns found."""
    found = list(found)
    missing = [c for c in required if c not in found]
    if missing:
        raise SourceError(f"{path}: missing required column(s) {missing}; columns found: {found}")


def is_missing(value: Any) -> bool:
    """True for None, NaN and pandas' NA (what an empty parquet/CSV cell reads as)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def optional_text(value: Any, column: str) -> str | None:
    """A cell that may be empty: None when missing or blank, else its string."""
    if is_missing(value):
        return None
    if not isinstance(value, str):
        raise RowError(f"{column} not a string", f"got {type(value).__name__}")
    return value if value.strip() else None


def required_text(value: Any, column: str) -> str:
    """A cell that must hold non-blank text."""
    text = optional_text(value, column)
    if text is None:
        raise RowError(f"missing {column}")
    return text


def _json_record(line: bytes) -> Any:
    """One JSONL line's record, or the `RowError` saying why it has none."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return RowError("bad encoding", f"not UTF-8 at byte {err.start}")
    except (ValueError, RecursionError) as err:  # bad JSON, over-long integers, absurd nesting
        return RowError("bad json", f"{type(err).__name__}: {str(err)[:120]}")


def read_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, record) pairs of a `.jsonl` file (one per non-blank line) or a `.json` list.

    In JSONL a line that is not valid UTF-8 or JSON is yielded as a `RowError` instead of a
    record, so the reader drops that line only; a `.json` file that is not a JSON list raises
    `SourceError`. A UTF-8 byte-order mark is accepted.
    """
    if path.suffix.lower() == ".jsonl":
        with path.open("rb") as handle:  # bytes: a bad byte spoils its line, not the file
            index = 0
            for number, line in enumerate(handle):
                if number == 0:
                    line = line.removeprefix(codecs.BOM_UTF8)
                if not line.strip():
                    continue
                yield index, _json_record(line)
                index += 1
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
        raise SourceError(f"{path}: not valid JSON ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from enumerate(data)


def url_scheme(ref: str) -> str | None:
    """The lower-cased scheme of `scheme://...` references, else None."""
    match = _SCHEME.match(ref.strip())
    return match.group(1).lower() if match else None


@dataclass(frozen=True)
class ImageRoot:
    """Resolves image references of one source against its dataset root.

    Attributes:
        root: folder that relative references are relative to, as the user gave it.
        allow_outside: accept local files that resolve outside `root`.
    """

    root: Path
    allow_outside: bool = False

    def resolve(self, ref: Any) -> str:
        """An http(s) URL unchanged, or the path of an existing local file under the root.

        The returned path keeps the user's form (relative if the root was given relative) so
        prepared data stays valid when the tree is moved; the checks use the resolved path.
        """
        if not isinstance(ref, str) or not ref.strip():
            raise RowError("bad image reference", f"got {ref!r:.80}")
        scheme = url_scheme(ref)
        if scheme in ("http", "https"):
            return ref.strip()
        if scheme is not None:
            raise RowError("bad image scheme", f"{scheme}:// in {ref!r:.80}")
        try:
            candidate = Path(ref) if Path(ref).is_absolute() else self.root / ref
            resolved = candidate.resolve()
            outside = not resolved.is_relative_to(self.root.resolve())
            exists = resolved.is_file()
        except (ValueError, OSError) as err:  # NUL bytes, names too long for the filesystem, ...
            raise RowError("bad image path", f"{ref!r:.80}: {err}") from None
        if outside and not self.allow_outside:
            raise RowError("image outside root", f"{ref} resolves outside {self.root}")
        if not exists:
            raise RowError("missing image", str(candidate))
        return str(candidate)
