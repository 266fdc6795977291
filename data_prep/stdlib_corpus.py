"""Built-in corpus: the Python standard library on this machine as "code repository" documents.

One document per top-level package (every `.py` file under it, sorted, each preceded by a
header with its path relative to the standard-library root) and one per top-level module.
Long, structured, and present on every machine, so the quickstart needs no download.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

from l2a_configs import UserError

HEADER = "# ===== {path} =====\n"


def stdlib_root(root: str | None) -> Path:
    path = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise UserError(f"stdlib source: root '{path}' is not a directory; set root=null for this Python's")
    return path


def units(root: Path, exclude: list[str]) -> list[Path]:
    """Top-level packages (folders with __init__.py) and modules, sorted by name."""
    skip = set(exclude)
    found = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            found.append(entry)
        elif entry.is_file() and entry.suffix == ".py":
            found.append(entry)
    return found


def package_files(unit: Path, exclude: list[str]) -> list[Path]:
    if unit.is_file():
        return [unit]
    skip = set(exclude)
    files = []
    for path in sorted(unit.rglob("*.py")):
        if not skip.intersection(path.relative_to(unit).parts[:-1]):
            files.append(path)
    return files


def iter_documents(root: str | None, exclude: list[str]) -> Iterator[tuple[str, str | bytes]]:
    """Yield (reference, text) per package; text is bytes when a file is not valid UTF-8.

    The caller's bad-input policy decides what to do with undecodable bytes, as for any source.
    """
    base = stdlib_root(root)
    for unit in units(base, exclude):
        parts, raw = [], False
        for path in package_files(unit, exclude):
            data = path.read_bytes()
            try:
                body = data.decode("utf-8")
            except UnicodeDecodeError:
                raw = True
                body = data.decode("utf-8", errors="surrogateescape")
            parts.append(HEADER.format(path=path.relative_to(base).as_posix()) + body)
        if not parts:
            continue
        text = "\n".join(parts)
        ref = str(unit.relative_to(base))
        yield ref, (text.encode("utf-8", errors="surrogateescape") if raw else text)
