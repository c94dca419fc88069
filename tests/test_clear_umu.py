"""CLEAR and UMU-Bench readers on small fixtures written in the benchmarks' published schemas,
UMU-Bench's protocol functions, the reader registry, and an end-to-end pass through the harness."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mllm_unlearn.data.clear import CAPTION_QUESTION, FALLBACK_DISTRACTORS, NAME_QUESTION, read_clear
from mllm_unlearn.data.mllmu import check_images, read_mllmu
from mllm_unlearn.data.readers import READERS, read_benchmark
from mllm_unlearn.data.sample import BenchmarkData, DataError
from mllm_unlearn.data.umu import read_umu
from mllm_unlearn.evaluate.harness import EvalConfig, score_items
from mllm_unlearn.evaluate.protocols import cross_modal, match_option_text, pair_modalities, umu_mcq_body
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.tiny import corpus_for, make_tiny_model

from .conftest import SMALL

torch.set_num_threads(1)

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PARQUET = "train-00000-of-00001.parquet"


def png_bytes(seed: int) -> bytes:
    img = Image.new("RGB", (16, 16), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image(seed: int, path: str = "") -> dict:
    return {"bytes": png_bytes(seed), "path": path or f"{seed}.png"}


def write(folder: Path, rows: list[dict], schema: pa.Schema, name: str = PARQUET) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / name
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), file)
    return file


# ================================================================ CLEAR fixture

CLEAR_IMAGE_SCHEMA = pa.schema([("image", IMAGE), ("caption", pa.string()), ("name", pa.string())])
CLEAR_TOFU_SCHEMA = pa.schema(
    [
        ("image", IMAGE),
        ("caption", pa.string()),
        ("name", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
    ]
)
CLEAR_PERTURBED_SCHEMA = pa.schema(
    [
        ("image", IMAGE),
        ("caption", pa.string()),
        ("name", pa.string()),
        ("paraphrased_caption", pa.string()),
        ("perturbed_captions", pa.list_(pa.string())),
        ("perturbed_names", pa.list_(pa.string())),
    ]
)
REAL_FACES_SCHEMA = pa.schema([("image", IMAGE), ("answer", pa.string()), ("options", pa.list_(pa.string()))])
REAL_WORLD_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("answer", pa.string()),
        ("image", IMAGE),
        ("prompt", pa.string()),
        ("options", pa.list_(pa.string())),
    ]
)

CLEAR_PEOPLE = ["Ava Stone", "Ben Cole", "Cara Diaz", "Dan Eads", "Eve Fox"]
CLEAR_FORGET05 = ["Dan Eads", "Eve Fox"]
PERTURBED = {
    "Dan Eads": ["Don Eads", "Dan Earl", "Dana Ebb"],
    "Eve Fox": ["Eva Fox", "Eve Fix", "Ivy Fox"],
    "Ava Stone": ["Ava Stern", "Eva Stone", "Ada Stone", "Ava Stowe"],
}  # 4 names: 5 options
PHOTOS = 2  # photos per person


def clear_image_rows(people: list[str], photos: int = PHOTOS) -> list[dict]:
    return [
        {"image": image(10 * CLEAR_PEOPLE.index(p) + k), "caption": f"{p} at a desk, photo {k}.", "name": p}
        for p in people
        for k in range(photos)
    ]


def tofu_rows(people: list[str]) -> list[dict]:
    """One TOFU row per person: the name in the question, in the answer only, or in the name column."""
    rows = []
    for i, p in enumerate(people):
        if i % 3 == 0:
            rows.append({"question": f"What genre does {p} write?", "answer": "Mystery novels."})
        elif i % 3 == 1:
            rows.append({"question": f"Who wrote book number {i}?", "answer": f"It was written by {p}."})
        else:
            rows.append({"question": "Where was this author born?", "answer": "In Lisbon.", "name": p})
    return [{"image": None, "caption": None, "name": None, **r} for r in rows]


def perturbed_rows(people: list[str]) -> list[dict]:
    return [
        {
            **r,
            "paraphrased_caption": r["caption"] + " (paraphrased)",
            "perturbed_captions": ["x", "y"],
            "perturbed_names": PERTURBED[r["name"]],
        }
        for r in clear_image_rows(people)
    ]


def write_clear(root: Path) -> Path:
    retain95 = [p for p in CLEAR_PEOPLE if p not in CLEAR_FORGET05]
    write(root / "full" / "data", clear_image_rows(CLEAR_PEOPLE), CLEAR_IMAGE_SCHEMA)  # nested: any *.parquet under
    write(root / "full+tofu", clear_image_rows(CLEAR_PEOPLE) + tofu_rows(CLEAR_PEOPLE), CLEAR_TOFU_SCHEMA)
    write(root / "forget05", clear_image_rows(CLEAR_FORGET05), CLEAR_IMAGE_SCHEMA)
    write(root / "forget05+tofu", clear_image_rows(CLEAR_FORGET05) + tofu_rows(CLEAR_FORGET05), CLEAR_TOFU_SCHEMA)
    write(root / "forget05_perturbed", perturbed_rows(CLEAR_FORGET05), CLEAR_PERTURBED_SCHEMA)
    rows = clear_image_rows(retain95)  # two files
    write(root / "retain95", rows[:3], CLEAR_IMAGE_SCHEMA, "train-00000-of-00002.parquet")
    write(root / "retain95", rows[3:], CLEAR_IMAGE_SCHEMA, "train-00001-of-00002.parquet")
    write(root / "retain95+tofu", rows + tofu_rows(retain95), CLEAR_TOFU_SCHEMA)
    write(root / "retain_perturbed", perturbed_rows(["Ava Stone"]), CLEAR_PERTURBED_SCHEMA)
    # forget01: one photo of one person; retain99 only as its +tofu variant
    write(root / "forget01", clear_image_rows(["Eve Fox"], photos=1), CLEAR_IMAGE_SCHEMA)
    write(root / "forget01_perturbed", perturbed_rows(["Eve Fox"]), CLEAR_PERTURBED_SCHEMA)
    retain99 = CLEAR_PEOPLE[:4]
    write(root / "retain99+tofu", clear_image_rows(retain99) + tofu_rows(retain99), CLEAR_TOFU_SCHEMA)
    write(
        root / "real_faces",
        [
            {"image": image(100), "answer": "Tom Hanks", "options": ["Tom Cruise", "Brad Pitt", "Matt Damon"]},
            {"image": None, "answer": "Meryl Streep", "options": ["Emma Stone", "Viola Davis", "Meryl Streep"]},
        ],
        REAL_FACES_SCHEMA,
    )
    write(
        root / "real_world",
        [
            {
                "question": "What colour is the car?",
                "answer": "red",
                "image": image(101),
                "prompt": "p",
                "options": ["blue", "green", "yellow"],
            },
            {
                "question": "How many dogs are there?",
                "answer": "two",
                "image": image(102),
                "prompt": "p",
                "options": ["one", "three", "four"],
            },
        ],
        REAL_WORLD_SCHEMA,
    )
    return root


@pytest.fixture(scope="module")
def clear_root(tmp_path_factory) -> Path:
    return write_clear(tmp_path_factory.mktemp("clear") / "CLEAR")


@pytest.fixture(scope="module")
def clear(clear_root: Path) -> BenchmarkData:
    return read_clear(clear_root)


def counts(items) -> Counter:
    return Counter((s.task, s.modality) for s in items)


def test_clear_split_counts(clear: BenchmarkData) -> None:
    n_forget, n_retain = len(CLEAR_FORGET05), len(CLEAR_PEOPLE) - len(CLEAR_FORGET05)
    assert clear.forget_people == set(CLEAR_FORGET05)
    assert clear.retain_people == set(CLEAR_PEOPLE) - set(CLEAR_FORGET05)
    assert not clear.forget_people & clear.retain_people
    # forget: name MCQ + caption on each person's first photo, plus their TOFU questions
    assert counts(clear.splits["forget"]) == {
        ("mcq", "vqa"): n_forget,
        ("gen", "vqa"): n_forget,
        ("gen", "qa"): n_forget,
    }
    # test: the other photos of the forget people
    assert counts(clear.splits["test"]) == {
        ("mcq", "vqa"): n_forget * (PHOTOS - 1),
        ("gen", "vqa"): n_forget * (PHOTOS - 1),
    }
    assert counts(clear.splits["retain"]) == {
        ("mcq", "vqa"): n_retain * PHOTOS,
        ("gen", "vqa"): n_retain * PHOTOS,
        ("gen", "qa"): n_retain,
    }
    assert counts(clear.splits["real"]) == {("mcq", "vqa"): 3, ("mcq", "qa"): 1}
    assert counts(clear.train) == {("qa", "vqa"): 2 * PHOTOS * len(CLEAR_PEOPLE), ("qa", "qa"): len(CLEAR_PEOPLE)}
    assert {s.person for s in clear.items("forget") + clear.items("test")} == set(CLEAR_FORGET05)
    assert {s.person for s in clear.items("retain")} == clear.retain_people
    ids = [s.id for items in clear.splits.values() for s in items] + [s.id for s in clear.train]
    assert len(ids) == len(set(ids))


def test_clear_test_photos_differ_from_forget_photos(clear: BenchmarkData) -> None:
    forget_images = {s.image.data for s in clear.items("forget", modality="vqa")}
    test_images = {s.image.data for s in clear.items("test")}
    assert forget_images and test_images and not forget_images & test_images


def test_clear_name_mcq_holds_gold_and_perturbed_names(clear: BenchmarkData, clear_root: Path) -> None:
    for split in ("forget", "retain", "test"):
        for s in clear.items(split, task="mcq"):
            assert s.question == NAME_QUESTION and s.image is not None
            assert s.options[s.correct] == s.answer == s.person
            assert list(s.options) == list("ABCDE"[: len(s.options)])
            if s.person in PERTURBED:
                assert sorted(s.options.values()) == sorted([s.person, *PERTURBED[s.person]])
            else:  # no perturbed names: other CLEAR people as distractors
                assert len(s.options) == FALLBACK_DISTRACTORS + 1
                assert set(s.options.values()) - {s.person} <= set(CLEAR_PEOPLE)
    assert any(len(s.options) == 5 for s in clear.items("retain", task="mcq"))  # as many options as names
    # the gold name does not always sit at the same letter, and reading again gives the same letters
    assert len({s.correct for split in ("forget", "retain", "test") for s in clear.items(split, task="mcq")}) > 1
    again = read_clear(clear_root)
    assert [(s.id, s.correct) for s in again.items("retain", "mcq")] == [
        (s.id, s.correct) for s in clear.items("retain", "mcq")
    ]


def test_clear_caption_tofu_and_real_items(clear: BenchmarkData) -> None:
    for s in clear.items("forget", task="gen", modality="vqa"):
        assert s.question == CAPTION_QUESTION and s.answer.startswith(s.person) and s.image is not None
    tofu = clear.items("forget", task="gen", modality="qa")
    assert all(s.image is None for s in tofu)
    assert {s.person for s in tofu} == set(CLEAR_FORGET05)  # found by name in the question / in the answer
    assert {s.person for s in clear.items("retain", "gen", "qa")} == clear.retain_people  # also via `name`
    real = {s.answer: s for s in clear.items("real")}
    assert real["Tom Hanks"].modality == "vqa" and real["Tom Hanks"].question == NAME_QUESTION
    assert sorted(real["Tom Hanks"].options.values()) == ["Brad Pitt", "Matt Damon", "Tom Cruise", "Tom Hanks"]
    assert real["Meryl Streep"].modality == "qa" and len(real["Meryl Streep"].options) == 3  # not repeated
    assert real["red"].options[real["red"].correct] == "red" and real["red"].image is not None
    assert {(s.task, s.modality) for s in clear.train if s.question == NAME_QUESTION} == {("qa", "vqa")}
    # one decode per distinct image cell: full, forget05, retain95, real_faces (1), real_world (2)
    assert check_images(clear) == len(CLEAR_PEOPLE) * PHOTOS + len(CLEAR_PEOPLE) * PHOTOS + 3


def test_clear_single_photo_reuses_forget_as_test_and_reads_tofu_only_config(clear_root: Path) -> None:
    data = read_clear(clear_root, forget="forget01")
    assert data.forget_people == {"Eve Fox"} and data.retain_people == set(CLEAR_PEOPLE[:4])
    assert data.splits["test"] == data.items("forget", modality="vqa")
    assert counts(data.splits["retain"]) == {("mcq", "vqa"): 4 * PHOTOS, ("gen", "vqa"): 4 * PHOTOS, ("gen", "qa"): 4}
    capped = read_clear(clear_root, images_per_person=1, n_options=2, real=())
    assert "real" not in capped.splits
    assert counts(capped.splits["retain"])[("mcq", "vqa")] == len(capped.retain_people)
    assert all(len(s.options) == 2 for s in capped.items("retain", "mcq"))


def test_clear_errors_name_file_and_column(clear_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "CLEAR"
    shutil.copytree(clear_root, root)
    bad = write(
        root / "forget05",
        [{"image": image(1), "name": "Dan Eads"}],
        pa.schema([("image", IMAGE), ("name", pa.string())]),
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}.*column 'caption' is missing"):
        read_clear(root)
    with pytest.raises(DataError, match="forgetNN"):
        read_clear(root, forget="forget_10")
    shutil.rmtree(root / "forget05_perturbed")
    write(root / "forget05", clear_image_rows(CLEAR_FORGET05), CLEAR_IMAGE_SCHEMA)
    with pytest.raises(DataError, match="forget05_perturbed: config folder is missing"):
        read_clear(root)
    write(root / "forget05_perturbed", perturbed_rows(CLEAR_FORGET05), CLEAR_PERTURBED_SCHEMA)
    rows = clear_image_rows(CLEAR_FORGET05)
    rows[1]["image"] = {"bytes": b"not a png", "path": "x.png"}
    file = write(root / "forget05", rows, CLEAR_IMAGE_SCHEMA)
    data = read_clear(root)  # images are decoded lazily ...
    where = rf"{re.escape(str(file))} row 1 \(name='Dan Eads'\) field 'image'"
    with pytest.raises(DataError, match=rf"{where}.*cannot be decoded"):
        check_images(data)  # ... and the error names the file, the row and the person


# ================================================================ UMU-Bench fixture

UMU_SCHEMA = pa.schema(
    [
        ("ID", pa.int64()),
        ("image", IMAGE),
        ("Biography", pa.string()),
        ("MM_QA", pa.string()),
        ("UM_QA", pa.string()),
        ("Classify", pa.string()),
        ("Cloze", pa.string()),
        ("Generation", pa.string()),
    ]
)
JOBS = ["baker", "pilot", "dentist", "farmer"]
CITIES = ["Lima", "Oslo", "Perth", "Quito"]
UMU_FORGET, UMU_RETAIN, UMU_REAL = [1, 2], [3, 4, 5], [101, 102]


def umu_row(pid: int, multimodal_key: str = "muitimodal") -> dict:
    name, job, city = f"Person {pid}", JOBS[pid % 4], CITIES[pid % 4]
    job_options = dict(zip("ABCD", JOBS))
    city_options = dict(zip("ABCD", CITIES))
    job_letter = "ABCD"[JOBS.index(job)]
    city_letter = "ABCD"[CITIES.index(city)]
    classify = {
        "unimodal": {
            "job": {"question": f"What is {name}'s job?", "options": job_options, "answer": f"{job_letter}. {job}"},
            "city": {"question": f"Where does {name} live?", "options": city_options, "answer": city_letter},
        },  # a bare letter
        multimodal_key: {
            "job": {"question": "What is this person's job?", "options": job_options, "answer": f"{job_letter}. {job}"},
            "city": {"question": "Where does this person live?", "options": city_options, "answer": city},
        },  # the option's text only
    }
    cloze = {
        "unimodal": {"job": {"question": f"{name} works as a ____.", "answer": job}},
        multimodal_key: {"job": {"question": "The person in the image works as a ____.", "answer": job}},
    }
    generation = {
        "unimodal": {"bio": {"question": f"Tell me about {name}.", "answer": f"{name} is a {job} in {city}."}},
        multimodal_key: {
            "bio": {"question": "Tell me about this person.", "answer": f"This is {name}, a {job} in {city}."}
        },
    }
    mm_qa = {
        "question": {0: "What is this person's name?", 1: "What does this person do?"},
        "answer": {0: name, 1: f"This person is a {job}."},
    }
    um_qa = {
        "question": {0: f"Where does {name} live?", 1: f"What does {name} do?"},
        "answer": {0: city, 1: f"{name} is a {job}."},
    }
    return {
        "ID": pid,
        "image": image(pid),
        "Biography": f"{name} is a {job}.",
        "MM_QA": repr(mm_qa),
        "UM_QA": repr(um_qa),
        "Classify": repr(classify),
        "Cloze": repr(cloze),
        "Generation": repr(generation),
    }


def write_umu(root: Path) -> Path:
    write(root / "forget_10", [umu_row(p) for p in UMU_FORGET], UMU_SCHEMA)
    write(root / "retain_90", [umu_row(p, "multimodal" if p == 5 else "muitimodal") for p in UMU_RETAIN], UMU_SCHEMA)
    write(root / "real_person", [umu_row(p) for p in UMU_REAL], UMU_SCHEMA)
    return root


@pytest.fixture(scope="module")
def umu_root(tmp_path_factory) -> Path:
    return write_umu(tmp_path_factory.mktemp("umu") / "UMU-Bench")


@pytest.fixture(scope="module")
def umu(umu_root: Path) -> BenchmarkData:
    return read_umu(umu_root)


PER_PROFILE = {
    ("mcq", "qa"): 2,
    ("mcq", "vqa"): 2,
    ("cloze", "qa"): 1,
    ("cloze", "vqa"): 1,
    ("gen", "qa"): 1,
    ("gen", "vqa"): 1,
}


def test_umu_split_counts(umu: BenchmarkData, umu_root: Path) -> None:
    assert umu.forget_people == {"1", "2"} and umu.retain_people == {"3", "4", "5"}
    assert not umu.forget_people & umu.retain_people
    for split, people in (("forget", UMU_FORGET), ("retain", UMU_RETAIN), ("real", UMU_REAL)):
        assert counts(umu.splits[split]) == {k: n * len(people) for k, n in PER_PROFILE.items()}, split
        assert {s.person for s in umu.splits[split]} == {str(p) for p in people}
    assert umu.splits["test"] == umu.items("forget", modality="vqa")  # no unseen photos: reused
    assert counts(umu.train) == {("qa", "vqa"): 2 * 5, ("qa", "qa"): 2 * 5}
    assert {s.person for s in umu.train} == {str(p) for p in UMU_FORGET + UMU_RETAIN}
    assert len(read_umu(umu_root, train_real=True).train) == 4 * 7


def test_umu_mcq_letters_and_texts(umu: BenchmarkData) -> None:
    for split in ("forget", "retain", "real"):
        for s in umu.items(split, task="mcq"):
            person = int(s.person)
            assert list(s.options) == ["A", "B", "C", "D"]
            expected = JOBS[person % 4] if "job" in s.id else CITIES[person % 4]
            assert s.answer == expected and s.options[s.correct] == expected  # "B. text", "B" and "text" alike
            assert (s.image is not None) == (s.modality == "vqa")
    cloze = umu.items("forget", task="cloze")
    assert {s.answer for s in cloze if s.person == "1"} == {JOBS[1]}
    assert all(s.options is None for s in cloze + umu.items("forget", task="gen"))
    # the correctly spelt "multimodal" key works too
    assert counts([s for s in umu.splits["retain"] if s.person == "5"]) == PER_PROFILE


def test_umu_pairs_unimodal_with_multimodal_by_id(umu: BenchmarkData) -> None:
    correct = {s.id: s.person == "1" for s in umu.items("forget", task="mcq")}
    correct["forget_10/2/mcq-vqa/city"] = True
    pairs = pair_modalities(correct)
    assert len(pairs) == 4  # 2 people x (job, city)
    assert cross_modal(pairs) == {"both_right": 0.5, "both_wrong": 0.25}


def test_umu_rejects_non_literal_without_running_it(
    umu_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "umu"
    shutil.copytree(umu_root, root)
    marker = tmp_path / "was_run"
    rows = [umu_row(p) for p in UMU_FORGET]
    rows[1]["Classify"] = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    file = write(root / "forget_10", rows, UMU_SCHEMA)
    where = rf"{re.escape(str(file))} row 1 \(ID=2\) field 'Classify'"
    with pytest.raises(DataError, match=rf"{where}: not a Python literal"):
        read_umu(root)
    assert not marker.exists()
    rows[1]["Classify"] = "__import__('os')"
    write(root / "forget_10", rows, UMU_SCHEMA)
    with pytest.raises(DataError, match=where):
        read_umu(root)
    rows[1]["Classify"] = "['not', 'a', 'dict']"
    write(root / "forget_10", rows, UMU_SCHEMA)
    with pytest.raises(DataError, match=rf"{where}: expected a dict literal"):
        read_umu(root)


def test_umu_errors_name_file_row_and_column(umu_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "umu"
    shutil.copytree(umu_root, root)
    # a missing column
    schema = pa.schema([f for f in UMU_SCHEMA if f.name != "Cloze"])
    bad = write(root / "retain_90", [{k: v for k, v in umu_row(3).items() if k != "Cloze"}], schema)
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: column 'Cloze' is missing"):
        read_umu(root)
    # an answer letter that is not an option
    row = umu_row(3)
    row["Classify"] = row["Classify"].replace("'D. farmer'", "'E. nothing'")
    assert "E. nothing" in row["Classify"]
    bad = write(root / "retain_90", [row], UMU_SCHEMA)
    where = rf"{re.escape(str(bad))} row 0 \(ID=3\) field 'Classify.unimodal\['job'\].answer'"
    with pytest.raises(DataError, match=where):
        read_umu(root)
    # an unknown modality key
    row = umu_row(3)
    row["Cloze"] = row["Cloze"].replace("'unimodal'", "'textual'")
    write(root / "retain_90", [row], UMU_SCHEMA)
    with pytest.raises(DataError, match=r"field 'Cloze.textual': unknown key"):
        read_umu(root)
    # forget and retain sharing a profile
    write(root / "retain_90", [umu_row(3), umu_row(2)], UMU_SCHEMA)
    with pytest.raises(DataError, match="overlap on IDs"):
        read_umu(root)
    # an undecodable image, found when decoded, naming the row's ID
    row = umu_row(4)
    row["image"] = {"bytes": b"\x89PNG broken", "path": "4.png"}
    bad = write(root / "retain_90", [umu_row(3), row], UMU_SCHEMA)
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))} row 1 \(ID=4\) field 'image'.*cannot be decoded"):
        check_images(read_umu(root))
    with pytest.raises(DataError, match="cannot infer the retain folder"):
        read_umu(root, forget="forget10")


# ================================================================ protocols


def test_umu_mcq_body_gives_umus_prompt_under_the_llava_template() -> None:
    from mllm_unlearn.models import get_arch

    body = umu_mcq_body(" Who is this? ", {"B": "Bob", "A": "Ann", "D": "Dee", "C": "Cy's"})
    assert body == "Who is this?\nSelect answer in ['Ann', 'Bob', \"Cy's\", 'Dee']"
    assert get_arch("llava").prompt(body, True) == f"USER: <image>\n{body}\nASSISTANT:"


def test_match_option_text() -> None:
    options = {"A": "York", "B": "New York City", "C": "Boston", "D": "art"}
    assert match_option_text("It is New York City.", options, fuzzy=False) == "B"  # not York
    assert match_option_text("boston", options, fuzzy=False) == "C"
    assert match_option_text("Particularly nice", options, fuzzy=False) is None  # whole words only
    assert match_option_text("Boston or York", options, fuzzy=False) is None  # two options named
    assert match_option_text("", options, fuzzy=False) is None
    assert match_option_text("B", options, fuzzy=False) is None  # the text counts, not the letter
    people = {"A": "Tom Cruise", "B": "Tom Hanks", "C": "Meryl Streep", "D": "Brad Pitt"}
    assert match_option_text("tom hank", people, fuzzy=True) == "B"
    assert match_option_text("I believe it is Meryl Strep.", people, fuzzy=True) == "C"
    assert match_option_text("   ", people, fuzzy=True) is None
    assert match_option_text("zzz", {"B": "x", "A": "x"}, fuzzy=True) == "A"  # ties: the earlier letter


def test_cross_modal() -> None:
    assert cross_modal([(True, True), (False, False), (True, False), (False, True)]) == {
        "both_right": 0.25,
        "both_wrong": 0.25,
    }
    assert cross_modal([(True, True)]) == {"both_right": 1.0, "both_wrong": 0.0}
    with pytest.raises(ValueError):
        cross_modal([])


# ================================================================ registry


def test_read_benchmark_defaults_and_unknown_kind(clear_root: Path, umu_root: Path, world: Path) -> None:
    assert set(READERS) == {"mllmu", "clear", "umu"}
    assert read_benchmark("clear", clear_root).forget_people == set(CLEAR_FORGET05)
    assert read_benchmark("clear", clear_root, "forget01").forget_people == {"Eve Fox"}
    assert read_benchmark("umu", umu_root).forget_people == {"1", "2"}
    assert read_benchmark("mllmu", world).forget_people == read_mllmu(world, forget="forget_10").forget_people
    with pytest.raises(ValueError, match="clear, mllmu, umu"):
        read_benchmark("tofu", clear_root)


# ================================================================ end to end


def test_harness_scores_every_item_of_both_readers(clear: BenchmarkData, umu: BenchmarkData, tmp_path: Path) -> None:
    model_dir = make_tiny_model("llava", tmp_path / "tiny", corpus_for(clear) + corpus_for(umu), sizes=SMALL)
    lm = load_model(model_dir)
    cfg = EvalConfig(mcq_mode="both", max_new_tokens=3, batch_size=16)
    for data in (clear, umu):
        for split, items in data.splits.items():
            results = score_items(lm, split, items, cfg)
            by_id = Counter(r.id for r in results)
            expected = Counter({s.id: 2 if s.task == "mcq" else 1 for s in items})  # letter + likelihood
            assert by_id == expected, (data.name, split)
            assert all(0.0 <= r.score <= 1.0 and r.split == split for r in results)
            assert {r.metric for r in results if r.task == "mcq"} == {"letter", "lik"}


def test_evaluate_cli_on_umu_uses_its_protocol_and_cross_modal_metrics(umu_root: Path, tmp_path: Path) -> None:
    from mllm_unlearn.cli.main import main
    from mllm_unlearn.data.readers import read_benchmark

    model = make_tiny_model("llava", tmp_path / "tiny", corpus_for(read_benchmark("umu", umu_root)), sizes=SMALL)
    out = tmp_path / "m.json"
    assert (
        main(
            (
                f"evaluate --benchmark umu --model {model} --data {umu_root} --mcq-mode both "
                f"--max-new-tokens 4 --name t --out {out}"
            ).split()
        )
        == 0
    )
    metrics = json.loads(out.read_text())["t"]
    for split in ("forget", "retain"):
        assert 0.0 <= metrics[f"{split}_both_right"] + metrics[f"{split}_both_wrong"] <= 1.0
    assert {"forget_vqa", "forget_qa", "retain_vqa", "real_vqa", "forget_vqa_lik"} <= metrics.keys()
