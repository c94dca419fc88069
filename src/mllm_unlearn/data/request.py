"""Deletion requests: who to forget (names + photos), what to keep, all checked before any model loads.

A request is a YAML file (or a CSV file with the same content, one image path per row). Paths are
relative to the request file; a path may name an image file or a folder (its image files, sorted,
not recursive)::

    forget:                      # the people who asked not to be recognised
      - name: Ana Lind
        photos: ana/             # a folder, a file, or a list of both; at least 2 photos
        verify: ana_verify/      # optional: held-out photos, only for the report
      - name: Bram Okafor
        photos: [bram/1.png, bram/2.jpg]
    retain:                      # people and things the model must keep handling (non-empty)
      - name: Cleo Brandt        # name optional: where given, the report measures name recall
        photos: keep/cleo/
      - photos: keep/objects/
    strangers:                   # optional: people the model should not know (training and report)
      - photos: strangers/

CSV: a header ``role,name,path`` and one row per file or folder; ``role`` is ``forget``, ``verify``
(held-out photos of the ``forget`` person ``name``), ``retain`` or ``stranger``.

:func:`read_request` reads every image, decodes it, and refuses (:class:`DataError` naming the file
and the field) an unreadable or undecodable image, a person without a name or with fewer than 2
photos, two people with one name, the same photo (same bytes) twice, a person's photo that also sits
in the retain pool, and an empty retain pool.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sample import DataError, ImageRef

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_PHOTOS = 2
_FORGET_KEYS = {"name", "photos", "verify"}
_POOL_KEYS = {"name", "photos"}
_TOP_KEYS = {"forget", "retain", "strangers"}
CSV_ROLES = ("forget", "verify", "retain", "stranger")


@dataclass(frozen=True)
class Photo:
    """One image of a request: its bytes (as an :class:`ImageRef`), its file and its content hash."""

    image: ImageRef
    path: Path
    sha256: str


@dataclass
class Person:
    """A person to forget: ``photos`` for training (and, without ``verify``, a held-out share of them)."""

    name: str
    photos: list[Photo]
    verify: list[Photo] = field(default_factory=list)


@dataclass
class Pool:
    """A retain or stranger entry: photos, and the name of who is on them where known."""

    name: str | None
    photos: list[Photo]


@dataclass
class Request:
    source: Path
    forget: list[Person]
    retain: list[Pool]
    strangers: list[Pool] = field(default_factory=list)

    def photo_hashes(self) -> dict[str, list[str]]:
        """Every person's photo hashes (training and verify), for the run record."""
        return {p.name: sorted(ph.sha256 for ph in p.photos + p.verify) for p in self.forget}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _expand(base: Path, where: str, value: Any) -> list[Path]:
    """The image files a ``photos`` / ``verify`` value names (file, folder, or list of both)."""
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    files: list[Path] = []
    for item in items:
        if not isinstance(item, str | Path):
            raise DataError(f"{where}: expected a file or folder path, got {item!r}")
        path = base / item
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{where}: folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{where}: {path} does not exist")
    return files


def _read_photo(path: Path, where: str) -> Photo:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: cannot read {path} ({exc.strerror or exc})") from exc
    ref = ImageRef(data, f"{where}: {path}")
    ref.load()  # DataError naming the file and field if it does not decode
    return Photo(ref, path, sha256(data))


def read_photos(base: Path, where: str, value: Any) -> list[Photo]:
    return [_read_photo(p, where) for p in _expand(base, where, value)]


def _name(entry: dict, where: str, *, required: bool) -> str | None:
    name = entry.get("name")
    if name is None or (isinstance(name, str) and not name.strip()):
        if required:
            raise DataError(f"{where}: field 'name' is missing or empty")
        return None
    if not isinstance(name, str):
        raise DataError(f"{where}: field 'name' must be text, got {name!r}")
    return " ".join(name.split())


def _entries(doc: dict, key: str, src: Path) -> list[dict]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{src}: field '{key}' must be a list of entries")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, str) and key != "forget":  # a bare path: an unnamed pool entry
            entry = {"photos": entry}
        if not isinstance(entry, dict):
            raise DataError(f"{src}: {key}[{i}] must be a mapping with 'name' and 'photos'")
        allowed = _FORGET_KEYS if key == "forget" else _POOL_KEYS
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise DataError(f"{src}: {key}[{i}]: unknown field(s) {unknown} (allowed: {sorted(allowed)})")
        out.append(entry)
    return out


def _from_yaml(src: Path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{src}: cannot read the request file ({exc})") from exc
    except yaml.YAMLError as exc:
        raise DataError(f"{src}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{src}: expected a mapping with fields {sorted(_TOP_KEYS)}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise DataError(f"{src}: unknown field(s) {unknown} (allowed: {sorted(_TOP_KEYS)})")
    return doc


def _from_csv(src: Path) -> dict:
    """The CSV rows as the YAML document they stand for (rows with one role and name are grouped)."""
    try:
        with open(src, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            header = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{src}: cannot read the request file ({exc})") from exc
    if not {"role", "path"} <= header:
        raise DataError(f"{src}: CSV header must be 'role,name,path' (got {sorted(header)})")
    forget: dict[str, dict] = {}
    pools: dict[str, dict[str, dict]] = {"retain": {}, "strangers": {}}
    verify: list[tuple[int, str, str]] = []
    for line, row in enumerate(rows, start=2):
        role, name, path = ((row.get(k) or "").strip() for k in ("role", "name", "path"))
        if role not in CSV_ROLES:
            raise DataError(f"{src} line {line}: field 'role' is {role!r}, expected one of {CSV_ROLES}")
        if not path:
            raise DataError(f"{src} line {line}: field 'path' is empty")
        if role == "forget":
            if not name:
                raise DataError(f"{src} line {line}: forget[{len(forget)}]: field 'name' is missing or empty")
            forget.setdefault(name, {"name": name, "photos": []})["photos"].append(path)
        elif role == "verify":
            verify.append((line, name, path))
        else:
            key = "retain" if role == "retain" else "strangers"
            entry = pools[key].setdefault(name, {"name": name or None, "photos": []})
            entry["photos"].append(path)
    for line, name, path in verify:
        if name not in forget:
            raise DataError(f"{src} line {line}: field 'name' {name!r} of a verify row names no forget person")
        forget[name].setdefault("verify", []).append(path)
    return {
        "forget": list(forget.values()),
        "retain": list(pools["retain"].values()),
        "strangers": list(pools["strangers"].values()),
    }


def read_request(path: str | Path) -> Request:
    """Read and check a deletion request (YAML, or CSV by its ``.csv`` suffix). No model is needed."""
    src = Path(path)
    if not src.is_file():
        raise DataError(f"{src}: request file not found")
    doc = _from_csv(src) if src.suffix.lower() == ".csv" else _from_yaml(src)
    base = src.parent

    forget_entries = _entries(doc, "forget", src)
    if not forget_entries:
        raise DataError(f"{src}: field 'forget' lists nobody to forget")
    people: list[Person] = []
    for i, entry in enumerate(forget_entries):
        where = f"{src}: forget[{i}]"
        name = _name(entry, where, required=True)
        where = f"{where} ({name})"
        if any(p.name.casefold() == name.casefold() for p in people):
            raise DataError(f"{where}: field 'name': {name!r} is requested twice")
        photos = read_photos(base, f"{where} field 'photos'", entry.get("photos"))
        if len(photos) < MIN_PHOTOS:
            raise DataError(
                f"{where} field 'photos': {len(photos)} photo(s); at least {MIN_PHOTOS} are needed "
                "(some to train on, one held out to verify the deletion)"
            )
        people.append(Person(name, photos, read_photos(base, f"{where} field 'verify'", entry.get("verify"))))

    def pools(key: str) -> list[Pool]:
        out = []
        for i, entry in enumerate(_entries(doc, key, src)):
            where = f"{src}: {key}[{i}]"
            name = _name(entry, where, required=False)
            where = f"{where} ({name})" if name else where
            out.append(Pool(name, read_photos(base, f"{where} field 'photos'", entry.get("photos"))))
        return out

    retain, strangers = pools("retain"), pools("strangers")
    if not any(p.photos for p in retain):
        raise DataError(
            f"{src}: field 'retain' holds no images; CVF-NCU needs images of other people and "
            "things the model must keep handling (its null space is calibrated on them)"
        )
    request = Request(src, people, retain, strangers)
    check_overlaps(request)
    return request


def _labelled(request: Request) -> Iterable[tuple[str, Photo]]:
    for p in request.forget:
        yield from ((f"forget ({p.name}) 'photos'", ph) for ph in p.photos)
        yield from ((f"forget ({p.name}) 'verify'", ph) for ph in p.verify)
    for key, entries in (("retain", request.retain), ("strangers", request.strangers)):
        for e in entries:
            label = f"{key} ({e.name})" if e.name else key
            yield from ((f"{label} 'photos'", ph) for ph in e.photos)


def check_overlaps(request: Request) -> None:
    """No photo twice: a person's photo in the retain pool gets its own message, any other repeat
    (within a person, across people, pools) names both files."""
    seen: dict[str, tuple[str, Photo]] = {}
    src = request.source
    for label, photo in _labelled(request):
        if photo.sha256 in seen:
            first_label, first = seen[photo.sha256]
            if first_label.startswith("forget") and label.startswith("retain"):
                raise DataError(
                    f"{src}: {first_label}: {first.path} also sits in the retain pool as {photo.path} "
                    f"(field {label}; same bytes): a person to forget cannot also be kept"
                )
            raise DataError(
                f"{src}: duplicate photo: {photo.path} (field {label}) has the same bytes as "
                f"{first.path} (field {first_label}); list each photo once"
            )
        seen[photo.sha256] = (label, photo)
