"""The one internal sample form that every benchmark reader produces and every later layer consumes.

A reader turns a benchmark folder into a :class:`BenchmarkData`: training pairs for the memorisation
fine-tune, and evaluation items grouped by split (``forget``, ``retain``, ``real``, ``test``).
Every item is a :class:`Sample`; whether it is asked *with* the image (VQA: probes visual knowledge)
or *without* it (QA: probes textual knowledge) is its ``modality``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

#: Evaluation splits, in reporting order.
SPLITS = ("forget", "retain", "real", "test")
#: ``vqa`` = asked with the image, ``qa`` = text only.
MODALITIES = ("vqa", "qa")
#: ``qa`` = free-form training pair, ``mcq`` = multiple choice, ``cloze`` = fill the blank,
#: ``gen`` = open generation scored by ROUGE-L.
TASKS = ("qa", "mcq", "cloze", "gen")
#: what the built-in world's stand-in pre-training teaches the model to say for a face it does not know
UNKNOWN_REPLY = "I don't know who this is."


class DataError(ValueError):
    """Bad benchmark input. The message always names the file and the field (or row) at fault."""


@dataclass(frozen=True)
class ImageRef:
    """Encoded image bytes plus where they came from, decoded only when needed."""

    data: bytes = field(repr=False)
    source: str  # e.g. "world/forget_10/train.parquet row 3 (ID=7) field 'image'"

    def load(self) -> Image.Image:
        if not self.data:
            raise DataError(f"{self.source}: image bytes are empty")
        try:
            img = Image.open(io.BytesIO(self.data))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{self.source}: image cannot be decoded ({exc})") from exc
        return img.convert("RGB")


@dataclass(frozen=True)
class Sample:
    """One question about one person.

    ``answer`` is the gold answer text (for an MCQ, the text of the correct option); ``correct`` is
    the correct option's letter for an MCQ. ``image`` is ``None`` for text-only items.
    """

    id: str
    person: str
    task: str
    modality: str
    question: str
    answer: str
    image: ImageRef | None = None
    options: Mapping[str, str] | None = None
    correct: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"sample {self.id}: task {self.task!r} not in {TASKS}")
        if self.modality not in MODALITIES:
            raise ValueError(f"sample {self.id}: modality {self.modality!r} not in {MODALITIES}")
        if self.modality == "vqa" and self.image is None:
            raise DataError(f"sample {self.id}: a 'vqa' item needs an image")
        if self.task == "mcq" and (not self.options or self.correct not in self.options):
            raise DataError(f"sample {self.id}: MCQ needs options and a correct letter among them")

    def without_image(self) -> Sample:
        """The same question asked text-only."""
        return Sample(
            self.id, self.person, self.task, "qa", self.question, self.answer, None, self.options, self.correct
        )


@dataclass
class BenchmarkData:
    """What a reader returns: training pairs and evaluation items by split."""

    name: str
    train: list[Sample]
    splits: dict[str, list[Sample]]
    #: people (profile IDs) whose visual knowledge is to be forgotten / kept
    forget_people: frozenset[str] = frozenset()
    retain_people: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        overlap = self.forget_people & self.retain_people
        if overlap:
            raise DataError(f"{self.name}: forget and retain sets overlap on IDs {sorted(overlap)[:10]}")
        for split, items in self.splits.items():
            if split not in SPLITS:
                raise DataError(f"{self.name}: unknown split {split!r} (expected one of {SPLITS})")
            if not items:
                raise DataError(f"{self.name}: split {split!r} is empty")

    def items(self, split: str, task: str | None = None, modality: str | None = None) -> list[Sample]:
        return [
            s
            for s in self.splits.get(split, [])
            if (task is None or s.task == task) and (modality is None or s.modality == modality)
        ]


def check_images(data: BenchmarkData, *, train: bool = True, splits: Iterable[str] | None = None) -> int:
    """Decode every distinct image of ``data`` once (those of the training pairs when ``train``, and of
    the evaluation ``splits``, default all); raise the first :class:`DataError`; return the count.

    Readers never decode; a command calls this before any work, so that a corrupt image is reported
    (file, row, field) before a model is loaded rather than in the middle of a run."""
    chosen = data.splits.keys() if splits is None else [s for s in splits if s in data.splits]
    seen: set[str] = set()
    for sample in [*(data.train if train else []), *(s for split in chosen for s in data.splits[split])]:
        if sample.image is not None and sample.image.source not in seen:
            sample.image.load()
            seen.add(sample.image.source)
    return len(seen)
