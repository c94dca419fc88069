"""The demo end to end on a quick configuration: results, predictions and the audit of what it ran."""

import json

import pytest

from mllm_unlearn.evaluate.audit.oracle import oracle_model
from mllm_unlearn.evaluate.harness import EvalConfig
from mllm_unlearn.experiments.audit import quick_config
from mllm_unlearn.experiments.demo import SUMMARY_KEYS, DemoConfig, _train_oracle, run_demo
from mllm_unlearn.runtime.background import background
from mllm_unlearn.train.loop import TrainConfig


@pytest.mark.slow
def test_quick_demo_writes_results_and_audits_its_runs(tmp_path, capsys):
    q = quick_config(finetune_steps=300)
    cfg = DemoConfig(
        seed=3,
        forget=q.forget,
        world=q.world,
        sizes=q.sizes,
        finetune=q.finetune,
        unlearn=q.unlearn,
        eval=EvalConfig(mcq_mode="likelihood", max_new_tokens=8),
        audit=q.audit,
    )
    results = run_demo(tmp_path / "demo", cfg)
    out = tmp_path / "demo"
    assert set(results) == {"vanilla", "cvf_ncu"}
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "predictions_cvf_ncu.jsonl").is_file() and (out / "runs" / "cvf_ncu" / "adapter").is_dir()
    report = json.loads((out / "audit" / "report.json").read_text())
    assert {"vanilla", "oracle", "cvf_ncu"} <= set(report["runs"])
    for card in report["runs"].values():
        assert all(k in card["headline"] for k in SUMMARY_KEYS)
    # the vanilla model is the audit's zero: it forgot nothing, so its summary score is 0
    assert report["runs"]["vanilla"]["headline"]["summary"] == 0
    printed = capsys.readouterr().out
    assert "audit (details: audit/report.md)" in printed and "| cvf_ncu |" in printed
    assert not list(tmp_path.glob(".demo.tmp-*"))  # the work folder was renamed into place


def test_the_oracle_trained_in_a_second_process_is_the_same_bytes(setup):
    """``DemoConfig.parallel_oracle``: the spawned process gives the weights the main process gives."""
    root, world, data, tiny = setup
    cfg = TrainConfig(steps=12, lr=1e-3, batch_size=8, warmup=2)
    here = oracle_model(tiny, data, cfg, root / "oracle_here")
    with background(
        "the oracle", _train_oracle, tiny, world, "forget_10", cfg, root / "oracle_there", log=root / "oracle.log"
    ) as job:
        job.join()
    trained = list((root / "oracle_there").glob("oracle-*/config.json"))
    assert len(trained) == 1  # the second process trained and saved it
    there = oracle_model(tiny, data, cfg, root / "oracle_there")  # found in its cache, not trained again
    assert there == trained[0].parent
    assert there.name == here.name  # the same cache key: same base, data and settings
    files = sorted(p.name for p in here.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in there.glob("*.safetensors"))
    assert all((here / f).read_bytes() == (there / f).read_bytes() for f in files)
