"""Reader for CLEAR (Dontsov et al.): TOFU's 200 fictitious authors with face photos and captions.

CLEAR is published as parquet *configs*; locally each config is one folder under the root (its name
is the config's name) holding one or more ``*.parquet`` files anywhere below it (read in sorted
order). :func:`read_clear` uses these configs:

* ``forgetNN`` / ``retain{100-NN}`` (forget ratios 1, 5, 10 %: ``forget01``/``retain99``,
  ``forget05``/``retain95``, ``forget10``/``retain90``): image rows ``image, caption, name``;
* ``<config>+tofu``: the same image rows plus TOFU text rows (``question, answer``, ``image`` null);
  read when present, for the text rows;
* ``forgetNN_perturbed`` (required) and ``retain_perturbed`` / ``retainNN_perturbed`` (optional):
  ``name, caption, perturbed_names[]`` (other columns are ignored, images are not loaded);
* ``full`` (+ ``full+tofu`` when present): the training pairs;
* ``real_faces`` (``answer, options[]``, ``image`` when present) and ``real_world``
  (``question, answer, image, options[]``): the real-world split.

A person is identified by the ``name`` column. The result:

* ``forget``: for each forget person, on the *first* of their photos, (a) the name MCQ "What is the
  name of the person in the image?" with the gold name inserted at a seeded position among the
  person's ``perturbed_names`` (as MMUnlearner scores CLEAR; options ``A``, ``B``, ... as many as
  there are names), ``task="mcq", modality="vqa"``; (b) caption generation from the photo
  (``task="gen", modality="vqa"``, answer = the caption) -- CLEAR scores it with ROUGE-L *recall*,
  which the harness reports as ``{split}_vqa_rougeL_recall``. CLEAR's public code generated these
  captions WITHOUT the image (a known bug); we always pass the image. (c) every TOFU text question
  of the ``forgetNN+tofu`` config, ``task="gen", modality="qa"``.
* ``retain``: the same for every photo of every retain person, plus the retain TOFU questions.
* ``real``: ``real_faces`` as name MCQs (``vqa`` with the photo; ``qa`` if a row has no photo) and
  ``real_world`` as MCQs (``vqa``; ``qa`` for a row without image); the gold answer is inserted at
  a seeded position among ``options`` (it is not repeated when ``options`` already hold it).
* ``test``: CLEAR has no unseen-photo split. Every photo of a person is in ``full``, the fine-tune
  set, so ``test`` holds the name MCQs and caption items on the forget people's *other* photos
  (the non-first rows of the forget config): does forgetting carry over to other photos of the same
  person? When no forget person has a second photo, ``test`` reuses the forget split's ``vqa``
  items (the same Sample objects): it then repeats the forget numbers and says nothing new.
* ``train``: every image row of ``full`` as two ``task="qa", modality="vqa"`` pairs (caption, name),
  plus every TOFU row of ``full+tofu`` as a ``qa``/``qa`` pair.

Gaps and choices where CLEAR's card is silent: a person with no ``perturbed_names`` (no row in any
perturbed config) gets :data:`FALLBACK_DISTRACTORS` other CLEAR names, drawn with the seed; a TOFU
row's person is its ``name`` when set, else the forget/retain person whose name occurs in its
question or answer, else ``""``. Images stay encoded bytes (:class:`ImageRef`), decoded when used
(:func:`mllm_unlearn.data.mllmu.check_images` decodes them all). Bad input raises :class:`DataError`
naming the file, the row (and its ``name``) and the column.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .parquet import Row, complement, read_rows
from .sample import BenchmarkData, DataError, ImageRef, Sample

#: MMUnlearner's CLEAR question
NAME_QUESTION = "What is the name of the person in the image?"
#: the question for caption generation (and the captioning training pairs)
CAPTION_QUESTION = "Describe the image."
#: how many other people's names a person without ``perturbed_names`` gets as distractors
FALLBACK_DISTRACTORS = 3
TRAIN_CONFIG = "full"
REAL_CONFIGS = ("real_faces", "real_world")
RETAIN_PERTURBED = "retain_perturbed"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class _ClearRow(Row):
    """A CLEAR row: the person is the ``name`` column (CLEAR has no IDs)."""

    @property
    def person(self) -> str:
        name = self.values.get("name")
        return name.strip() if isinstance(name, str) else ""

    def where(self, field: str) -> str:
        name = self.values.get("name")
        ident = f" (name={name!r})" if isinstance(name, str) and name else ""
        return f"{self.file} row {self.index}{ident} field '{field}'"

    def has_image(self) -> bool:
        value = self.values.get("image")
        return value is not None and not (
            isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None
        )


def read_clear(
    root: str | Path,
    forget: str = "forget05",
    retain: str | None = None,
    *,
    seed: int = 0,
    n_options: int | None = None,
    images_per_person: int | None = None,
    real: Sequence[str] = REAL_CONFIGS,
) -> BenchmarkData:
    """Read a CLEAR folder (one sub-folder per config) into a :class:`BenchmarkData`.

    ``forget`` is ``forget01``, ``forget05`` or ``forget10`` (a ``+tofu`` suffix is ignored: both
    variants are read); ``retain`` defaults to its complement (``forget05`` -> ``retain95``).
    ``seed`` fixes where the gold answer lands among the options; ``n_options`` caps the options of
    a name MCQ (gold + the first ``n_options - 1`` distinct perturbed names; ``None`` = all);
    ``images_per_person`` caps the photos per person used for ``retain`` and ``test`` (``None`` = all);
    ``real`` lists the real-world configs to read (``()`` leaves out the ``real`` split).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: benchmark folder not found")
    forget = forget.removesuffix("+tofu")
    retain = (
        retain or complement(root, forget, r"forget(\d+)", "retain{:02d}", "forgetNN: forget01, forget05, forget10")
    ).removesuffix("+tofu")
    if n_options is not None and n_options < 2:
        raise ValueError(f"n_options must be at least 2, not {n_options}")
    for name in real:
        if name not in REAL_CONFIGS:
            raise ValueError(f"unknown real-world config {name!r}; CLEAR has {REAL_CONFIGS}")

    forget_images, forget_text = _config_rows(root, forget)
    retain_images, retain_text = _config_rows(root, retain)
    train_images, train_text = _config_rows(root, TRAIN_CONFIG)
    perturbed = _perturbed_names(root, [f"{forget}_perturbed"], [RETAIN_PERTURBED, f"{retain}_perturbed"])
    forget_people = _people(forget_images)
    retain_people = _people(retain_images)
    everyone = sorted({r.person for r in train_images} | set(forget_people) | set(retain_people))
    mcq = _NameMCQ(perturbed, everyone, seed, n_options)

    forget_items, test_items = [], []
    for rows in forget_people.values():
        forget_items += _image_items(rows[0], forget, 0, mcq)
        for k, row in enumerate(_cap(rows[1:], images_per_person), start=1):
            test_items += _image_items(row, forget, k, mcq)
    if not test_items:  # one photo per forget person: no other photo to test on
        test_items = [s for s in forget_items if s.modality == "vqa"]
    forget_items += _text_items(forget_text, f"{forget}+tofu", forget_people)
    retain_items = [
        s
        for rows in retain_people.values()
        for k, row in enumerate(_cap(rows, images_per_person))
        for s in _image_items(row, retain, k, mcq)
    ]
    retain_items += _text_items(retain_text, f"{retain}+tofu", retain_people)

    splits = {"forget": forget_items, "retain": retain_items}
    real_items = [s for name in real for s in _real_items(root / name, name, seed)]
    if real:
        splits["real"] = real_items
    splits["test"] = test_items
    return BenchmarkData(
        name=f"CLEAR {root.name} ({forget} / {retain})",
        train=_train_pairs(train_images, train_text, set(everyone)),
        splits=splits,
        forget_people=frozenset(forget_people),
        retain_people=frozenset(retain_people),
    )


# ---------------------------------------------------------------- reading


def _read_rows(folder: Path, required: tuple[str, ...], wanted: tuple[str, ...] = ()) -> list[_ClearRow]:
    """The rows of a CLEAR config folder, reading only the ``required`` and ``wanted`` columns."""
    return read_rows(folder, required, wanted, row_class=_ClearRow, what="config")


def _config_rows(root: Path, config: str) -> tuple[list[_ClearRow], list[_ClearRow]]:
    """(image rows, TOFU text rows) of a config: image rows from ``config`` (or, without it, from
    ``config+tofu``), text rows from ``config+tofu`` when that folder exists."""
    plain, tofu = root / config, root / f"{config}+tofu"
    if not plain.is_dir() and not tofu.is_dir():
        raise DataError(f"{plain}: config folder is missing (and so is {tofu.name})")
    images: list[_ClearRow] = []
    text: list[_ClearRow] = []
    if plain.is_dir():
        images = _read_rows(plain, ("image", "caption", "name"))
    if tofu.is_dir():
        mixed = _read_rows(tofu, ("image", "question", "answer"), ("caption", "name"))
        text = [r for r in mixed if not r.has_image()]
        for row in text:
            row.need(row.values, "question", "question", str)
            row.need(row.values, "answer", "answer", str)
        if not plain.is_dir():
            images = [r for r in mixed if r.has_image()]
    for row in images:
        row.need(row.values, "name", "name", str)
        row.need(row.values, "caption", "caption", str)
    if not images:
        raise DataError(f"{plain}: config has no image rows")
    return images, text


def _people(rows: Iterable[_ClearRow]) -> dict[str, list[_ClearRow]]:
    """Image rows grouped by person, in order of first appearance."""
    people: dict[str, list[_ClearRow]] = {}
    for row in rows:
        if not row.person:
            raise row.fail("name", "empty name")
        people.setdefault(row.person, []).append(row)
    return people


def _perturbed_names(root: Path, required: list[str], optional: list[str]) -> dict[tuple[str, str | None], list[str]]:
    """``perturbed_names`` by ``(name, caption)`` (that photo's row) and by ``(name, None)`` (the
    person's first row), from the required and the present optional perturbed configs."""
    table: dict[tuple[str, str | None], list[str]] = {}
    configs = required + [c for c in dict.fromkeys(optional) if (root / c).is_dir() and c not in required]
    for config in configs:
        for row in _read_rows(root / config, ("name", "perturbed_names"), ("caption",)):
            name = row.need(row.values, "name", "name", str).strip()
            names = _strings(row, "perturbed_names")
            caption = row.values.get("caption")
            if isinstance(caption, str):
                table.setdefault((name, caption.strip()), names)
            table.setdefault((name, None), names)
    return table


def _strings(row: _ClearRow, column: str) -> list[str]:
    """``row``'s list-of-strings column, every element checked (the element's index named)."""
    values = row.need(row.values, column, column, list)
    for k, value in enumerate(values):
        if not isinstance(value, str):
            raise row.fail(f"{column}[{k}]", f"expected str, got {type(value).__name__}")
    return values


def _cap(rows: list, n: int | None) -> list:
    return rows if n is None else rows[:n]


# ---------------------------------------------------------------- items


def _insert_gold(
    gold: str, distractors: Iterable[str], key: str, seed: int, limit: int | None = None
) -> tuple[dict[str, str], str]:
    """Options ``A, B, ...``: the distinct distractors in order with ``gold`` inserted at a seeded
    position (the seed and ``key`` fix it); returns (options, gold letter)."""
    gold = gold.strip()
    others = [d for d in dict.fromkeys(d.strip() for d in distractors) if d and d != gold]
    if limit is not None:
        others = others[: limit - 1]
    others = others[: len(_LETTERS) - 1]
    position = random.Random(zlib.crc32(f"{seed}/{key}".encode())).randint(0, len(others))
    names = others[:position] + [gold] + others[position:]
    return dict(zip(_LETTERS, names)), _LETTERS[position]


@dataclass
class _NameMCQ:
    """Builds the name MCQ of one photo."""

    perturbed: dict[tuple[str, str | None], list[str]]
    everyone: list[str]
    seed: int
    limit: int | None

    def options(self, row: _ClearRow, key: str) -> tuple[dict[str, str], str]:
        name, caption = row.person, row.values["caption"].strip()
        distractors = self.perturbed.get((name, caption), self.perturbed.get((name, None)))
        if not distractors or all(d.strip() == name for d in distractors):
            pool = [p for p in self.everyone if p != name]
            rng = random.Random(zlib.crc32(f"{self.seed}/fallback/{key}".encode()))
            distractors = rng.sample(pool, min(FALLBACK_DISTRACTORS, len(pool)))
            if not distractors:
                raise row.fail("name", "no perturbed_names and no other person to draw distractors from")
        return _insert_gold(name, distractors, key, self.seed, self.limit)


def _image_items(row: _ClearRow, config: str, k: int, mcq: _NameMCQ) -> list[Sample]:
    """The name MCQ and the caption item on one photo (the ``k``-th of its person)."""
    image = row.image("image")
    base = f"{config}/{row.person}/{k}"
    options, letter = mcq.options(row, base)
    return [
        Sample(f"{base}/mcq-vqa", row.person, "mcq", "vqa", NAME_QUESTION, options[letter], image, options, letter),
        Sample(f"{base}/gen-vqa", row.person, "gen", "vqa", CAPTION_QUESTION, row.values["caption"].strip(), image),
    ]


def _tofu_person(row: _ClearRow, people: Iterable[str]) -> str:
    """A TOFU row's person: its ``name``, else the one person whose name its text mentions, else ``""``."""
    if row.person:
        return row.person
    text = f"{row.values['question']} {row.values['answer']}"
    found = [p for p in people if p and p in text]
    return max(found, key=len) if found else ""


def _tofu_items(rows: list[_ClearRow], id_prefix: str, task: str, people: Iterable[str]) -> list[Sample]:
    """TOFU's text-only question/answer rows as ``task`` items ``{id_prefix}/{k}/{task}-qa``."""
    people = list(people)
    return [
        Sample(f"{id_prefix}/{k}/{task}-qa", _tofu_person(row, people), task, "qa", *_question_answer(row))
        for k, row in enumerate(rows)
    ]


def _question_answer(row: _ClearRow) -> tuple[str, str]:
    return row.values["question"].strip(), row.values["answer"].strip()


def _text_items(rows: list[_ClearRow], config: str, people: Iterable[str]) -> list[Sample]:
    return _tofu_items(rows, config, "gen", people)


def _train_pairs(images: list[_ClearRow], text: list[_ClearRow], people: set[str]) -> list[Sample]:
    pairs = []
    for k, row in enumerate(images):
        image = row.image("image")
        base = f"{TRAIN_CONFIG}/{row.person}/{k}"
        pairs.append(
            Sample(
                f"{base}/qa-vqa/caption",
                row.person,
                "qa",
                "vqa",
                CAPTION_QUESTION,
                row.values["caption"].strip(),
                image,
            )
        )
        pairs.append(Sample(f"{base}/qa-vqa/name", row.person, "qa", "vqa", NAME_QUESTION, row.person, image))
    pairs += _tofu_items(text, f"{TRAIN_CONFIG}+tofu", "qa", people)
    return pairs


def _real_items(folder: Path, config: str, seed: int) -> list[Sample]:
    """MCQs of ``real_faces`` (name of a real person) or ``real_world`` (a question about a photo)."""
    required = ("answer", "options") if config == "real_faces" else ("question", "answer", "image", "options")
    rows = _read_rows(folder, required, ("image", "question"))
    items = []
    for k, row in enumerate(rows):
        answer = row.need(row.values, "answer", "answer", str).strip()
        distractors = _strings(row, "options")
        question = row.values.get("question")
        if question is None and config == "real_faces":
            question = NAME_QUESTION
        if not isinstance(question, str):
            problem = "missing" if question is None else f"expected str, got {type(question).__name__}"
            raise row.fail("question", problem)
        key = f"{config}/{k}"
        options, letter = _insert_gold(answer, distractors, key, seed)
        if len(options) < 2:
            raise row.fail("options", "no option other than the answer")
        image: ImageRef | None = row.image("image") if row.has_image() else None
        modality = "vqa" if image is not None else "qa"
        person = answer if config == "real_faces" else ""
        items.append(
            Sample(f"{key}/mcq-{modality}", person, "mcq", modality, question.strip(), answer, image, options, letter)
        )
    return items
