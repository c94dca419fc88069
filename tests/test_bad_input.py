"""Bad input on the command line is refused before any work: no model loaded, nothing trained, nothing
written, exit code 2 and a one-paragraph message that names the file and the field at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllm_unlearn.cli.main import main
from mllm_unlearn.data.world import PARQUET_NAME
from mllm_unlearn.models import loading
from mllm_unlearn.models.base import supported_archs


@pytest.fixture
def no_model(monkeypatch) -> list:
    """Loading a model fails the test: every refusal must come before it."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    return calls


def corrupt_image(world: Path, tmp_path: Path, folder: str) -> tuple[Path, Path]:
    """A copy of ``world`` whose ``folder`` split has undecodable bytes as every row's image."""
    root = shutil.copytree(world, tmp_path / "world")
    file = root / folder / PARQUET_NAME
    table = pq.read_table(file)
    rows = table.to_pylist()
    column = "images" if "images" in table.column_names else "image"
    for row in rows:
        (row[column][0] if column == "images" else row[column])["bytes"] = b"this is not a png"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file)
    return root, file


def refused(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one paragraph
    for part in parts:
        assert part in err, err
    return err


def common(world: Path, model: Path | str) -> list[str]:
    return ["--model", str(model), "--data", str(world)]


# ------------------------------------------------------------------ 1. corrupt images, found up front


@pytest.mark.parametrize(
    ("command", "folder", "extra"),
    [
        ("evaluate", "forget_10", []),  # an evaluation split
        ("evaluate", "Test_Set", []),  # its images are a list column
        ("finetune", "ft_Data", ["--steps", "1"]),  # the training pairs
        ("unlearn", "ft_Data", ["--steps", "1"]),
        ("unlearn", "ft_Data", ["--steps", "1", "--no-eval"]),  # calibration and training still decode them
        ("unlearn", "retain_90", ["--steps", "1"]),  # used to fail only after training
        ("ablations", "Retain_Set", ["--steps", "1"]),
    ],
)
def test_a_corrupt_image_is_refused_before_loading(setup, tmp_path, capsys, no_model, command, folder, extra):
    _, world, _, model = setup
    root, file = corrupt_image(world, tmp_path, folder)
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache_arg = ["--cache-dir", str(cache)] if command in ("unlearn", "ablations") else []
    assert main([command, *common(root, model), "--out", str(out), *extra, *cache_arg]) == 2
    refused(capsys, str(file), "row ", "field 'image", "cannot be decoded")
    assert not no_model and not out.exists() and not cache.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary folder left either


# ------------------------------------------------------------------ 2. --model


@pytest.mark.parametrize("typo", ["./no-such-model", "runs/ft/vanila", "/no/such/model", "~/no-such-model-x"])
def test_a_missing_local_model_folder_is_named(setup, tmp_path, capsys, monkeypatch, typo):
    _, world, _, _ = setup
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", *common(world, typo)]) == 2
    refused(capsys, "no such model folder", typo)


def test_a_folder_without_config_json_is_named(setup, tmp_path, capsys):
    _, world, _, model = setup
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(Path(model) / "model.safetensors", folder)
    assert main(["evaluate", *common(world, folder)]) == 2
    refused(capsys, str(folder), "config.json", "missing")


def test_an_unknown_model_type_lists_the_supported_architectures(setup, tmp_path, capsys):
    _, world, _, model = setup
    folder = shutil.copytree(model, tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt5v"}))
    assert main(["evaluate", *common(world, folder)]) == 2
    err = refused(capsys, str(folder / "config.json"), "'gpt5v'", ", ".join(supported_archs()))
    assert "upgrade" not in err.lower()


def test_a_hub_id_still_goes_to_from_pretrained(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def from_pretrained(name, **kwargs):
        seen.append(name)
        raise Stop

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        loading.load_model("llava-hf/llava-1.5-7b-hf")
    assert seen == ["llava-hf/llava-1.5-7b-hf"]


# ------------------------------------------------------------------ 3. --opt


@pytest.mark.parametrize(
    ("opt", "parts"),
    [
        ("pull=ture", ("pull='ture'", "expected a boolean")),
        ("alpha=abc", ("alpha='abc'", "expected float")),
        ("nosuch=1", ("'nosuch=1'", "options: ")),
    ],
)
def test_a_bad_method_option_is_named_before_loading(setup, tmp_path, capsys, no_model, opt, parts):
    _, world, _, model = setup
    out = tmp_path / "run"
    assert main(["unlearn", *common(world, model), "--out", str(out), "--opt", opt]) == 2
    refused(capsys, *parts)
    assert not no_model and not out.exists()


# ------------------------------------------------------------------ 5. output paths checked first


def test_finetune_out_that_is_a_file_is_refused_before_loading(setup, tmp_path, capsys, no_model):
    _, world, _, model = setup
    (tmp_path / "ft").write_text("")
    assert main(["finetune", *common(world, model), "--out", str(tmp_path / "ft")]) == 2
    refused(capsys, str(tmp_path / "ft"), "is a file")
    assert not no_model


@pytest.mark.parametrize(
    ("command", "target"), [("evaluate", "m.json"), ("finetune", "run"), ("unlearn", "run"), ("ablations", "run")]
)
def test_an_out_that_cannot_be_written_is_refused_before_loading(setup, tmp_path, capsys, no_model, command, target):
    _, world, _, model = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([command, *common(world, model), "--out", str(blocker / target)]) == 2
    refused(capsys, str(blocker / target), "not a folder")
    assert not no_model


def test_an_unwritable_cache_dir_is_refused_before_loading(setup, tmp_path, capsys, no_model):
    _, world, _, model = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert (
        main(["unlearn", *common(world, model), "--out", str(tmp_path / "run"), "--cache-dir", str(blocker / "cache")])
        == 2
    )
    refused(capsys, str(blocker / "cache"), "not a folder")
    assert not no_model


def test_an_existing_unlearn_out_is_refused_before_loading(setup, tmp_path, capsys, no_model):
    _, world, _, model = setup
    assert main(["unlearn", *common(world, model), "--out", str(tmp_path)]) == 2
    refused(capsys, str(tmp_path), "already exists; choose a new --out")
    assert not no_model


def test_evaluate_out_in_a_missing_folder_is_created(setup, tmp_path):
    _, world, _, model = setup
    out = tmp_path / "new" / "folder" / "m.json"
    assert main(["evaluate", *common(world, model), "--mcq-mode", "likelihood", "--out", str(out)]) == 0
    assert json.loads(out.read_text()).keys() == {"tiny"}


# ------------------------------------------------------------------ 6. the NCU cache lives in a user cache folder


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from mllm_unlearn.nullspace.cache import default_cache_dir

    monkeypatch.delenv("MLLM_UNLEARN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mllm-unlearn" / "ncu"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mllm-unlearn" / "ncu"
    monkeypatch.setenv("MLLM_UNLEARN_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_unlearn_leaves_the_model_folder_alone_and_caches_in_the_user_cache(setup, tmp_path, monkeypatch):
    _, world, _, model = setup
    model = shutil.copytree(model, tmp_path / "vanilla")
    before = snapshot(model)
    monkeypatch.setenv("MLLM_UNLEARN_CACHE", str(tmp_path / "cache"))
    argv = ["unlearn", *common(world, model), "--steps", "1", "--batch-size", "2", "--no-eval"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert snapshot(model) == before
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert entries
    stamps = snapshot(tmp_path / "cache")
    assert main([*argv, "--out", str(tmp_path / "run2")]) == 0  # the second run reads the same entries
    assert snapshot(tmp_path / "cache") == stamps


# ------------------------------------------------------------------ messages under accelerate launch


def test_errors_print_once_per_launch(setup, tmp_path, capsys, monkeypatch, no_model):
    """Every process of ``accelerate launch`` hits the same error; only the main one prints it."""
    from mllm_unlearn.runtime import distributed

    _, world, _, model = setup
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert main(["unlearn", *common(world, model), "--out", str(tmp_path / "run"), "--opt", "pull=ture"]) == 2
    assert capsys.readouterr() == ("", "")
