"""``mllm-unlearn forget``: deletion requests from plain photo folders, the report, resume, bad input.

The end-to-end test lays the synthetic world's photos out as a user would (PNG files in one folder
per person, names only in the request file, no parquet), teaches a tiny LLaVA to name everyone from
photos, forgets 2 people and reads the report.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import mllm_unlearn.experiments.forget as forget_mod
from mllm_unlearn.cli.forget import add_parser
from mllm_unlearn.data.request import read_request
from mllm_unlearn.data.sample import DataError, Sample
from mllm_unlearn.data.world import PARQUET_NAME, WorldConfig, make_world
from mllm_unlearn.evaluate.metrics import classify_name as classify
from mllm_unlearn.experiments.forget import DISTILL_PROMPTS, IDENTITY_PROMPTS, TEXT_PROBES
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.tiny import TinySizes, make_tiny_model
from mllm_unlearn.train.finetune import finetune
from mllm_unlearn.train.loop import TrainConfig

torch.set_num_threads(1)

SIZES = TinySizes(vision_hidden=32, text_hidden=64, text_intermediate=128, vocab_size=400)
WORLD = WorldConfig(
    n_people=10, n_real=4, train_photos=4, test_photos=2, n_strangers=0, pretrain_strangers=0, image_size=32, seed=0
)
N_FORGET, N_STRANGERS = 2, 2
THINGS = [
    ("a red square", (220, 30, 30)),
    ("a green square", (30, 200, 40)),
    ("a blue square", (40, 40, 220)),
    ("a yellow square", (230, 220, 40)),
]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["forget", *argv])


def _png_bytes(color, size: int = 32, seed: int = 0) -> bytes:
    img = Image.new("RGB", (size, size), color)
    img.paste((255, 255, 255), (seed * 5 % 20, seed * 3 % 20, seed * 5 % 20 + 8, seed * 3 % 20 + 8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def lay_out_world(root: Path) -> dict:
    """The world's photos as plain files: ``photos/<first_last>/N.png`` for every person (training and
    test photos), ``things/*.png``, and ``request.yaml`` naming the people. Returns what was laid out."""
    world = make_world(root / "world", WORLD)
    summary = json.loads((world / "world.json").read_text())
    names = {p["ID"]: p["name"] for p in summary["people"]}
    photos: dict[int, list[bytes]] = {i: [] for i in names}
    for split in ("ft_Data", "Pretrain_Data"):
        for row in pq.read_table(world / split / PARQUET_NAME).to_pylist():
            photos[row["ID"]].append(row["image"]["bytes"])
    for row in pq.read_table(world / "Test_Set" / PARQUET_NAME).to_pylist():
        photos[row["ID"]] += [img["bytes"] for img in row["images"]]
    ids = sorted(names)
    forget, strangers = ids[:N_FORGET], ids[N_FORGET : N_FORGET + N_STRANGERS]
    retain = ids[N_FORGET + N_STRANGERS :]
    folder = {i: f"photos/{names[i].replace(' ', '_').lower()}" for i in ids}
    for i in ids:
        (root / folder[i]).mkdir(parents=True)
        for k, data in enumerate(photos[i]):
            (root / folder[i] / f"{k}.png").write_bytes(data)
    (root / "things").mkdir()
    for k, (_, color) in enumerate(THINGS):
        for j in range(2):
            (root / "things" / f"{k}_{j}.png").write_bytes(_png_bytes(color, seed=j + 1))
    request = {
        "forget": [{"name": names[i], "photos": folder[i]} for i in forget],
        "retain": [{"name": names[i], "photos": folder[i]} for i in retain] + [{"photos": "things"}],
        "strangers": [{"photos": folder[i]} for i in strangers],
    }
    (root / "request.yaml").write_text(yaml.safe_dump(request, sort_keys=False))
    # what the production model was taught: the world's training photos of everyone but the strangers
    seen = {names[i]: photos[i][: WORLD.train_photos] for i in forget + retain}
    return {
        "names": names,
        "forget": [names[i] for i in forget],
        "retain": [names[i] for i in retain],
        "strangers": [names[i] for i in strangers],
        "seen": seen,
    }


def naming_data(world: dict) -> list[Sample]:
    """The 'production' knowledge: who is on each seen photo, asked in every identity prompt; the things."""
    from mllm_unlearn.data.sample import ImageRef

    out = []
    prompts = tuple(dict.fromkeys(IDENTITY_PROMPTS + DISTILL_PROMPTS[1:]))
    for name, blobs in world["seen"].items():
        for k, data in enumerate(blobs):
            out += [
                Sample(f"{name}/{k}/{j}", name, "qa", "vqa", q, f"This is {name}.", ImageRef(data, name))
                for j, q in enumerate(prompts)
            ]
    for k, (what, color) in enumerate(THINGS):
        for j in range(2):
            img = ImageRef(_png_bytes(color, seed=j + 1), what)
            out.append(Sample(f"thing/{k}/{j}", "", "qa", "vqa", "Describe this image.", f"This is {what}.", img))
    return out


def corpus(world: dict) -> list[str]:
    texts = [
        f"USER: <image>\n{q}\nASSISTANT: This is {n}."
        for n in world["names"].values()
        for q in IDENTITY_PROMPTS + DISTILL_PROMPTS
    ]
    texts += [f"USER: <image>\nDescribe this image.\nASSISTANT: This is {w}." for w, _ in THINGS]
    texts += [f"USER: {q.format(name=n)}\nASSISTANT:" for q in TEXT_PROBES for n in world["names"].values()]
    return texts * 3


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    """(root, world layout, a tiny LLaVA fine-tuned to name the people) — built once."""
    root = tmp_path_factory.mktemp("forget")
    t0 = time.perf_counter()
    world = lay_out_world(root)
    make_tiny_model("llava", root / "base", corpus(world), sizes=SIZES)
    lm = load_model(root / "base")
    finetune(
        lm,
        naming_data(world),
        TrainConfig(steps=300, lr=2e-3, batch_size=16, warmup=20),
        root / "vanilla",
        checkpoint_every=0,
    )
    world["setup_s"] = time.perf_counter() - t0
    return root, world, root / "vanilla"


@pytest.mark.slow
def test_forget_two_people_end_to_end(vanilla, capsys, monkeypatch):
    root, world, model = vanilla
    given, real_attach = {}, forget_mod.attach_adapters  # the request's stranger photos reach NCU's calibration

    def attach(lm, retain, cfg, method, strangers=()):
        given["calibration"] = [s.image.data for s in strangers]
        return real_attach(lm, retain, cfg, method, strangers)

    monkeypatch.setattr(forget_mod, "attach_adapters", attach)
    t0 = time.perf_counter()
    args = _cli(
        [
            "--model",
            str(model),
            "--request",
            str(root / "request.yaml"),
            "--out",
            str(root / "run"),
            "--cache-dir",
            str(root / "cache"),
            "--merge",
        ]
    )
    report = args.fn(args)
    wall = time.perf_counter() - t0
    s = report["summary"]
    print(
        "\nFIGURES",
        json.dumps(
            {
                "summary": s,
                "setup_s": round(world["setup_s"], 1),
                "forget_s": round(wall, 1),
                "people": {p["name"]: [p["before"], p["after"]] for p in report["people"]},
                "strangers": report["strangers"],
                "timings": report["timings"],
                "checks": {
                    k: [v["forget_named"], v["forget_misidentified"], v["retain_named"]]
                    for k, v in report["checks"].items()
                },
            }
        ),
    )
    run = root / "run"
    for f in (
        "adapter/adapter_config.json",
        "run.json",
        "report.json",
        "report.md",
        "report.png",
        "distill.jsonl",
        "merged/config.json",
    ):
        assert (run / f).is_file(), f
    request = yaml.safe_load((root / "request.yaml").read_text())
    n_strangers = sum(len(list((root / pool["photos"]).iterdir())) for pool in request["strangers"])
    assert len(given["calibration"]) == n_strangers > 0
    assert json.loads((run / "run.json").read_text())["resolved"]["calibrate_strangers"] is True
    assert s["forget_named_before"] >= 0.8  # the model did know them
    assert s["forget_named_after"] <= 0.2
    assert s["retain_name_recall_after"] >= 0.9 * s["retain_name_recall_before"]
    assert "forget_misidentified_after" in s and all("misidentified" in p["after"] for p in report["people"])
    assert s["text_logits_identical"]
    assert set(report["checks"]) == {"quant", "finetune"}
    md = (run / "report.md").read_text()
    assert all(name in md for name in world["forget"]) and "## Replies on held-out photos" in md

    # the adapter loads with plain PEFT
    from peft import PeftModel

    lm = load_model(model)
    PeftModel.from_pretrained(lm.model, str(run / "adapter"))

    # resume with a new request: a retain person asks to be forgotten too
    more = {
        "forget": [{"name": world["retain"][0], "photos": f"photos/{world['retain'][0].replace(' ', '_').lower()}"}],
        "retain": [{"name": n, "photos": f"photos/{n.replace(' ', '_').lower()}"} for n in world["retain"][1:]],
    }
    (root / "more.yaml").write_text(yaml.safe_dump(more))
    # the run continues with the method config it recorded, not this version's defaults (keep_forgotten
    # acts only without replay, so this edit leaves the training below unchanged)
    record = json.loads((run / "run.json").read_text())
    assert record["method_config"]["keep_forgotten"] == 1.0
    record["method_config"]["keep_forgotten"] = 0.5
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="rank=4"):  # settings must equal the recorded run's
        forget_mod.run_forget([root / "more.yaml"], root / "run2", {"rank": 4}, resume=run)
    assert not (root / "run2").exists()
    args = _cli(
        [
            "--resume",
            str(run),
            "--request",
            str(root / "more.yaml"),
            "--out",
            str(root / "run2"),
            "--cache-dir",
            str(root / "cache"),
            "--steps",
            "200",
            "--checks",
            "none",
        ]
    )
    report2 = args.fn(args)
    assert [p["name"] for p in report2["people"]] == world["forget"] + world["retain"][:1]
    assert json.loads((root / "run2" / "run.json").read_text())["method_config"]["keep_forgotten"] == 0.5
    a1 = _lora_A(run / "adapter")
    a2 = _lora_A(root / "run2" / "adapter")
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)  # A stays
    print(
        "\nRESUME",
        json.dumps(
            {
                "summary": report2["summary"],
                "timings": report2["timings"],
                "people": {p["name"]: p["after"] for p in report2["people"]},
            }
        ),
    )
    assert report2["summary"]["forget_named_after"] <= 0.2
    assert report2["summary"]["text_logits_identical"]


def _lora_A(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_A" in k}


def test_calibrate_strangers_flag_reaches_the_unlearn_config():
    from mllm_unlearn.cli.forget import settings_from_args
    from mllm_unlearn.experiments.forget import resolve_settings

    for argv, expected in (([], None), (["--no-calibrate-strangers"], False), (["--calibrate-strangers"], True)):
        args = _cli(["--model", "m", "--request", "r.yaml", "--out", "o", *argv])
        settings = resolve_settings(settings_from_args(args), None)
        assert settings.unlearn_config().calibrate_strangers is expected
    # on resume, a run recorded before the flag existed keeps cvf_ncu's default
    assert resolve_settings({}, {"steps": 200}).calibrate_strangers is None


def test_name_matching():
    known = ["Ana Lind", "Bram Okafor"]
    assert classify("This is ana lind.", "Ana Lind", known) == "named"
    assert classify("That's Ms Lind", "Ana Lind", known) == "named"
    assert classify("This is Bram Okafor.", "Ana Lind", known) == "other"
    assert classify("Lindsay is here", "Ana Lind", known) == "neither"
    assert classify("I do not know.", "Ana Lind", known) == "neither"
    # a shared surname: the full name of someone else is a misidentification, not a recall
    assert classify("This is Otto Lind.", "Ana Lind", known + ["Otto Lind"]) == "other"
    assert classify("This is Lind.", "Ana Lind", known + ["Otto Lind"]) == "named"
    assert classify("Otto Lind or Ana Lind?", "Ana Lind", known + ["Otto Lind"]) == "named"


# -- bad input: each checked before any model loads, file and field named, nothing written -------------
@pytest.fixture
def request_dir(tmp_path, monkeypatch):
    """A valid small request (two people with 3 photos, a retain pool), and a model loader that fails."""
    for person, color in (("ana", (200, 40, 40)), ("bram", (40, 200, 40)), ("keep", (40, 40, 200))):
        (tmp_path / person).mkdir()
        for k in range(3):
            (tmp_path / person / f"{k}.png").write_bytes(_png_bytes(color, seed=k))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded for a bad request")

    monkeypatch.setattr(forget_mod, "load_model", no_model)
    doc = {
        "forget": [{"name": "Ana Lind", "photos": "ana"}, {"name": "Bram Okafor", "photos": "bram"}],
        "retain": [{"name": "Cleo Brandt", "photos": "keep"}],
    }
    return tmp_path, doc


def _refused(root: Path, doc: dict, *needles: str) -> str:
    req = root / "request.yaml"
    req.write_text(yaml.safe_dump(doc))
    args = _cli(["--model", "unused/model", "--request", str(req), "--out", str(root / "run")])
    with pytest.raises(DataError) as err:
        args.fn(args)
    msg = str(err.value)
    assert str(req) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert not (root / "run").exists()
    assert not list(root.glob(".run.tmp-*"))
    return msg


def test_valid_request_reads(request_dir):
    root, doc = request_dir
    (root / "request.yaml").write_text(yaml.safe_dump(doc))
    req = read_request(root / "request.yaml")
    assert [p.name for p in req.forget] == ["Ana Lind", "Bram Okafor"] and len(req.forget[0].photos) == 3
    assert req.retain[0].name == "Cleo Brandt" and len(req.retain[0].photos) == 3


def test_csv_request_reads(request_dir):
    root, _ = request_dir
    (root / "request.csv").write_text(
        "role,name,path\nforget,Ana Lind,ana\nforget,Bram Okafor,bram/0.png\n"
        "forget,Bram Okafor,bram/1.png\nretain,,keep\n"
    )
    req = read_request(root / "request.csv")
    assert [len(p.photos) for p in req.forget] == [3, 2] and req.retain[0].name is None


def test_unreadable_image(request_dir):
    root, doc = request_dir
    (root / "ana" / "1.png").write_bytes(b"not a png at all")
    _refused(root, doc, "ana/1.png", "forget[0] (Ana Lind) field 'photos'", "cannot be decoded")


def test_person_with_fewer_than_two_photos(request_dir):
    root, doc = request_dir
    doc["forget"][1]["photos"] = "bram/0.png"
    _refused(root, doc, "forget[1] (Bram Okafor) field 'photos'", "at least 2")


def test_person_photo_in_retain_pool(request_dir):
    root, doc = request_dir
    shutil.copy(root / "ana" / "2.png", root / "keep" / "copy_of_ana.png")
    _refused(root, doc, "ana/2.png", "keep/copy_of_ana.png", "retain pool", "forget (Ana Lind) 'photos'")


def test_duplicate_photos(request_dir):
    root, doc = request_dir
    shutil.copy(root / "ana" / "0.png", root / "ana" / "again.png")
    _refused(root, doc, "duplicate photo", "ana/again.png", "ana/0.png", "'photos'")


def test_missing_name(request_dir):
    root, doc = request_dir
    del doc["forget"][1]["name"]
    _refused(root, doc, "forget[1]", "field 'name' is missing")


def test_empty_retain_pool(request_dir):
    root, doc = request_dir
    doc["retain"] = []
    _refused(root, doc, "field 'retain' holds no images")


def test_missing_photo_file(request_dir):
    root, doc = request_dir
    doc["forget"][0]["photos"] = ["ana/0.png", "ana/nope.png"]
    _refused(root, doc, "forget[0] (Ana Lind) field 'photos'", "ana/nope.png", "does not exist")


def test_holdout_and_verify_folder(request_dir):
    """A share of each person's photos is held out, or the --verify folder's DIR/<name>/ photos."""
    root, doc = request_dir
    (root / "request.yaml").write_text(yaml.safe_dump(doc))
    (root / "verify" / "Ana Lind").mkdir(parents=True)
    for k in range(2):
        (root / "verify" / "Ana Lind" / f"{k}.png").write_bytes(_png_bytes((90, 90, 10), seed=k + 7))
    _, plan, _ = forget_mod.prepare(
        [root / "request.yaml"], root / "run", {"model": "unused"}, verify_dir=root / "verify"
    )
    assert [ph.path.parent.name for ph in plan.heldout["Ana Lind"]] == ["Ana Lind", "Ana Lind"]
    assert len(plan.train["Ana Lind"]) == 3
    assert (len(plan.train["Bram Okafor"]), len(plan.heldout["Bram Okafor"])) == (2, 1)
    assert (len(plan.retain_train), len(plan.retain_eval)) == (2, 1)
    assert not plan.retain_eval_seen and plan.known_names == ["Ana Lind", "Bram Okafor", "Cleo Brandt"]
    assert not (root / "run").exists()
