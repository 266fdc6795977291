"""Built-in corpus: the Python packages on this machine as "code repository" documents.

One document per top-level package (every `.py` file under it, sorted, each preceded by a
header with its path relative to its root) and one per top-level module. Long, structured,
and present on every machine, so the quickstart needs no download.

Roots, read one after another, each in sorted name order (so the order never depends on the
file system): `root` (null: the running Python's standard library; a folder; or a list of
them, null standing for the standard library), then with `site_packages: true` this Python's
site-packages folders (`sysconfig` purelib / platlib). The first root's documents are named by
their path inside it (`json`, as before); a later root's by its folder name too
(`site-packages/torch`), in the reference and in the file headers. A package or module name
met in an earlier root is not read again from a later one (one copy of a name).

Held-out splits: `holdout` (a fraction in [0, 1)) assigns each package to the held-out part by
a hash of its name alone (CRC-32 of the importable name: `torch` for `torch/` or `torch.py`),
and `split` picks `all`, `train` (the packages not held out) or `heldout`. So a `train` and a
`heldout` prep with the same `holdout` never share a package, on any machine, whatever else
is installed or which roots are read.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from l2a_common import UserError

HEADER = "# ===== {path} =====\n"
SPLITS = ("all", "train", "heldout")


def stdlib_root(root: str | None) -> Path:
    """The first root (`root` may also be a list of roots: see `roots`)."""
    if isinstance(root, (list, tuple)) or type(root).__name__ == "ListConfig":
        root = list(root)[0] if len(root) else None
    path = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise UserError(f"stdlib source: root '{path}' is not a directory; set root=null for this Python's")
    return path


def site_packages() -> list[Path]:
    """This Python's site-packages folders (purelib, then platlib if it differs), existing ones."""
    paths = sysconfig.get_paths()
    found: list[Path] = []
    for key in ("purelib", "platlib"):
        path = Path(paths[key])
        if path.is_dir() and path.resolve() not in [p.resolve() for p in found]:
            found.append(path)
    return found


def roots(root, with_site_packages: bool = False) -> list[Path]:
    """Every root to read, in order, without repeats."""
    given = list(root) if isinstance(root, (list, tuple)) or type(root).__name__ == "ListConfig" else [root]
    if not given:
        given = [None]
    found: list[Path] = []
    for entry in given:
        path = stdlib_root(entry)
        if path.resolve() not in [p.resolve() for p in found]:
            found.append(path)
    if with_site_packages:
        for path in site_packages():
            if path.resolve() not in [p.resolve() for p in found]:
                found.append(path)
    return found


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


def unit_name(unit: Path) -> str:
    """The importable name of a package or module: `json` for `json/`, `abc` for `abc.py`."""
    return unit.stem if unit.is_file() else unit.name


def is_heldout(name: str, holdout: float) -> bool:
    """Whether package `name` belongs to the held-out part: a pure function of the name."""
    return holdout > 0 and zlib.crc32(name.encode("utf-8")) % 1_000_000 < round(holdout * 1_000_000)


def check_split(split: str, holdout: float) -> None:
    if split not in SPLITS:
        raise UserError(f"stdlib source: split='{split}' is not one of {', '.join(SPLITS)}")
    if not 0.0 <= holdout < 1.0:
        raise UserError(f"stdlib source: holdout={holdout} must be a fraction in [0, 1)")
    if split != "all" and holdout <= 0:
        raise UserError(f"stdlib source: split={split} needs holdout > 0 (the fraction of packages held out)")


def selected_units(root=None, exclude: list[str] = (), with_site_packages: bool = False, holdout: float = 0.0,
                   split: str = "all") -> list[tuple[Path, Path, str]]:
    """(root, unit, label prefix) of every document to read, in reading order."""
    check_split(split, float(holdout))
    exclude = list(exclude)
    chosen, seen = [], set()
    for i, base in enumerate(roots(root, with_site_packages)):
        prefix = "" if i == 0 else base.name + "/"
        for unit in units(base, exclude):
            name = unit_name(unit)
            if name in seen:
                continue
            seen.add(name)
            if split != "all" and is_heldout(name, float(holdout)) != (split == "heldout"):
                continue
            chosen.append((base, unit, prefix))
    return chosen


def source_chars(spec: dict) -> int:
    """About how many characters a source spec's documents hold (for a progress ETA)."""
    exclude = list(spec["exclude"])
    return sum(f.stat().st_size for _, unit, _ in selected_units(
        spec["root"], exclude, bool(spec["site_packages"]), float(spec["holdout"]), str(spec["split"]))
        for f in package_files(unit, exclude))


def iter_documents(root, exclude: list[str], with_site_packages: bool = False, holdout: float = 0.0,
                   split: str = "all") -> Iterator[tuple[str, str | bytes]]:
    """Yield (reference, text) per package; text is bytes when a file is not valid UTF-8.

    The caller's bad-input policy decides what to do with undecodable bytes, as for any source.
    """
    for base, unit, prefix in selected_units(root, exclude, with_site_packages, holdout, split):
        parts, raw = [], False
        for path in package_files(unit, exclude):
            data = path.read_bytes()
            try:
                body = data.decode("utf-8")
            except UnicodeDecodeError:
                raw = True
                body = data.decode("utf-8", errors="surrogateescape")
            parts.append(HEADER.format(path=prefix + path.relative_to(base).as_posix()) + body)
        if not parts:
            continue
        text = "\n".join(parts)
        ref = prefix + str(unit.relative_to(base))
        yield ref, (text.encode("utf-8", errors="surrogateescape") if raw else text)
