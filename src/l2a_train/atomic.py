"""Atomic writes: a result appears complete or not at all.

    write_atomic(path, text)                      # a text file: temp file, fsync, rename
    write_atomically(output, overwrite, write)    # a directory: write(tmp sibling), then rename

Used by the run checkpoints (`training.checkpoints`) and by every command that writes an output
directory (l2a-convert, l2a-eval, l2a-prune).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from l2a_common import UserError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    part = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(part, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)
    fsync_dir(path.parent)


def write_atomically(output: Path, overwrite: bool, write) -> None:
    """Call write(tmp_dir), then move tmp_dir to output (replacing it only if overwrite)."""
    if output.exists() and not overwrite:
        raise UserError(f"output={output} already exists; choose another directory or pass overwrite=true")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
