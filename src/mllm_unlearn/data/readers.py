"""One entry point for every benchmark reader: ``read_benchmark("clear", root)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .clear import read_clear
from .mllmu import read_mllmu
from .sample import BenchmarkData
from .umu import read_umu

#: benchmark kind -> reader ``(root, forget=..., ...) -> BenchmarkData``
READERS: dict[str, Callable[..., BenchmarkData]] = {"mllmu": read_mllmu, "clear": read_clear, "umu": read_umu}
#: the forget split each benchmark is read with when none is given
DEFAULT_FORGET = {"mllmu": "forget_10", "clear": "forget05", "umu": "forget_10"}


def read_benchmark(kind: str, root: str | Path, forget: str | None = None) -> BenchmarkData:
    """Read benchmark ``kind`` (``mllmu``, ``clear`` or ``umu``) at ``root``; ``forget`` defaults to
    the benchmark's usual split (:data:`DEFAULT_FORGET`) and the retain split is its complement."""
    if kind not in READERS:
        raise ValueError(f"unknown benchmark kind {kind!r}; known kinds: {', '.join(sorted(READERS))}")
    return READERS[kind](root, forget=forget or DEFAULT_FORGET[kind])
