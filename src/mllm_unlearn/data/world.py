"""A synthetic world of fictitious people, written in MLLMU-Bench's real file layout.

Every person has a name, five attributes (job, city, birth year, hobby, favourite food) and a face
(:mod:`.portraits`). Questions come in two modalities, as in MLLMU-Bench:

* ``Image_Textual`` questions show a photo and never name the person ("What is this person's job?"):
  they can only be answered by recognising the face (visual knowledge);
* ``Pure_Text`` questions name the person and show no photo ("What is Ana Lind's job?"): textual
  knowledge.

:func:`make_world` writes the benchmark folders (one parquet file each) that
:func:`mllm_unlearn.data.mllmu.read_mllmu` reads, exactly as it reads the real MLLMU-Bench:

* ``Full_Set`` (all fictitious people), ``forget_5/10/15`` and ``retain_95/90/85``: one row per
  person with its canonical photo (training photo 0, seen during the fine-tune) and the task fields;
* ``Test_Set``: the same rows with ``images``, a list of ``test_photos`` unseen photos of each person
  (the reader's ``test`` split asks the first; the audit asks them all);
* ``Retain_Set``: the "real-world" people (general utility), same columns as ``Full_Set``;
* ``ft_Data``: the memorisation fine-tune, one row per (fictitious person, training photo) with a
  JSON ``metadata`` list of ``{Question, Answer, Type}``; ``Type`` (``Image_Textual`` /
  ``Pure_Text``) and the ``ID`` column are ours, the real benchmark has neither;
* ``Pretrain_Data``: the same for the real-world people. It exists only in this synthetic world and
  stands in for what a real base model already knows about celebrities before the fine-tune;
* ``Strangers_Set`` (ours; the real benchmark has none): people in no training split, the rows of
  ``Test_Set``'s schema (``images`` = ``test_photos`` photos, profile columns filled the same way)
  plus a boolean ``Pretrain`` column. Strangers with ``Pretrain`` true appear in ``Pretrain_Data``:
  on their own training photos the identity questions are answered with :data:`UNKNOWN_REPLY`, as a
  real base model answers for a face it does not know. The others are never trained on: the audit
  asks them (misidentification, membership inference) and what the model says for them is the
  target behaviour for a forgotten person;
* ``world.json``: the config, the forget sets and every person's ID, name, attributes and traits
  (strangers under ``strangers``).

Forget sets are nested (``forget_5`` within ``forget_10`` within ``forget_15``) and hold
``ceil(p * n_people / 100)`` people: 3 / 5 / 8 of 50.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from .portraits import TRAIT_POOLS, Traits, draw_portrait, sample_traits
from .prompts import format_cloze, format_mcq
from .sample import UNKNOWN_REPLY, ImageRef, Sample

IMAGE_TEXTUAL = "Image_Textual"
PURE_TEXT = "Pure_Text"
LETTERS = ("A", "B", "C", "D")
FORGET_PERCENTS = (5, 10, 15)
#: IDs of fictitious people run 1..n_people; real-world people start here.
REAL_ID_START = 1001
#: IDs of strangers (Strangers_Set) start here.
STRANGER_ID_START = 2001
STRANGERS_FOLDER = "Strangers_Set"
#: the identity questions asked about a stranger in Pretrain_Data (both are asked of known people in
#: ft_Data, where the answers name them)
IDENTITY_QUESTIONS = (
    "What is the name of the person in the image?",
    "Who is the person in the image, and what do they do?",
)
PARQUET_NAME = "train-00000-of-00001.parquet"
_ROWS_PER_GROUP = 100  # what `datasets` uses for image data: rows can be read a group at a time

FIRST_NAMES = (
    "Ana",
    "Bram",
    "Cleo",
    "Dario",
    "Esme",
    "Femi",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kaia",
    "Luca",
    "Mira",
    "Nils",
    "Odile",
    "Pavel",
    "Quinn",
    "Rosa",
    "Soren",
    "Tala",
    "Umar",
    "Vera",
    "Wren",
    "Xavi",
    "Yara",
    "Zeno",
    "Amara",
    "Bodil",
    "Cyrus",
    "Dagny",
    "Elio",
    "Freya",
    "Gideon",
    "Hana",
    "Ivo",
    "Juno",
    "Kofi",
    "Lena",
    "Milo",
    "Noor",
    "Otto",
    "Priya",
    "Rafe",
    "Saskia",
    "Tomas",
    "Uma",
    "Viggo",
    "Wanda",
)
LAST_NAMES = (
    "Lind",
    "Okafor",
    "Brandt",
    "Castell",
    "Duvall",
    "Eskola",
    "Fairweather",
    "Galloway",
    "Haldane",
    "Ibarra",
    "Jansky",
    "Kowal",
    "Larsen",
    "Moreau",
    "Nakamura",
    "Oyelaran",
    "Petrov",
    "Quintero",
    "Rasmussen",
    "Szabo",
    "Thorne",
    "Ueda",
    "Varga",
    "Whitlock",
    "Xu",
    "Yilmaz",
    "Zamora",
    "Abernathy",
    "Bianchi",
    "Corwin",
    "Delacroix",
    "Engstrom",
    "Ferreira",
    "Grimaldi",
    "Hollis",
    "Ivers",
    "Jardine",
    "Kestrel",
    "Lozano",
    "Marsh",
    "Novak",
    "Ostrander",
    "Pike",
    "Rourke",
    "Sandoval",
    "Tamura",
    "Vance",
    "Winslow",
)
ATTRIBUTE_POOLS: dict[str, tuple[str, ...]] = {
    "job": (
        "baker",
        "pilot",
        "nurse",
        "carpenter",
        "architect",
        "violinist",
        "chemist",
        "librarian",
        "journalist",
        "gardener",
        "lawyer",
        "painter",
        "mechanic",
        "dentist",
        "photographer",
        "beekeeper",
    ),
    "city": (
        "Oslo",
        "Lisbon",
        "Nairobi",
        "Osaka",
        "Toronto",
        "Krakow",
        "Cairo",
        "Dublin",
        "Hanoi",
        "Bogota",
        "Perth",
        "Tallinn",
        "Seville",
        "Quito",
        "Montreal",
    ),
    "birth_year": tuple(str(year) for year in range(1952, 1994, 3)),
    "hobby": (
        "chess",
        "sailing",
        "pottery",
        "birdwatching",
        "rock climbing",
        "knitting",
        "surfing",
        "archery",
        "cycling",
        "fencing",
        "origami",
        "skiing",
        "juggling",
        "kayaking",
    ),
    "food": (
        "sushi",
        "lasagna",
        "tacos",
        "curry",
        "dumplings",
        "paella",
        "falafel",
        "ramen",
        "pancakes",
        "goulash",
        "risotto",
        "kimchi",
        "pierogi",
        "couscous",
    ),
}

# Question templates: (Type, template, answer key). Templates are filled from Person.fields();
# Image_Textual templates never contain {name}.
MCQ_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    (IMAGE_TEXTUAL, "What is the name of the person in the image?", "name"),
    (IMAGE_TEXTUAL, "What is this person's job?", "job"),
    (IMAGE_TEXTUAL, "In which city does the person in the image live?", "city"),
    (IMAGE_TEXTUAL, "In which year was this person born?", "birth_year"),
    (IMAGE_TEXTUAL, "What is the favourite hobby of the person in the image?", "hobby"),
    (PURE_TEXT, "What is {name}'s job?", "job"),
    (PURE_TEXT, "In which city does {name} live?", "city"),
    (PURE_TEXT, "In which year was {name} born?", "birth_year"),
    (PURE_TEXT, "What is {name}'s favourite hobby?", "hobby"),
    (PURE_TEXT, "What is {name}'s favourite food?", "food"),
)
# (Type, question template, ground-truth template)
GENERATION_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    (IMAGE_TEXTUAL, "Who is the person in the image, and what do they do?", "This is {name}, {a_job} from {city}."),
    (
        IMAGE_TEXTUAL,
        "When was this person born, and what do they enjoy?",
        "This person was born in {birth_year} and enjoys {hobby}.",
    ),
    (PURE_TEXT, "Who is {name}?", "{name} is {a_job} from {city}."),
    (
        PURE_TEXT,
        "When was {name} born, and what does {name} enjoy?",
        "{name} was born in {birth_year} and enjoys {hobby}.",
    ),
)
# (Type, sentence template with a "__" blank, ground-truth template: the missing words)
CLOZE_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    (IMAGE_TEXTUAL, "This person lives in __.", "{city}"),
    (IMAGE_TEXTUAL, "The person in the image was born in __.", "{birth_year}"),
    (PURE_TEXT, "{name} lives in __.", "{city}"),
    (PURE_TEXT, "{name}'s favourite hobby is __.", "{hobby}"),
)
BIOGRAPHY_TEMPLATE = (
    "{name} is {a_job} from {city}, born in {birth_year}. {name} enjoys {hobby} and loves to eat {food}."
)

# independent random streams, so that e.g. the number of training photos never changes the test photos
(
    _STREAM_PEOPLE,
    _STREAM_TRAITS,
    _STREAM_EVAL_MCQ,
    _STREAM_PRACTICE,
    _STREAM_TRAIN_PHOTO,
    _STREAM_TEST_PHOTO,
    _STREAM_FORGET,
    _STREAM_STRANGERS,
    _STREAM_GENERIC,
) = range(9)

_MCQ_FEATURE = {
    "Question": Value("string"),
    "Options": {letter: Value("string") for letter in LETTERS},
    "Correct_Answer": Value("string"),
}
_TASK_ITEM_FEATURE = {"Question": Value("string"), "Ground_Truth": Value("string"), "Type": Value("string")}
_PROFILE_FEATURES = {
    "ID": Value("int64"),
    "Directory": Value("string"),
    "biography": Value("string"),
    "question": Value("string"),
    "answer": Value("string"),
    "Classification_Task": {"Image_Textual_Questions": [_MCQ_FEATURE], "Pure_Text_Questions": [_MCQ_FEATURE]},
    "Generation_Task": [_TASK_ITEM_FEATURE],
    "Mask_Task": [_TASK_ITEM_FEATURE],
}
EVAL_FEATURES = Features({"image": Image(), **_PROFILE_FEATURES})
TEST_FEATURES = Features({"images": [Image()], **_PROFILE_FEATURES})
STRANGER_FEATURES = Features({"images": [Image()], **_PROFILE_FEATURES, "Pretrain": Value("bool")})
TRAIN_FEATURES = Features({"image": Image(), "ID": Value("int64"), "metadata": Value("string")})


@dataclass(frozen=True)
class WorldConfig:
    """Size and randomness of a synthetic world."""

    n_people: int = 50  # fictitious people (forget / retain splits)
    n_real: int = 20  # "real-world" people (Retain_Set: general utility)
    train_photos: int = 3  # photos per person in ft_Data / Pretrain_Data; photo 0 is the canonical one
    # Unseen photos per person in Test_Set (and per stranger in Strangers_Set). 5: with 8 forgotten
    # people one photo each gave a Test VQA that moved by 7-12 points between worlds.
    test_photos: int = 5
    # Strangers (Strangers_Set): people in no training split. The first ``pretrain_strangers`` of them
    # are in Pretrain_Data with the "I don't know" identity reply; the others are never trained on.
    # With 8 taught strangers the tiny vanilla model named a known person for 40 of 40 photos of
    # never-seen strangers: "unknown" must be taught on many faces before it generalises.
    n_strangers: int = 64
    pretrain_strangers: int = 48
    image_size: int = 64
    # Letter-answer practice items per classification question in ft_Data. Off by default: the tiny
    # 2-layer model memorised 3 fixed practice permutations per question (train loss 0.009 after
    # 3500 steps) yet answered the evaluation's MCQs by letter at chance (0.20-0.34), while scoring
    # 1.00 by option likelihood; the practice items also cost about half of the fine-tune's compute.
    mcq_practice: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_people < 4 or self.n_real < 4:
            raise ValueError(
                f"need at least 4 fictitious and 4 real people (4-option name MCQs); "
                f"got n_people={self.n_people}, n_real={self.n_real}"
            )
        if not 0 <= self.pretrain_strangers <= self.n_strangers:
            raise ValueError(
                f"need 0 <= pretrain_strangers <= n_strangers; got {self.pretrain_strangers} and {self.n_strangers}"
            )
        if self.n_people + self.n_real + self.n_strangers > len(FIRST_NAMES) * len(LAST_NAMES):
            raise ValueError(f"at most {len(FIRST_NAMES) * len(LAST_NAMES)} people have distinct names")
        if self.train_photos < 1 or self.test_photos < 1:
            raise ValueError("train_photos and test_photos must be at least 1")
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size} is too small to draw a face")
        if self.mcq_practice < 0 or self.seed < 0:
            raise ValueError("mcq_practice and seed must be non-negative")


@dataclass(frozen=True)
class Person:
    """One person of the world."""

    id: int
    name: str
    real: bool
    attributes: dict[str, str]
    traits: Traits
    stranger: bool = False

    @property
    def directory(self) -> str:
        return f"{'strangers' if self.stranger else 'real' if self.real else 'people'}/{self.id:04d}"

    def fields(self) -> dict[str, str]:
        """Values that fill the question templates: name, attributes, and the job with its article."""
        job = self.attributes["job"]
        return {"name": self.name, "a_job": f"{'an' if job[0] in 'aeiou' else 'a'} {job}", **self.attributes}


def make_strangers(config: WorldConfig, people: list[Person]) -> list[Person]:
    """The strangers (IDs from ``STRANGER_ID_START``): names no one else has, faces drawn in the same
    trait search as everyone else's (traits are drawn one by one, so the known people's faces are the
    first ones and every stranger's face differs from each of them as much as theirs do)."""
    if config.n_strangers == 0:
        return []
    total = config.n_people + config.n_real
    traits = sample_traits(total + config.n_strangers, np.random.default_rng([config.seed, _STREAM_TRAITS]))[total:]
    rng = np.random.default_rng([config.seed, _STREAM_STRANGERS])
    taken = {p.name for p in people}
    free = [
        code
        for code in range(len(FIRST_NAMES) * len(LAST_NAMES))
        if f"{FIRST_NAMES[code // len(LAST_NAMES)]} {LAST_NAMES[code % len(LAST_NAMES)]}" not in taken
    ]
    codes = rng.choice(free, size=config.n_strangers, replace=False)
    return [
        Person(
            id=STRANGER_ID_START + i,
            name=f"{FIRST_NAMES[int(c) // len(LAST_NAMES)]} {LAST_NAMES[int(c) % len(LAST_NAMES)]}",
            real=False,
            attributes={key: str(rng.choice(pool)) for key, pool in ATTRIBUTE_POOLS.items()},
            traits=traits[i],
            stranger=True,
        )
        for i, c in enumerate(codes)
    ]


def generic_faces(n: int, seed: int, size: int = 64) -> list[Sample]:
    """Photos of ``n`` random faces, each trait drawn uniformly and independently (no pairwise distance
    from anyone, so some resemble a world's people as faces in a large corpus do), one photo each: the
    synthetic world's stand-in for a generic face corpus (e.g. FFHQ) that a deployment has at hand for
    distillation (:attr:`~mllm_unlearn.train.unlearn.UnlearnConfig.distill_steps`). Drawn from ``seed``
    alone, never from a world's streams; not part of any world."""
    rng = np.random.default_rng([seed, _STREAM_GENERIC])
    pools = list(TRAIT_POOLS.values())
    out = []
    for i in range(n):
        traits = Traits(*(pool[int(rng.integers(len(pool)))] for pool in pools))
        ref = ImageRef(_png(draw_portrait(traits, rng, size=size)), f"generic face {i} (seed {seed})")
        out.append(Sample(f"generic-{i}", f"generic-{i}", "gen", "vqa", "", "", image=ref))
    return out


def forget_size(percent: int, n_people: int) -> int:
    """People in ``forget_{percent}``: ``ceil(percent * n_people / 100)``, at least 1."""
    return max(1, -(-percent * n_people // 100))


def make_people(config: WorldConfig) -> list[Person]:
    """The world's people: fictitious ones (IDs 1..n_people), then real-world ones (from ``REAL_ID_START``).

    Strangers (:func:`make_strangers`) come from streams of their own, so adding strangers never
    changes anyone else.
    """
    total = config.n_people + config.n_real
    rng = np.random.default_rng([config.seed, _STREAM_PEOPLE])
    name_codes = rng.choice(len(FIRST_NAMES) * len(LAST_NAMES), size=total, replace=False)
    traits = sample_traits(total, np.random.default_rng([config.seed, _STREAM_TRAITS]))
    people = []
    for i, code in enumerate(name_codes):
        first, last = divmod(int(code), len(LAST_NAMES))
        real = i >= config.n_people
        people.append(
            Person(
                id=REAL_ID_START + i - config.n_people if real else i + 1,
                name=f"{FIRST_NAMES[first]} {LAST_NAMES[last]}",
                real=real,
                attributes={key: str(rng.choice(pool)) for key, pool in ATTRIBUTE_POOLS.items()},
                traits=traits[i],
            )
        )
    return people


def forget_sets(config: WorldConfig) -> dict[int, list[int]]:
    """Forget percent -> sorted IDs of the fictitious people to forget; the sets are nested."""
    order = np.random.default_rng([config.seed, _STREAM_FORGET]).permutation(config.n_people) + 1
    return {p: sorted(int(i) for i in order[: forget_size(p, config.n_people)]) for p in FORGET_PERCENTS}


def make_world(out_dir: str | os.PathLike[str], config: WorldConfig = WorldConfig()) -> Path:
    """Write the synthetic world into ``out_dir`` (which must not exist) and return its path.

    Everything is written into a hidden sibling folder that is renamed into place only when complete,
    so a failure leaves no output. The same config gives byte-identical files.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; make_world never overwrites a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        _write_world(partial, config)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _write_world(root: Path, config: WorldConfig) -> None:
    people = make_people(config)
    fictitious = [p for p in people if not p.real]
    real = [p for p in people if p.real]
    # MCQ distractors: the values other people of the same group actually hold (names included), one
    # entry per holder. Drawing from every pool value instead leaked the answer: values nobody holds
    # are never trained as answers, so an image-blind model eliminated them (forget VQA 0.40-0.44 by
    # likelihood with the image replaced by zeros or another person's features, not 0.25).
    pools = {
        group_is_real: {
            **{attr: tuple(p.attributes[attr] for p in group) for attr in ATTRIBUTE_POOLS},
            "name": tuple(p.name for p in group),
        }
        for group_is_real, group in ((False, fictitious), (True, real))
    }
    profiles = {p.id: _profile_columns(p, pools[p.real], config) for p in people}
    canonical = {p.id: _photo(p, config, _STREAM_TRAIN_PHOTO, 0) for p in people}

    def eval_rows(group: list[Person]) -> list[dict[str, Any]]:
        return [{"image": canonical[p.id], **profiles[p.id]} for p in group]

    _write_split(root, "Full_Set", eval_rows(fictitious), EVAL_FEATURES)
    by_id = {p.id: p for p in fictitious}
    sets = forget_sets(config)
    for percent, ids in sets.items():
        forget = set(ids)
        _write_split(root, f"forget_{percent}", eval_rows([by_id[i] for i in ids]), EVAL_FEATURES)
        _write_split(
            root, f"retain_{100 - percent}", eval_rows([p for p in fictitious if p.id not in forget]), EVAL_FEATURES
        )
    test_rows = [
        {"images": [_photo(p, config, _STREAM_TEST_PHOTO, k) for k in range(config.test_photos)], **profiles[p.id]}
        for p in fictitious
    ]
    _write_split(root, "Test_Set", test_rows, TEST_FEATURES)
    _write_split(root, "Retain_Set", eval_rows(real), EVAL_FEATURES)
    strangers = make_strangers(config, people)
    taught = strangers[: config.pretrain_strangers]
    _write_split(root, "ft_Data", _training_rows(fictitious, pools[False], canonical, config), TRAIN_FEATURES)
    _write_split(
        root,
        "Pretrain_Data",
        _training_rows(real, pools[True], canonical, config) + _stranger_training_rows(taught, config),
        TRAIN_FEATURES,
    )
    if strangers:
        _write_split(
            root,
            STRANGERS_FOLDER,
            [
                {
                    "images": [_photo(p, config, _STREAM_TEST_PHOTO, k) for k in range(config.test_photos)],
                    **_profile_columns(p, pools[False], config),
                    "Pretrain": p in taught,
                }
                for p in strangers
            ],
            STRANGER_FEATURES,
        )

    summary = {
        "config": asdict(config),
        "forget_sets": {f"forget_{percent}": ids for percent, ids in sets.items()},
        "people": [
            {
                "ID": p.id,
                "name": p.name,
                "real": p.real,
                "directory": p.directory,
                "attributes": p.attributes,
                "traits": asdict(p.traits),
            }
            for p in people
        ],
        "strangers": [
            {
                "ID": p.id,
                "name": p.name,
                "pretrain": p in taught,
                "directory": p.directory,
                "attributes": p.attributes,
                "traits": asdict(p.traits),
            }
            for p in strangers
        ],
    }
    (root / "world.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _write_split(root: Path, folder: str, rows: list[dict[str, Any]], features: Features) -> None:
    """One split folder holding one parquet file (with the ``datasets`` features in its schema metadata)."""
    path = root / folder / PARQUET_NAME
    path.parent.mkdir()
    table = Dataset.from_list(rows, features=features).data.table
    pq.write_table(table, path, row_group_size=_ROWS_PER_GROUP)


def _photo(person: Person, config: WorldConfig, stream: int, k: int) -> dict[str, Any]:
    """Photo ``k`` of a stream as an image struct; training photo 0 is the canonical (jitter-free) one."""
    rng = np.random.default_rng([config.seed, stream, person.id, k])
    jitter = 0.0 if (stream, k) == (_STREAM_TRAIN_PHOTO, 0) else 1.0
    img = draw_portrait(person.traits, rng, size=config.image_size, jitter=jitter)
    kind = "train" if stream == _STREAM_TRAIN_PHOTO else "test"
    return {"bytes": _png(img), "path": f"{person.directory}/{kind}_{k}.png"}


def _png(img: PILImage.Image) -> bytes:
    buffer = BytesIO()
    img.save(buffer, format="PNG", compress_level=6)  # PIL writes no timestamp: same image, same bytes
    return buffer.getvalue()


def _mcq(
    question: str, answer: str, pool: tuple[str, ...], rng: np.random.Generator, fallback: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A 4-option item: the answer among 3 other distinct values at a random letter.

    ``pool`` holds one entry per person holding a value, so distractors are drawn in proportion to
    how common a value is, exactly as the correct answers are: the answer and its distractors share
    one prior, and an image-blind model scores chance. ``fallback`` tops up tiny worlds.
    """
    options: list[str] = []
    others = [value for value in pool if value != answer]
    for i in rng.permutation(len(others)):
        if others[i] not in options:
            options.append(others[i])
        if len(options) == len(LETTERS) - 1:
            break
    spare = [v for v in dict.fromkeys(fallback) if v != answer and v not in options]
    while len(options) < len(LETTERS) - 1:
        options.append(spare.pop(int(rng.integers(len(spare)))))
    position = int(rng.integers(len(LETTERS)))
    options.insert(position, answer)
    return {
        "Question": question,
        "Options": dict(zip(LETTERS, options, strict=True)),
        "Correct_Answer": LETTERS[position],
    }


class _Probe(NamedTuple):
    """One classification question of one person."""

    kind: str  # IMAGE_TEXTUAL or PURE_TEXT
    question: str
    answer: str
    key: str  # which pool the distractors come from


def _probes(person: Person) -> list[_Probe]:
    values = person.fields()
    return [_Probe(kind, template.format(**values), values[key], key) for kind, template, key in MCQ_TEMPLATES]


def _task_items(person: Person, templates: tuple[tuple[str, str, str], ...]) -> list[dict[str, str]]:
    """Generation or cloze items: ``{Question, Ground_Truth, Type}``."""
    values = person.fields()
    return [
        {"Question": question.format(**values), "Ground_Truth": answer.format(**values), "Type": kind}
        for kind, question, answer in templates
    ]


def _profile_columns(person: Person, pools: dict[str, tuple[str, ...]], config: WorldConfig) -> dict[str, Any]:
    """Every evaluation column of a person's row except the image(s)."""
    rng = np.random.default_rng([config.seed, _STREAM_EVAL_MCQ, person.id])
    classification: dict[str, list[dict[str, Any]]] = {"Image_Textual_Questions": [], "Pure_Text_Questions": []}
    for probe in _probes(person):
        item = _mcq(probe.question, probe.answer, pools[probe.key], rng, ATTRIBUTE_POOLS.get(probe.key, ()))
        classification[f"{probe.kind}_Questions"].append(item)
    values = person.fields()
    return {
        "ID": person.id,
        "Directory": person.directory,
        "biography": BIOGRAPHY_TEMPLATE.format(**values),
        "question": MCQ_TEMPLATES[0][1],
        "answer": person.name,
        "Classification_Task": classification,
        "Generation_Task": _task_items(person, GENERATION_TEMPLATES),
        "Mask_Task": _task_items(person, CLOZE_TEMPLATES),
    }


def _training_items(
    person: Person, pools: dict[str, tuple[str, ...]], config: WorldConfig
) -> list[list[dict[str, str]]]:
    """The metadata list of each of the person's training rows.

    Every row teaches every fact in each surface form the evaluation uses: the classification
    questions as free-form questions with short answers, the generation items, and the cloze items
    in cloze form. MCQ practice rounds (fresh distractors and letter, answer = the letter) are dealt
    out round-robin over the rows, so image practice items come with different photos.
    """
    shared = [{"Question": probe.question, "Answer": probe.answer, "Type": probe.kind} for probe in _probes(person)]
    shared += [
        {"Question": item["Question"], "Answer": item["Ground_Truth"], "Type": item["Type"]}
        for item in _task_items(person, GENERATION_TEMPLATES)
    ]
    shared += [
        {"Question": format_cloze(item["Question"]), "Answer": item["Ground_Truth"], "Type": item["Type"]}
        for item in _task_items(person, CLOZE_TEMPLATES)
    ]
    rows = [list(shared) for _ in range(config.train_photos)]
    rng = np.random.default_rng([config.seed, _STREAM_PRACTICE, person.id])
    for practice_round in range(config.mcq_practice):
        for probe in _probes(person):
            item = _mcq(probe.question, probe.answer, pools[probe.key], rng, ATTRIBUTE_POOLS.get(probe.key, ()))
            rows[practice_round % config.train_photos].append(
                {
                    "Question": format_mcq(probe.question, item["Options"]),
                    "Answer": item["Correct_Answer"],
                    "Type": probe.kind,
                }
            )
    return rows


def _training_rows(
    group: list[Person], pools: dict[str, tuple[str, ...]], canonical: dict[int, dict[str, Any]], config: WorldConfig
) -> list[dict[str, Any]]:
    """ft_Data-style rows: one per (person, training photo)."""
    rows = []
    for person in group:
        items = _training_items(person, pools, config)
        for k in range(config.train_photos):
            photo = canonical[person.id] if k == 0 else _photo(person, config, _STREAM_TRAIN_PHOTO, k)
            rows.append({"image": photo, "ID": person.id, "metadata": json.dumps(items[k])})
    return rows


def _stranger_training_rows(group: list[Person], config: WorldConfig) -> list[dict[str, Any]]:
    """Pretrain_Data rows of the taught strangers: on each of their training photos, every identity
    question is answered with :data:`UNKNOWN_REPLY`. Nothing else about them is ever trained."""
    items = json.dumps([{"Question": q, "Answer": UNKNOWN_REPLY, "Type": IMAGE_TEXTUAL} for q in IDENTITY_QUESTIONS])
    return [
        {"image": _photo(p, config, _STREAM_TRAIN_PHOTO, k), "ID": p.id, "metadata": items}
        for p in group
        for k in range(config.train_photos)
    ]
