"""The evaluation harness on a tiny model that was fine-tuned to know four people's jobs."""

from __future__ import annotations

import json

import pytest

from mllm_unlearn.evaluate.harness import EvalConfig, ItemResult, markdown_table, score_items, summarize
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.tiny import make_tiny_model
from mllm_unlearn.train.finetune import finetune
from mllm_unlearn.train.loop import TrainConfig

from .conftest import SMALL, job_items


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    """(base model dir, fine-tuned model dir): the fine-tune teaches jobs as free text and as letters."""
    from mllm_unlearn.data.prompts import format_mcq
    from mllm_unlearn.data.sample import Sample

    root = tmp_path_factory.mktemp("harness")
    base = make_tiny_model("llava", root / "base", tiny_corpus, sizes=SMALL)
    train, mcq = job_items()
    letters = [
        Sample(f"l{s.id}", s.person, "qa", "vqa", format_mcq(s.question, s.options), s.correct, s.image) for s in mcq
    ]
    out = finetune(
        load_model(base), train + letters, TrainConfig(steps=120, lr=3e-3, batch_size=8, warmup=10), root / "vanilla"
    )
    return base, out


def test_likelihood_scorer_picks_the_trained_option(trained):
    base, tuned = trained
    _, mcq = job_items()
    results = score_items(load_model(tuned), "forget", mcq, EvalConfig(mcq_mode="likelihood"))
    assert [r.prediction for r in results] == [s.correct for s in mcq]
    assert summarize(results, "likelihood")["forget_vqa"] == 1.0


def test_generation_protocol_reads_trained_letters(trained):
    _, tuned = trained
    _, mcq = job_items()
    results = score_items(load_model(tuned), "retain", mcq, EvalConfig(mcq_mode="generate", max_new_tokens=4))
    assert summarize(results)["retain_vqa"] == 1.0


def test_finetune_lowers_loss_and_refuses_existing_output(trained):
    base, tuned = trained
    log = [json.loads(line) for line in (tuned / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.2 * log[0]["loss"]
    assert not tuned.with_name(tuned.name + ".partial").exists()
    with pytest.raises(FileExistsError, match=str(tuned)):
        finetune(load_model(base), job_items()[0], TrainConfig(steps=1), tuned)


def test_summarize_keys_and_both_mode():
    rows = [
        ItemResult("a", "1", "forget", "mcq", "vqa", "letter", 1.0, "A"),
        ItemResult("a", "1", "forget", "mcq", "vqa", "lik", 0.0, "B"),
        ItemResult("b", "1", "forget", "mcq", "qa", "letter", 0.0, "C"),
        ItemResult("b", "1", "forget", "mcq", "qa", "lik", 1.0, "A"),
        ItemResult("c", "1", "forget", "gen", "vqa", "rougeL", 0.5, "x", recall=0.25),
    ]
    m = summarize(rows, "both")
    assert m["forget_vqa"] == 1.0 and m["forget_vqa_letter"] == 1.0 and m["forget_vqa_lik"] == 0.0
    assert m["forget_qa"] == 0.0 and m["forget_qa_lik"] == 1.0
    assert m["forget_vqa_rougeL"] == 0.5 and m["forget_vqa_rougeL_recall"] == 0.25
    only_lik = summarize([r for r in rows if r.metric != "letter"], "likelihood")
    assert only_lik["forget_vqa"] == 0.0 and "forget_vqa_lik" not in only_lik
    table = markdown_table({"vanilla": m})
    assert "| vanilla | 100.0 | 0.0 |" in table


def test_eval_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mcq_mode"):
        EvalConfig(mcq_mode="vibes")


def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_corpus):
    import torch
    from safetensors.torch import load_file

    import mllm_unlearn.train.finetune as ft

    base = make_tiny_model("llava", tmp_path / "base", tiny_corpus, sizes=SMALL)
    train, _ = job_items()
    cfg = TrainConfig(steps=8, lr=3e-3, batch_size=2, warmup=2)
    straight = finetune(load_model(base), train, cfg, tmp_path / "straight")

    real_loss, calls = ft.answer_nll, {"n": 0}

    def dies_at_step_6(lm, samples):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_loss(lm, samples)

    monkeypatch.setattr(ft, "answer_nll", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_model(base), train, cfg, tmp_path / "resumed", checkpoint_every=4)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "checkpoint-4").is_dir()
    calls["n"] = -100  # the second run must not die, and must only run the 4 steps after checkpoint-4
    resumed = finetune(load_model(base), train, cfg, tmp_path / "resumed", checkpoint_every=4)
    assert calls["n"] == -100 + 4
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
