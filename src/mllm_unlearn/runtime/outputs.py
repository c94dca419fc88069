"""Output folders that appear only when complete, and the checks done before any work starts.

Every command writes into a temporary sibling of its ``--out`` (``.NAME.tmp-XXXX``) and renames it
into place at the end: an interrupted or failed run leaves nothing under ``--out``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_existing(path: str | Path) -> Path:
    """``path`` as a Path, or FileExistsError if something is already there (nothing is overwritten)."""
    out = Path(path)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new --out")
    return out


def check_writable(path: str | Path) -> Path:
    """Fail now, not after the work, if ``path`` (a file or folder to be created) cannot be written:
    its parent folder must exist (or be creatable below an existing one) and be writable."""
    out = Path(path)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot write in {parent}")
    return out


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; rename it to ``path`` when the block succeeds,
    remove it when the block raises. ``path`` must not exist (checked before and after the work)."""
    out = refuse_existing(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        refuse_existing(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
