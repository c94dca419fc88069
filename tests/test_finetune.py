"""Resuming an interrupted fine-tune: same settings only, every step logged once, checkpoints that
are either complete or absent."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mllm_unlearn.train.finetune as ft
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.tiny import make_tiny_model
from mllm_unlearn.train.finetune import finetune
from mllm_unlearn.train.loop import TrainConfig

from .conftest import SMALL, job_items

CFG = TrainConfig(steps=8, lr=3e-3, batch_size=2, warmup=2, log_every=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus):
    return make_tiny_model("llava", tmp_path_factory.mktemp("finetune") / "base", tiny_corpus, sizes=SMALL)


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
    """The uninterrupted run every resumed one must match."""
    return finetune(load_model(base), job_items()[0], CFG, tmp_path_factory.mktemp("straight") / "out")


def interrupt_at_step(monkeypatch, step: int) -> None:
    """The next finetune stops (KeyboardInterrupt) when it draws the batch of ``step``."""
    real = ft.batches

    def dying(*args, start_step=0, **kwargs):
        for t, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
            if t == step:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ft, "batches", dying)


def same_weights(a, b) -> bool:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_with_other_settings_is_refused_naming_each_change(base, tmp_path, monkeypatch):
    train = job_items()[0]
    interrupt_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_model(base), train, CFG, tmp_path / "out", checkpoint_every=2)
    monkeypatch.undo()

    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3, "batch_size": 4, "steps": 10})
    with pytest.raises(ValueError) as err:
        finetune(load_model(base), train, other, tmp_path / "out", checkpoint_every=2)
    for change in ("lr: 0.003 → 0.001", "batch_size: 2 → 4", "steps: 8 → 10"):
        assert change in str(err.value)
    assert "seed" not in str(err.value)  # unchanged settings are not listed

    with pytest.raises(ValueError, match="scope: 'all' → 'llm'"):
        finetune(load_model(base), train, CFG, tmp_path / "out", scope="llm", checkpoint_every=2)
    with pytest.raises(ValueError, match="train_fingerprint"):
        finetune(load_model(base), train[:-1], CFG, tmp_path / "out", checkpoint_every=2)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "checkpoint-4").is_dir()


def test_resumed_log_lists_every_step_once(base, straight, tmp_path, monkeypatch):
    train = job_items()[0]
    interrupt_at_step(monkeypatch, 5)  # steps 0-4 logged, checkpoint-4 holds steps 0-3
    with pytest.raises(KeyboardInterrupt):
        finetune(load_model(base), train, CFG, tmp_path / "out", checkpoint_every=2)
    monkeypatch.undo()

    out = finetune(load_model(base), train, CFG, tmp_path / "out", checkpoint_every=2)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(CFG.steps))
    expected = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert same_weights(out, straight)


def test_half_written_and_corrupt_checkpoints_fall_back_to_the_previous_one(base, straight, tmp_path, monkeypatch):
    train = job_items()[0]
    real_save, calls = ft.save_file, {"n": 0}

    def dies_writing_the_second_checkpoint(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)  # the weights land, the optimizer state never does
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_file", dies_writing_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_model(base), train, CFG, tmp_path / "out", checkpoint_every=2)
    monkeypatch.undo()
    work = tmp_path / "out.partial"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]  # no half-written checkpoint-4

    corrupt = work / "checkpoint-6"  # e.g. a truncated copy: complete-looking, unreadable
    corrupt.mkdir()
    (corrupt / ft.WEIGHTS_FILE).write_bytes((work / "checkpoint-2" / ft.WEIGHTS_FILE).read_bytes()[:100])
    (corrupt / ft.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="checkpoint-6"):
        out = finetune(load_model(base), train, CFG, tmp_path / "out", checkpoint_every=2)
    assert same_weights(out, straight)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(CFG.steps))
