"""The synthetic world: distinct, recognisable portraits and a faithful MLLMU-Bench layout."""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mllm_unlearn.data import world as world_module
from mllm_unlearn.data.portraits import TRAIT_POOLS, Traits, draw_portrait, sample_traits
from mllm_unlearn.data.prompts import format_cloze, format_mcq
from mllm_unlearn.data.world import MCQ_TEMPLATES, PARQUET_NAME, WorldConfig, forget_size, make_world

from .conftest import WORLD_CONFIG

CONFIG = WORLD_CONFIG
FOLDERS = {
    "Full_Set",
    "ft_Data",
    "Test_Set",
    "Retain_Set",
    "Pretrain_Data",
    "Strangers_Set",
    "forget_5",
    "forget_10",
    "forget_15",
    "retain_95",
    "retain_90",
    "retain_85",
}


def rows(world: Path, folder: str) -> list[dict]:
    return pq.read_table(world / folder / PARQUET_NAME).to_pylist()


def pixels(png: bytes, size: int | None = None) -> np.ndarray:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if size is not None:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64)


# ---------------------------------------------------------------- portraits


def test_sample_traits_keeps_every_pair_apart() -> None:
    for n, min_distance in ((90, 3), (40, 5)):
        traits = sample_traits(n, np.random.default_rng(1), min_distance=min_distance)
        assert len(traits) == n
        assert min(a.distance(b) for a, b in itertools.combinations(traits, 2)) >= min_distance
        for t in traits:
            assert all(getattr(t, name) in pool for name, pool in TRAIT_POOLS.items())


def test_sample_traits_refuses_impossible_requests() -> None:
    with pytest.raises(ValueError, match="min_distance"):
        sample_traits(2, np.random.default_rng(0), min_distance=len(fields(Traits)) + 1)
    with pytest.raises(ValueError, match="at most"):
        sample_traits(10**6, np.random.default_rng(0), min_distance=3)


def test_draw_portrait_is_deterministic_and_jitter_zero_is_canonical() -> None:
    t = sample_traits(1, np.random.default_rng(0))[0]
    photo = draw_portrait(t, np.random.default_rng(5))
    assert photo.mode == "RGB" and photo.size == (64, 64)
    assert np.array_equal(np.asarray(photo), np.asarray(draw_portrait(t, np.random.default_rng(5))))
    assert not np.array_equal(np.asarray(photo), np.asarray(draw_portrait(t, np.random.default_rng(6))))
    canonical = [np.asarray(draw_portrait(t, np.random.default_rng(s), jitter=0.0)) for s in (1, 2)]
    assert np.array_equal(*canonical)
    assert draw_portrait(t, np.random.default_rng(0), size=32).size == (32, 32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_trait_value_is_visible_at_model_resolution(seed: int) -> None:
    """Changing any one trait changes some 8x8 patch of the 32x32 model input clearly: by more than
    10 grey levels RMS, 2.5x the pixel noise of a photo."""
    base = sample_traits(1, np.random.default_rng(seed))[0]

    def patches(t: Traits) -> np.ndarray:
        img = draw_portrait(t, np.random.default_rng(0), jitter=0.0).resize((32, 32), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float64).reshape(4, 8, 4, 8, 3)

    reference = patches(base)
    for name, pool in TRAIT_POOLS.items():
        for value in pool:
            if value != getattr(base, name):
                change = np.sqrt(((patches(replace(base, **{name: value})) - reference) ** 2).mean(axis=(1, 3, 4)))
                assert change.max() > 10, f"{name}={value} is hardly visible ({change.max():.1f})"


def _photo_distance(a: np.ndarray, b: np.ndarray, margin: int = 2) -> float:
    """Mean abs difference of per-channel standardised 32x32 images, minimised over shifts of up to
    ``margin`` pixels: insensitive to the photo variation (shift, brightness, contrast, tint)."""
    a, b = ((x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6) for x in (a, b))
    core = a[margin:-margin, margin:-margin]
    side = a.shape[0] - 2 * margin
    return min(
        float(np.abs(core - b[margin + dy : margin + dy + side, margin + dx : margin + dx + side]).mean())
        for dy in range(-margin, margin + 1)
        for dx in range(-margin, margin + 1)
    )


def test_every_person_is_recognisable_from_every_photo(world: Path) -> None:
    """Every jittered photo in the world (training photos 1.. and unseen test photos) is at least 1.3x
    nearer its own person's canonical portrait than any other person's: no two people look alike,
    and photo variation never makes one person look like another."""
    canonical, photos = {}, []
    for folder in ("Full_Set", "Retain_Set"):
        canonical.update({row["ID"]: pixels(row["image"]["bytes"], 32) for row in rows(world, folder)})
    for folder in ("ft_Data", "Pretrain_Data"):
        photos += [
            (row["ID"], pixels(row["image"]["bytes"], 32))
            for row in rows(world, folder)
            if not row["image"]["path"].endswith("train_0.png") and row["ID"] in canonical
        ]
    photos += [(row["ID"], pixels(img["bytes"], 32)) for row in rows(world, "Test_Set") for img in row["images"]]
    assert len(canonical) == CONFIG.n_people + CONFIG.n_real
    assert len(photos) == len(canonical) * (CONFIG.train_photos - 1) + CONFIG.n_people * CONFIG.test_photos

    # two people's canonical portraits never coincide, even in plain pixels
    ids = sorted(canonical)
    assert min(np.abs(canonical[a] - canonical[b]).mean() for a, b in itertools.combinations(ids, 2)) > 3
    for person, photo in photos:
        distances = {other: _photo_distance(photo, portrait) for other, portrait in canonical.items()}
        own = distances.pop(person)
        nearest_other = min(distances, key=distances.get)
        assert distances[nearest_other] > 1.3 * own, (
            f"a photo of {person} is nearly as close to {nearest_other} ({distances[nearest_other]:.3f} vs {own:.3f})"
        )


# ---------------------------------------------------------------- layout and content


def test_world_layout_and_forget_sets(world: Path, summary: dict) -> None:
    assert {p.name for p in world.iterdir() if p.is_dir()} == FOLDERS
    assert all([f.name for f in (world / folder).iterdir()] == [PARQUET_NAME] for folder in FOLDERS)
    people = summary["people"]
    fictitious = [p["ID"] for p in people if not p["real"]]
    real = [p["ID"] for p in people if p["real"]]
    assert fictitious == list(range(1, CONFIG.n_people + 1))
    assert real == list(range(1001, 1001 + CONFIG.n_real))
    assert len({p["name"] for p in people}) == len(people)
    assert len({json.dumps(p["traits"], sort_keys=True) for p in people}) == len(people)

    sets = {int(name.split("_")[1]): set(ids) for name, ids in summary["forget_sets"].items()}
    assert [len(sets[p]) for p in (5, 10, 15)] == [1, 2, 3]  # ceil(p * 20 / 100)
    assert sets[5] < sets[10] < sets[15]
    for percent, forget in sets.items():
        assert [r["ID"] for r in rows(world, f"forget_{percent}")] == sorted(forget)
        assert [r["ID"] for r in rows(world, f"retain_{100 - percent}")] == sorted(set(fictitious) - forget)
    assert [r["ID"] for r in rows(world, "Full_Set")] == fictitious
    assert [r["ID"] for r in rows(world, "Retain_Set")] == real


def test_forget_sizes_for_the_default_world() -> None:
    assert [forget_size(p, 50) for p in (5, 10, 15)] == [3, 5, 8]
    assert forget_size(5, 4) == 1


def test_evaluation_rows_use_the_seen_canonical_photo_and_test_rows_unseen_ones(world: Path) -> None:
    train = {(r["ID"], r["image"]["path"]): r["image"]["bytes"] for r in rows(world, "ft_Data")}
    for row in rows(world, "forget_15"):
        assert row["image"]["bytes"] == train[(row["ID"], f"people/{row['ID']:04d}/train_0.png")]
    seen = set(train.values())
    for row in rows(world, "Test_Set"):
        assert len(row["images"]) == CONFIG.test_photos
        assert all(img["bytes"] not in seen for img in row["images"])
        assert pixels(row["images"][0]["bytes"]).shape == (CONFIG.image_size, CONFIG.image_size, 3)


def test_task_fields_follow_mllmu_shape_and_separate_modalities(world: Path, summary: dict) -> None:
    names = [p["name"] for p in summary["people"]]
    by_id = {p["ID"]: p for p in summary["people"]}
    for row in rows(world, "Full_Set") + rows(world, "Retain_Set"):
        person = by_id[row["ID"]]
        values = {"name": person["name"], **person["attributes"]}
        tasks = row["Classification_Task"]
        assert len(tasks["Image_Textual_Questions"]) == len(tasks["Pure_Text_Questions"]) == 5
        for item, (kind, _, key) in zip(
            tasks["Image_Textual_Questions"] + tasks["Pure_Text_Questions"], MCQ_TEMPLATES, strict=True
        ):
            options = item["Options"]
            assert sorted(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4
            assert options[item["Correct_Answer"]] == values[key]
            if kind == "Image_Textual":
                assert not any(name in item["Question"] for name in names)
            else:
                assert person["name"] in item["Question"]
        for column in ("Generation_Task", "Mask_Task"):
            kinds = [item["Type"] for item in row[column]]
            assert kinds.count("Image_Textual") == kinds.count("Pure_Text") == 2
            for item in row[column]:
                if item["Type"] == "Image_Textual":
                    assert not any(name in item["Question"] for name in names)
                else:
                    assert person["name"] in item["Question"]
        for item in row["Mask_Task"]:
            assert item["Question"].count("__") == 1 and item["Ground_Truth"] in values.values()
        assert row["question"] == MCQ_TEMPLATES[0][1] and row["answer"] == person["name"]
        assert person["name"] in row["biography"] and row["Directory"].endswith(f"{row['ID']:04d}")


def test_distractors_are_answers_other_people_really_hold(world: Path, summary: dict) -> None:
    """No option can be ruled out from text priors: every distractor is another person's true value
    (in the same group), so an image-blind model cannot eliminate never-trained answers."""
    for group, folder in ((False, "Full_Set"), (True, "Retain_Set")):
        held: dict[str, set[str]] = {}
        for p in summary["people"]:
            if p["real"] == group:
                for key, value in {"name": p["name"], **p["attributes"]}.items():
                    held.setdefault(key, set()).add(value)
        for row in rows(world, folder):
            tasks = row["Classification_Task"]
            for item, (_, _, key) in zip(
                tasks["Image_Textual_Questions"] + tasks["Pure_Text_Questions"], MCQ_TEMPLATES, strict=True
            ):
                assert set(item["Options"].values()) <= held[key], (row["ID"], key, item["Options"])


def test_training_metadata_teaches_every_evaluated_surface_form(world: Path, summary: dict) -> None:
    names = [p["name"] for p in summary["people"]]
    profiles = {r["ID"]: r for r in rows(world, "Full_Set") + rows(world, "Retain_Set")}
    training = rows(world, "ft_Data") + rows(world, "Pretrain_Data")
    assert len(training) == (CONFIG.n_people + CONFIG.n_real + CONFIG.pretrain_strangers) * CONFIG.train_photos
    for person_id, profile in profiles.items():
        items = [item for r in training if r["ID"] == person_id for item in json.loads(r["metadata"])]
        pairs = {(item["Question"], item["Answer"], item["Type"]) for item in items}
        mcqs = [
            (q, kind)
            for kind in ("Image_Textual", "Pure_Text")
            for q in profile["Classification_Task"][f"{kind}_Questions"]
        ]
        for q, kind in mcqs:  # free form, answer = the correct option's text
            assert (q["Question"], q["Options"][q["Correct_Answer"]], kind) in pairs
            practice = [item for item in items if item["Question"].startswith(q["Question"] + "\n")]
            assert len(practice) == CONFIG.mcq_practice
            for item in practice:
                options = dict(line.split(": ", 1) for line in item["Question"].splitlines()[1:5])
                assert item["Question"] == format_mcq(q["Question"], options)
                assert options[item["Answer"]] == q["Options"][q["Correct_Answer"]] and item["Type"] == kind
        for item in profile["Generation_Task"]:
            assert (item["Question"], item["Ground_Truth"], item["Type"]) in pairs
        for item in profile["Mask_Task"]:
            assert (format_cloze(item["Question"]), item["Ground_Truth"], item["Type"]) in pairs
        for item in items:  # the question body (before any MCQ options) never names anyone
            if item["Type"] == "Image_Textual":
                assert not any(name in item["Question"].splitlines()[0] for name in names)


# ---------------------------------------------------------------- determinism and safety


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    small = WorldConfig(n_people=5, n_real=4, train_photos=2, mcq_practice=1)
    first = _files(make_world(tmp_path / "a", small))
    assert first == _files(make_world(tmp_path / "b", small))
    other = _files(make_world(tmp_path / "c", replace(small, seed=1)))
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_make_world_refuses_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        make_world(tmp_path / "taken", CONFIG)
    assert list((tmp_path / "taken").iterdir()) == []


def test_make_world_leaves_nothing_when_it_fails_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []
    original = world_module._write_split

    def failing_write(root: Path, folder: str, *args: object) -> None:
        if len(written) == 3:
            raise OSError(f"disk full while writing {folder}")
        written.append(folder)
        original(root, folder, *args)

    monkeypatch.setattr(world_module, "_write_split", failing_write)
    with pytest.raises(OSError, match="disk full"):
        make_world(tmp_path / "out", CONFIG)
    assert len(written) == 3
    assert list(tmp_path.iterdir()) == []


def test_world_config_rejects_unusable_sizes() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        WorldConfig(n_real=3)
    with pytest.raises(ValueError, match="train_photos"):
        WorldConfig(train_photos=0)


# ---------------------------------------------------------------- strangers (the audit's probes)


def test_strangers_are_unknown_faces_with_an_i_dont_know_reply(world: Path, summary: dict) -> None:
    """Strangers have names and faces of their own; only the Pretrain ones are trained on, and only with
    the fixed "I don't know" reply to the identity questions; Test_Set has ``test_photos`` photos each."""
    strangers = rows(world, "Strangers_Set")
    assert len(strangers) == CONFIG.n_strangers == len(summary["strangers"])
    assert sum(r["Pretrain"] for r in strangers) == CONFIG.pretrain_strangers
    assert all(len(r["images"]) == CONFIG.test_photos for r in strangers + rows(world, "Test_Set"))
    known = {p["name"] for p in summary["people"]}
    assert not known & {p["name"] for p in summary["strangers"]}
    traits = [tuple(p["traits"].values()) for p in summary["people"] + summary["strangers"]]
    assert len(set(traits)) == len(traits)  # no stranger wears a known person's face
    taught = {r["ID"] for r in strangers if r["Pretrain"]}
    stranger_rows = [r for r in rows(world, "Pretrain_Data") if r["ID"] >= world_module.STRANGER_ID_START]
    assert {r["ID"] for r in stranger_rows} == taught
    assert len(stranger_rows) == len(taught) * CONFIG.train_photos
    for r in stranger_rows:
        items = json.loads(r["metadata"])
        assert {i["Question"] for i in items} == set(world_module.IDENTITY_QUESTIONS)
        assert all(i["Answer"] == world_module.UNKNOWN_REPLY and i["Type"] == "Image_Textual" for i in items)
    assert not any(r["ID"] >= world_module.STRANGER_ID_START for r in rows(world, "ft_Data"))


def test_strangers_never_change_the_known_people(tmp_path: Path) -> None:
    small = WorldConfig(n_people=5, n_real=4, train_photos=1, test_photos=1)
    a = make_world(tmp_path / "a", replace(small, n_strangers=0, pretrain_strangers=0))
    b = make_world(tmp_path / "b", replace(small, n_strangers=3, pretrain_strangers=1))
    for folder in ("Full_Set", "ft_Data", "Test_Set", "Retain_Set"):
        assert (a / folder / PARQUET_NAME).read_bytes() == (b / folder / PARQUET_NAME).read_bytes()
    assert not (a / "Strangers_Set").exists()
    with pytest.raises(ValueError, match="pretrain_strangers"):
        WorldConfig(n_strangers=2, pretrain_strangers=3)
