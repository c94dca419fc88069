"""Reader for MLLMU-Bench folders: the real benchmark and the synthetic world of :mod:`.world`.

A benchmark root holds one folder per split, each with one or more parquet files (read in sorted
order). :func:`read_mllmu` turns it into a :class:`BenchmarkData`:

* ``forget`` / ``retain``: every task item of the profiles in the forget folder and its retain
  complement (``forget_10`` -> ``retain_90``);
* ``real``: every task item of ``Retain_Set`` (real-world people: general utility);
* ``test``: the image-asked (``vqa``) items of the *forget* people from ``Test_Set``, shown with an
  unseen photo (the first of each profile's ``images``): does forgetting generalise to new photos?
* ``train``: free-form training pairs from ``ft_Data`` (and ``Pretrain_Data`` when present).

Task items map as follows: ``Classification_Task`` -> ``mcq`` (``Image_Textual_Questions`` asked with
the image, ``Pure_Text_Questions`` without), ``Generation_Task`` -> ``gen`` and ``Mask_Task`` ->
``cloze``, whose ``Type`` (``Image_Textual`` / ``Pure_Text``) sets the modality.

Images are kept as encoded bytes (:class:`ImageRef`) and decoded only when used. Bad input raises
:class:`DataError` naming the file (or folder), the row and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .parquet import Row, complement, read_rows, unique_profiles
from .sample import BenchmarkData, DataError, ImageRef, Sample
from .sample import check_images as check_images  # re-exported: it used to live here

#: split folders that are always part of the benchmark
REAL_FOLDER = "Retain_Set"
TEST_FOLDER = "Test_Set"
TRAIN_FOLDER = "ft_Data"
PRETRAIN_FOLDER = "Pretrain_Data"  # optional: only the synthetic world has it

_TASK_COLUMNS = ("Classification_Task", "Generation_Task", "Mask_Task")
_MODALITY = {"Image_Textual": "vqa", "Pure_Text": "qa"}


def read_mllmu(
    root: str | Path, forget: str = "forget_10", retain: str | None = None, train_splits: Iterable[str] | None = None
) -> BenchmarkData:
    """Read an MLLMU-Bench folder.

    ``retain`` defaults to the complement of ``forget`` (``forget_N`` -> ``retain_{100-N}``);
    ``train_splits`` defaults to ``ft_Data`` plus ``Pretrain_Data`` when that folder exists.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: benchmark folder not found")
    retain = retain or complement(root, forget)
    if train_splits is None:
        train_splits = [TRAIN_FOLDER] + ([PRETRAIN_FOLDER] if (root / PRETRAIN_FOLDER).is_dir() else [])

    forget_rows = _read_profiles(root / forget, "image")
    retain_rows = _read_profiles(root / retain, "image")
    real_rows = _read_profiles(root / REAL_FOLDER, "image")
    test_rows = _read_profiles(root / TEST_FOLDER, "images")
    forget_people = frozenset(row.person for row in forget_rows)
    missing = forget_people - {row.person for row in test_rows}
    if missing:
        raise DataError(f"{root / TEST_FOLDER}: no profile for forget IDs {sorted(missing)[:10]}")

    return BenchmarkData(
        name=f"MLLMU-Bench {root.name} ({forget} / {retain})",
        train=[sample for split in train_splits for sample in _training_samples(root / split)],
        splits={
            "forget": _split_samples(forget_rows, forget),
            "retain": _split_samples(retain_rows, retain),
            "real": _split_samples(real_rows, REAL_FOLDER),
            "test": [
                sample
                for row in test_rows
                if row.person in forget_people
                for sample in _profile_samples(row, TEST_FOLDER, row.image("images", first=True))
                if sample.modality == "vqa"
            ],
        },
        forget_people=forget_people,
        retain_people=frozenset(row.person for row in retain_rows),
    )


def _read_profiles(folder: Path, image_column: str) -> list[Row]:
    """Profile rows (one per person, each ID once) with their image column and task columns."""
    return unique_profiles(read_rows(folder, (image_column, "ID", *_TASK_COLUMNS)), folder)


def _split_samples(rows: list[Row], folder: str) -> list[Sample]:
    return [sample for row in rows for sample in _profile_samples(row, folder, row.image("image"))]


def _profile_samples(row: Row, folder: str, image: ImageRef) -> list[Sample]:
    """Every task item of one profile row, as Samples."""
    samples: list[Sample] = []
    counts: dict[str, int] = {}

    def add(task: str, modality: str, question: str, answer: str, **mcq: Any) -> None:
        key = f"{task}-{modality}"
        counts[key] = counts.get(key, 0) + 1
        samples.append(
            Sample(
                id=f"{folder}/{row.person}/{key}/{counts[key] - 1}",
                person=row.person,
                task=task,
                modality=modality,
                question=question,
                answer=answer,
                image=image if modality == "vqa" else None,
                **mcq,
            )
        )

    tasks = row.need(row.values, "Classification_Task", "Classification_Task", dict)
    for group, modality in (("Image_Textual_Questions", "vqa"), ("Pure_Text_Questions", "qa")):
        path = f"Classification_Task.{group}"
        for k, item in enumerate(row.need(tasks, group, path, list)):
            at = f"{path}[{k}]"
            options = {
                letter: text
                for letter, text in row.need(item, "Options", f"{at}.Options", dict).items()
                if text is not None
            }
            correct = row.need(item, "Correct_Answer", f"{at}.Correct_Answer", str).strip()
            if correct not in options:
                raise row.fail(f"{at}.Correct_Answer", f"{correct!r} is not one of the options {sorted(options)}")
            add(
                "mcq",
                modality,
                row.need(item, "Question", f"{at}.Question", str),
                options[correct],
                options=options,
                correct=correct,
            )
    for column, task in (("Generation_Task", "gen"), ("Mask_Task", "cloze")):
        for k, item in enumerate(row.need(row.values, column, column, list)):
            at = f"{column}[{k}]"
            modality = _modality(row, row.need(item, "Type", f"{at}.Type", str), f"{at}.Type")
            add(
                task,
                modality,
                row.need(item, "Question", f"{at}.Question", str),
                row.need(item, "Ground_Truth", f"{at}.Ground_Truth", str),
            )
    return samples


def _modality(row: Row, kind: str, path: str) -> str:
    """``vqa`` for an ``Image_Textual`` item, ``qa`` for a ``Pure_Text`` one."""
    if kind not in _MODALITY:
        raise row.fail(path, f"Type {kind!r} is not one of {sorted(_MODALITY)}")
    return _MODALITY[kind]


def _training_samples(folder: Path) -> list[Sample]:
    """One ``qa`` Sample per metadata item of an ``ft_Data``-style folder.

    An item's optional ``Type`` sets its modality; without it (the real benchmark) the item is asked
    with the row's image. ``ID`` is optional too: without it the person is unknown (``""``).
    """
    samples = []
    for number, row in enumerate(read_rows(folder, ("image", "metadata"))):
        text = row.need(row.values, "metadata", "metadata", str)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise row.fail("metadata", f"not valid JSON ({exc})") from exc
        if not isinstance(items, list):
            raise row.fail("metadata", f"expected a JSON list, got {type(items).__name__}")
        image = row.image("image")
        for k, item in enumerate(items):
            at = f"metadata[{k}]"
            if not isinstance(item, dict):
                raise row.fail(at, f"expected a JSON object, got {type(item).__name__}")
            modality = _modality(row, item.get("Type", "Image_Textual"), f"{at}.Type")
            samples.append(
                Sample(
                    id=f"{folder.name}/{number}/qa-{modality}/{k}",
                    person=row.person,
                    task="qa",
                    modality=modality,
                    question=row.need(item, "Question", f"{at}.Question", str),
                    answer=row.need(item, "Answer", f"{at}.Answer", str),
                    image=image if modality == "vqa" else None,
                )
            )
    return samples
