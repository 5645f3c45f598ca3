"""Small file helpers: atomic writes and strict JSONL reading.

Atomic means a reader never sees a half-written file: we write to a temporary
file in the same folder, flush it to disk, then ``os.replace`` it over the
target (a rename, which the OS performs all at once).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import DataError


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    enc = None if "b" in mode else encoding
    try:
        with open(tmp, mode, encoding=enc) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write one JSON object per line, atomically. Returns the number of rows."""
    n = 0
    with atomic_open(path) as f:
        for n, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {n} is {type(row).__name__}, expected a dict")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line raises ``DataError`` naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}): {line[:80]!r}"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
