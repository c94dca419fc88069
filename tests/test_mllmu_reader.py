"""read_mllmu on the synthetic world: a faithful round trip, and precise errors on bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllm_unlearn.data.mllmu import check_images, read_mllmu
from mllm_unlearn.data.sample import BenchmarkData, DataError
from mllm_unlearn.data.world import MCQ_TEMPLATES, PARQUET_NAME

from .conftest import WORLD_CONFIG

CONFIG = WORLD_CONFIG
ITEMS_PER_PROFILE = {
    ("mcq", "vqa"): 5,
    ("mcq", "qa"): 5,
    ("gen", "vqa"): 2,
    ("gen", "qa"): 2,
    ("cloze", "vqa"): 2,
    ("cloze", "qa"): 2,
}


@pytest.fixture(scope="module")
def data(world: Path) -> BenchmarkData:
    return read_mllmu(world)


def people_of(summary: dict, real: bool) -> dict[str, dict]:
    return {str(p["ID"]): p for p in summary["people"] if p["real"] == real}


# ---------------------------------------------------------------- round trip


def test_split_sizes_match_the_world(data: BenchmarkData, summary: dict) -> None:
    forget = {str(i) for i in summary["forget_sets"]["forget_10"]}
    fictitious, real = people_of(summary, False), people_of(summary, True)
    assert data.forget_people == forget
    assert data.retain_people == set(fictitious) - forget
    expected = {"forget": len(forget), "retain": len(fictitious) - len(forget), "real": len(real)}
    for split, n_people in expected.items():
        counts = Counter((s.task, s.modality) for s in data.splits[split])
        assert counts == {key: n * n_people for key, n in ITEMS_PER_PROFILE.items()}
    test_counts = Counter((s.task, s.modality) for s in data.splits["test"])
    assert test_counts == {key: n * len(forget) for key, n in ITEMS_PER_PROFILE.items() if key[1] == "vqa"}
    # every training row holds all 18 free-form/generation/cloze items; practice rounds are spread over rows
    per_person = CONFIG.train_photos * 18 + 10 * CONFIG.mcq_practice
    # plus the taught strangers' identity questions (2 per training photo), see data.world.Strangers_Set
    strangers = [str(p["ID"]) for p in summary["strangers"] if p["pretrain"]]
    assert len(data.train) == per_person * (len(fictitious) + len(real)) + 2 * CONFIG.train_photos * len(strangers)
    assert Counter(s.person for s in data.train) == {
        **{p: per_person for p in [*fictitious, *real]},
        **{p: 2 * CONFIG.train_photos for p in strangers},
    }


def test_every_forget_person_has_five_image_and_five_text_mcqs(data: BenchmarkData) -> None:
    for person in data.forget_people:
        mine = [s for s in data.items("forget", task="mcq") if s.person == person]
        assert Counter(s.modality for s in mine) == {"vqa": 5, "qa": 5}


def test_image_questions_never_name_anyone_and_text_questions_name_their_person(
    data: BenchmarkData, summary: dict
) -> None:
    names = {str(p["ID"]): p["name"] for p in summary["people"]}
    for items in data.splits.values():
        for s in items:
            if s.modality == "vqa":
                assert s.image is not None
                assert not any(name in s.question for name in names.values()), s.id
            else:
                assert s.image is None and names[s.person] in s.question, s.id


def test_correct_option_is_the_persons_attribute(data: BenchmarkData, summary: dict) -> None:
    people = {str(p["ID"]): p for p in summary["people"]}
    templates = {
        "vqa": [t for t in MCQ_TEMPLATES if t[0] == "Image_Textual"],
        "qa": [t for t in MCQ_TEMPLATES if t[0] == "Pure_Text"],
    }
    for split in ("forget", "retain", "real", "test"):
        for s in data.items(split, task="mcq"):
            person = people[s.person]
            key = templates[s.modality][int(s.id.rsplit("/", 1)[1])][2]
            expected = person["name"] if key == "name" else person["attributes"][key]
            assert s.answer == s.options[s.correct] == expected
            assert sorted(s.options) == ["A", "B", "C", "D"] and len(set(s.options.values())) == 4


def test_images_decode_to_rgb_of_the_configured_size(data: BenchmarkData) -> None:
    # one image per training row, per evaluation row (forget + retain + real) and per forget Test_Set row
    expected = (
        (CONFIG.n_people + CONFIG.n_real + CONFIG.pretrain_strangers) * CONFIG.train_photos
        + CONFIG.n_people
        + CONFIG.n_real
        + len(data.forget_people)
    )
    assert check_images(data) == expected
    for split in data.splits:
        img = data.items(split, modality="vqa")[0].image.load()
        assert img.mode == "RGB" and img.size == (CONFIG.image_size, CONFIG.image_size)


def test_test_split_asks_forget_people_with_unseen_photos(data: BenchmarkData) -> None:
    test = data.splits["test"]
    assert {s.person for s in test} == data.forget_people
    assert all(s.modality == "vqa" and s.id.startswith("Test_Set/") for s in test)
    seen = {s.image.data for s in data.splits["forget"] if s.image is not None}
    assert all(s.image.data not in seen for s in test)
    assert all("Test_Set" in s.image.source and "images[0]" in s.image.source for s in test)


def test_forget_sets_partition_and_nest(world: Path, summary: dict) -> None:
    fictitious = set(people_of(summary, False))
    previous: frozenset[str] = frozenset()
    for percent in (5, 10, 15):
        d = read_mllmu(world, forget=f"forget_{percent}", train_splits=[])
        assert not d.forget_people & d.retain_people
        assert d.forget_people | d.retain_people == fictitious
        assert previous < d.forget_people
        previous = d.forget_people


def test_sample_ids_are_unique_and_stable(world: Path, data: BenchmarkData) -> None:
    ids = [s.id for s in data.train] + [s.id for items in data.splits.values() for s in items]
    assert len(ids) == len(set(ids))
    assert ids == [s.id for s in read_mllmu(world).train] + [
        s.id for items in read_mllmu(world).splits.values() for s in items
    ]


def test_training_pairs_keep_modality(data: BenchmarkData, summary: dict) -> None:
    names = [p["name"] for p in summary["people"]]
    assert {s.task for s in data.train} == {"qa"}
    for s in data.train:
        if s.modality == "vqa":
            assert s.image is not None and not any(name in s.question.splitlines()[0] for name in names)
        else:
            assert s.image is None
    assert {s.id.split("/")[0] for s in data.train} == {"ft_Data", "Pretrain_Data"}


def test_explicit_retain_and_train_splits(world: Path, summary: dict) -> None:
    d = read_mllmu(world, forget="forget_5", retain="retain_85", train_splits=["ft_Data"])
    assert len(d.forget_people) == 1 and len(d.retain_people) == CONFIG.n_people - 3
    assert {s.person for s in d.train} == set(people_of(summary, False))
    with pytest.raises(DataError, match="cannot infer the retain folder"):
        read_mllmu(world, forget="Full_Set")


def test_training_item_without_type_is_asked_with_the_image(world: Path, tmp_path: Path) -> None:
    """Real MLLMU-Bench metadata has no "Type" and no ID column."""
    root = shutil.copytree(world, tmp_path / "w")

    def drop_type(rows: list[dict]) -> None:
        for row in rows:
            row["metadata"] = json.dumps(
                [{"Question": i["Question"], "Answer": i["Answer"]} for i in json.loads(row["metadata"])]
            )

    edit_rows(root, "ft_Data", drop_type)
    file = root / "ft_Data" / PARQUET_NAME
    pq.write_table(pq.read_table(file).drop_columns(["ID"]), file)
    train = read_mllmu(root, train_splits=["ft_Data"]).train
    assert train and all(s.modality == "vqa" and s.image is not None and s.person == "" for s in train)


# ---------------------------------------------------------------- bad input


def edit_rows(root: Path, folder: str, edit: Callable[[list[dict]], None]) -> Path:
    """Rewrite a split's parquet file after ``edit`` changed its rows (keeping the schema)."""
    file = root / folder / PARQUET_NAME
    table = pq.read_table(file)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file)
    return file


def _set_image_bytes(value: bytes | None) -> Callable[[list[dict]], None]:
    def edit(rows: list[dict]) -> None:
        rows[1]["image"]["bytes"] = value

    return edit


def _drop_first_options(rows: list[dict]) -> None:
    rows[0]["Classification_Task"]["Image_Textual_Questions"][0]["Options"] = None


def _bad_letter(rows: list[dict]) -> None:
    rows[0]["Classification_Task"]["Pure_Text_Questions"][2]["Correct_Answer"] = "E"


def _bad_json(rows: list[dict]) -> None:
    rows[2]["metadata"] = "[{oops"


def _no_test_images(rows: list[dict]) -> None:
    for row in rows:
        row["images"] = []


def _duplicate_id(rows: list[dict]) -> None:
    rows[1]["ID"] = rows[0]["ID"]


def _bad_type(rows: list[dict]) -> None:
    rows[0]["Mask_Task"][1]["Type"] = "Audio"


ROW_EDITS = {
    "image bytes missing": ("forget_10", _set_image_bytes(None), ["row 1", "field 'image'", "missing"]),
    "options missing": (
        "retain_90",
        _drop_first_options,
        ["row 0", "Classification_Task.Image_Textual_Questions[0].Options", "missing"],
    ),
    "answer letter unknown": ("Retain_Set", _bad_letter, ["row 0", "Pure_Text_Questions[2].Correct_Answer", "'E'"]),
    "metadata not JSON": ("ft_Data", _bad_json, ["row 2", "field 'metadata'", "not valid JSON"]),
    "no test photos": ("Test_Set", _no_test_images, ["field 'images'", "empty image list"]),
    "unknown Type": ("forget_10", _bad_type, ["row 0", "Mask_Task[1].Type", "'Audio'"]),
}


@pytest.mark.parametrize("case", ROW_EDITS)
def test_bad_rows_name_file_row_and_field(world: Path, tmp_path: Path, case: str) -> None:
    folder, edit, expected = ROW_EDITS[case]
    root = shutil.copytree(world, tmp_path / "w")
    file = edit_rows(root, folder, edit)
    with pytest.raises(DataError) as error:
        read_mllmu(root)
    for part in [str(file), *expected]:
        assert part in str(error.value)


def test_duplicate_id_in_a_read_split_is_refused(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    file = edit_rows(root, "retain_90", _duplicate_id)
    with pytest.raises(DataError, match="occurs twice") as error:
        read_mllmu(root)
    assert str(file) in str(error.value) and "row 1" in str(error.value)


def test_corrupt_image_is_named_when_decoded(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    file = edit_rows(root, "forget_10", _set_image_bytes(b"this is not a png"))
    data = read_mllmu(root)  # reading never decodes
    with pytest.raises(DataError) as error:
        check_images(data)
    for part in (str(file), "row 1", "field 'image'", "cannot be decoded"):
        assert part in str(error.value)


def test_missing_column_is_named(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    file = root / "retain_90" / PARQUET_NAME
    pq.write_table(pq.read_table(file).drop_columns(["Classification_Task"]), file)
    with pytest.raises(DataError) as error:
        read_mllmu(root)
    assert str(file) in str(error.value) and "'Classification_Task' is missing" in str(error.value)


@pytest.mark.parametrize("folder", ["Test_Set", "Retain_Set", "forget_10", "retain_90", "ft_Data"])
def test_missing_split_folder_is_named(world: Path, tmp_path: Path, folder: str) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    shutil.rmtree(root / folder)
    with pytest.raises(DataError, match="split folder is missing") as error:
        read_mllmu(root)
    assert str(root / folder) in str(error.value)


def test_folder_without_parquet_is_named(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    (root / "retain_90" / PARQUET_NAME).unlink()
    with pytest.raises(DataError, match="no parquet file") as error:
        read_mllmu(root)
    assert str(root / "retain_90") in str(error.value)


def test_empty_split_is_named(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    file = root / "forget_10" / PARQUET_NAME
    pq.write_table(pq.read_table(file).slice(0, 0), file)
    with pytest.raises(DataError, match="split is empty") as error:
        read_mllmu(root)
    assert str(root / "forget_10") in str(error.value)


def test_unreadable_parquet_is_named(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    file = root / "Retain_Set" / PARQUET_NAME
    file.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file") as error:
        read_mllmu(root)
    assert str(file) in str(error.value)


def test_several_parquet_files_are_read_in_order(world: Path, tmp_path: Path) -> None:
    root = shutil.copytree(world, tmp_path / "w")
    file = root / "retain_90" / PARQUET_NAME
    table = pq.read_table(file)
    file.unlink()
    pq.write_table(table.slice(0, 5), root / "retain_90" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(5), root / "retain_90" / "train-00001-of-00002.parquet")
    split = read_mllmu(root).splits["retain"]
    assert [s.id for s in split] == [s.id for s in read_mllmu(world).splits["retain"]]
    last_image = [s.image for s in split if s.image is not None][-1]
    assert f"00001-of-00002.parquet row {len(table) - 5 - 1} " in last_image.source


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="benchmark folder not found"):
        read_mllmu(tmp_path / "nowhere")
