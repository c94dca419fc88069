"""Reader for UMU-Bench (Wang et al.): 500 fictitious profiles + 153 real people, one row per profile.

A benchmark root holds one folder per split -- ``forget_5/10/15``, ``retain_95/90/85``,
``real_person`` -- each with one or more ``*.parquet`` files anywhere below it (read in sorted
order). Columns: ``ID, image, Biography, MM_QA, UM_QA, Classify, Cloze, Generation``. The last five
are *strings holding Python dict literals*; they are parsed with :func:`ast.literal_eval` only (a
string that is not a literal -- e.g. a call -- is rejected without running anything):

* ``MM_QA`` / ``UM_QA``: ``{'question': {k: q}, 'answer': {k: a}}`` -> training pairs asked with the
  image (``vqa``) / without it (``qa``), ``task="qa"``;
* ``Classify`` / ``Cloze`` / ``Generation``: ``{'unimodal': {k: item}, 'muitimodal': {k: item}}``
  (the key really is misspelled ``muitimodal``; ``multimodal`` is accepted too), each item
  ``{'question', 'options': {'A'..'D'}, 'answer'}`` (options only for Classify). ``muitimodal``
  items are asked with the profile image (``vqa``), ``unimodal`` ones without (``qa``).
  Classify -> ``mcq``: the answer looks like ``"B. text"`` (``"B"``, ``"B."`` and ``"(B) text"`` work
  too; an answer without a letter must equal one option's text); ``correct`` is the letter and
  ``answer`` the option's text. Cloze -> ``cloze`` and Generation -> ``gen`` with the answer text
  (a cloze answer written ``"B. text"`` against its own options becomes ``text``).

Splits: ``forget`` / ``retain`` = every task item of the profiles in the forget folder and its
complement (``forget_10`` -> ``retain_90``); ``real`` = every task item of ``real_person``;
``test``: UMU-Bench has no unseen-photo split (one image per profile), so ``test`` reuses the forget
split's ``vqa`` items (the same Sample objects) and repeats the forget numbers. ``train`` = the
MM_QA/UM_QA pairs of the forget and retain folders (together the 500 fictitious profiles), plus
``real_person``'s with ``train_real=True``.

Sample ids are ``{folder}/{ID}/{task}-{modality}/{k}`` with ``k`` the item's key in its dict, so a
unimodal and a multimodal item with the same key pair up for UMU-Bench's cross-modal metrics
(:func:`mllm_unlearn.evaluate.protocols.pair_modalities`). The protocol's own MCQ prompt and option-text
matching live in :mod:`mllm_unlearn.evaluate.protocols`.

Images stay encoded bytes (:class:`ImageRef`), decoded when used. Bad input raises
:class:`DataError` naming the file, the row (and its ID) and the column (and the path inside the dict).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from .parquet import Row, complement, read_rows, unique_profiles
from .sample import BenchmarkData, DataError, ImageRef, Sample

REAL_FOLDER = "real_person"
QA_COLUMNS = {"MM_QA": "vqa", "UM_QA": "qa"}
TASK_COLUMNS = {"Classify": "mcq", "Cloze": "cloze", "Generation": "gen"}
#: modality keys of the task dicts (``muitimodal`` is how UMU-Bench spells it)
MODALITY_KEYS = {"unimodal": "qa", "muitimodal": "vqa", "multimodal": "vqa"}
_ANSWER_LETTER = re.compile(r"\s*\(?([A-Z])\s*(?:[.:)]|$)\s*(.*)", re.DOTALL)


def read_umu(
    root: str | Path, forget: str = "forget_10", retain: str | None = None, *, train_real: bool = False
) -> BenchmarkData:
    """Read a UMU-Bench folder; ``retain`` defaults to the complement of ``forget``
    (``forget_N`` -> ``retain_{100-N}``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: benchmark folder not found")
    retain = retain or complement(root, forget)

    profile_columns = ("ID", "image", *TASK_COLUMNS)
    forget_rows = _read_profiles(root / forget, (*profile_columns, *QA_COLUMNS))
    retain_rows = _read_profiles(root / retain, (*profile_columns, *QA_COLUMNS))
    real_rows = _read_profiles(root / REAL_FOLDER, (*profile_columns, *QA_COLUMNS) if train_real else profile_columns)

    forget_items = [s for row in forget_rows for s in _profile_items(row, forget)]
    train_rows = [(forget, forget_rows), (retain, retain_rows)] + ([(REAL_FOLDER, real_rows)] if train_real else [])
    return BenchmarkData(
        name=f"UMU-Bench {root.name} ({forget} / {retain})",
        train=[s for folder, rows in train_rows for row in rows for s in _training_pairs(row, folder)],
        splits={
            "forget": forget_items,
            "retain": [s for row in retain_rows for s in _profile_items(row, retain)],
            "real": [s for row in real_rows for s in _profile_items(row, REAL_FOLDER)],
            "test": [s for s in forget_items if s.modality == "vqa"],
        },
        forget_people=frozenset(row.person for row in forget_rows),
        retain_people=frozenset(row.person for row in retain_rows),
    )


def parse_literal(row: Row, column: str) -> dict:
    """The dict literal held in ``column`` of ``row``, parsed with :func:`ast.literal_eval` only."""
    text = row.values.get(column)
    if isinstance(text, dict):  # already structured (not the published schema, but harmless)
        return text
    if not isinstance(text, str):
        problem = "missing" if text is None else f"expected a dict literal string, got {type(text).__name__}"
        raise row.fail(column, problem)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise row.fail(column, f"not a Python literal ({type(exc).__name__}: {exc}); starts {text[:60]!r}") from exc
    if not isinstance(value, dict):
        raise row.fail(column, f"expected a dict literal, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- reading


def _read_profiles(folder: Path, required: tuple[str, ...]) -> list[Row]:
    """One row per profile (each ID once) from every ``*.parquet`` under ``folder``."""
    return unique_profiles(read_rows(folder, required, wanted=()), folder)


def _get(container: dict, key: Any) -> Any:
    """``container[key]``, also under another capitalisation of a text ``key``."""
    if key in container:
        return container[key]
    if not isinstance(key, str):
        return None
    return next((v for k, v in container.items() if isinstance(k, str) and k.lower() == key.lower()), None)


def _text(row: Row, container: Any, key: Any, path: str) -> str:
    value = _get(container, key) if isinstance(container, dict) else None
    if value is None:
        raise row.fail(path, "missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric answer written as a number
    if not isinstance(value, str):
        raise row.fail(path, f"expected str, got {type(value).__name__}")
    return value.strip()


# ---------------------------------------------------------------- items


def _training_pairs(row: Row, folder: str) -> list[Sample]:
    pairs = []
    image = row.image("image")
    for column, modality in QA_COLUMNS.items():
        qa = parse_literal(row, column)
        questions, answers = _get(qa, "question"), _get(qa, "answer")
        for part, value in (("question", questions), ("answer", answers)):
            if not isinstance(value, dict):
                raise row.fail(
                    f"{column}.{part}",
                    "missing" if value is None else f"expected a dict {{k: text}}, got {type(value).__name__}",
                )
        for k in questions:
            if k not in answers:
                raise row.fail(f"{column}.answer[{k!r}]", "missing (the question has no answer)")
            pairs.append(
                Sample(
                    f"{folder}/{row.person}/qa-{modality}/{k}",
                    row.person,
                    "qa",
                    modality,
                    _text(row, {k: questions[k]}, k, f"{column}.question[{k!r}]"),
                    _text(row, {k: answers[k]}, k, f"{column}.answer[{k!r}]"),
                    image if modality == "vqa" else None,
                )
            )
    return pairs


def _options(row: Row, value: Any, path: str) -> dict[str, str]:
    if isinstance(value, (list, tuple)):
        value = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", value))
    if not isinstance(value, dict) or not value:
        raise row.fail(path, "missing" if value is None else f"expected a dict of options, got {type(value).__name__}")
    options = {}
    for letter in value:
        if not isinstance(letter, str) or not re.fullmatch(r"[A-Za-z]", letter.strip()):
            raise row.fail(path, f"option key {letter!r} is not a letter")
        options[letter.strip().upper()] = _text(row, value, letter, f"{path}.{letter}")
    return options


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def _resolve_answer(row: Row, answer: str, options: dict[str, str], path: str) -> tuple[str, str]:
    """(letter, option text) of an MCQ answer such as ``"B. text"``, ``"B"`` or the option's text."""
    by_text = [letter for letter, text in options.items() if _norm(text) == _norm(answer)]
    if len(by_text) == 1:  # first: an option's own text ("D. Smith" can be a name, not option D)
        return by_text[0], options[by_text[0]]
    match = _ANSWER_LETTER.fullmatch(answer)
    if match and match.group(1) in options:
        return match.group(1), options[match.group(1)]
    raise row.fail(path, f"{answer!r} names none of the options {sorted(options)}")


def _profile_items(row: Row, folder: str) -> list[Sample]:
    """Every Classify / Cloze / Generation item of one profile row."""
    image: ImageRef = row.image("image")
    samples = []
    for column, task in TASK_COLUMNS.items():
        groups = parse_literal(row, column)
        for group, items in groups.items():
            if group not in MODALITY_KEYS:
                raise row.fail(f"{column}.{group}", f"unknown key; expected one of {sorted(MODALITY_KEYS)}")
            modality = MODALITY_KEYS[group]
            if not isinstance(items, dict):
                raise row.fail(f"{column}.{group}", f"expected a dict {{k: item}}, got {type(items).__name__}")
            for k, item in items.items():
                at = f"{column}.{group}[{k!r}]"
                if not isinstance(item, dict):
                    raise row.fail(at, f"expected a dict item, got {type(item).__name__}")
                question = _text(row, item, "question", f"{at}.question")
                answer = _text(row, item, "answer", f"{at}.answer")
                mcq: dict[str, Any] = {}
                raw_options = _get(item, "options")
                if task == "mcq" or raw_options is not None:
                    options = _options(row, raw_options, f"{at}.options")
                    if task == "mcq":
                        letter, answer = _resolve_answer(row, answer, options, f"{at}.answer")
                        mcq = {"options": options, "correct": letter}
                    else:
                        match = _ANSWER_LETTER.fullmatch(answer)
                        if match and match.group(1) in options and match.group(2):
                            answer = options[match.group(1)]
                samples.append(
                    Sample(
                        f"{folder}/{row.person}/{task}-{modality}/{k}",
                        row.person,
                        task,
                        modality,
                        question,
                        answer,
                        image if modality == "vqa" else None,
                        **mcq,
                    )
                )
    return samples
