"""Reading benchmark parquet folders, shared by every reader: rows that know where they came from
(so each error names the file, row, ID and field), strict column checks, and the retain complement."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from .sample import DataError, ImageRef


@dataclass(frozen=True)
class Row:
    """One parquet row plus where it came from, for error messages."""

    file: Path
    index: int
    values: dict[str, Any]

    @property
    def person(self) -> str:
        """The profile ID as text; ``""`` when the row has none (real ``ft_Data``)."""
        ident = self.values.get("ID")
        return "" if ident is None else str(ident)

    def where(self, field: str) -> str:
        ident = f" (ID={self.values['ID']})" if self.values.get("ID") is not None else ""
        return f"{self.file} row {self.index}{ident} field '{field}'"

    def fail(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.where(field)}: {problem}")

    def need(self, container: Any, key: str, path: str, kind: type | tuple[type, ...]) -> Any:
        """``container[key]``, which must be present, not null and of ``kind``; ``path`` names it in errors."""
        value = container.get(key) if isinstance(container, dict) else None
        if value is None:
            raise self.fail(path, "missing")
        if not isinstance(value, kind):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.fail(path, f"expected {expected}, got {type(value).__name__}")
        return value

    def image(self, column: str, first: bool = False) -> ImageRef:
        """The image in ``column`` (an image struct, or with ``first`` the first of a list of them)."""
        field = column
        value = self.need(self.values, column, column, list if first else (dict, bytes))
        if first:
            field = f"{column}[0]"
            if not value:
                raise self.fail(column, "empty image list")
            value = value[0]
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise self.fail(field, "image bytes are missing")
        return ImageRef(bytes(data), source=self.where(field))


R = TypeVar("R", bound=Row)


def read_rows(
    folder: Path,
    required: tuple[str, ...],
    wanted: tuple[str, ...] | None = None,
    row_class: type[R] = Row,
    what: str = "split",
) -> list[R]:
    """The rows of every ``*.parquet`` under ``folder`` (sorted, subfolders too). Every file must have
    the ``required`` columns; only those and the ``wanted`` ones are read (``wanted=None``: all)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder is missing")
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{folder}: no parquet file in the {what} folder")
    rows: list[R] = []
    for file in files:
        try:
            names = pq.read_schema(file).names
            for column in required:
                if column not in names:
                    raise DataError(f"{file}: column '{column}' is missing (has {names})")
            columns = None if wanted is None else [c for c in dict.fromkeys(required + wanted) if c in names]
            table = pq.read_table(file, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{file}: not a readable parquet file ({exc})") from exc
        rows += [row_class(file, i, values) for i, values in enumerate(table.to_pylist())]
    if not rows:
        raise DataError(f"{folder}: {what} is empty (its parquet files hold no rows)")
    return rows


def unique_profiles(rows: list[R], folder: Path) -> list[R]:
    """``rows`` after checking each has an ``ID`` and no ID occurs twice."""
    seen: set[str] = set()
    for row in rows:
        row.need(row.values, "ID", "ID", (int, str))
        if row.person in seen:
            raise row.fail("ID", f"ID occurs twice in {folder}")
        seen.add(row.person)
    return rows


def complement(
    root: Path, forget: str, pattern: str = r"forget_(\d+)", template: str = "retain_{}", expected: str = "forget_NN"
) -> str:
    """The retain split that complements ``forget`` (``forget_10`` -> ``retain_90``)."""
    match = re.fullmatch(pattern, forget)
    if match is None:
        raise DataError(
            f"{root / forget}: cannot infer the retain folder from {forget!r} (expected {expected}); pass retain="
        )
    return template.format(100 - int(match.group(1)))
