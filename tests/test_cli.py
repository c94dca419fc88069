"""The command line: clear errors on bad input, stable output keys, merged models that reload."""

from __future__ import annotations

import json

import torch
from peft import PeftModel

from mllm_unlearn.cli.main import main
from mllm_unlearn.models.loading import load_model

STABLE_KEYS = {"forget_vqa", "forget_qa", "retain_vqa", "retain_qa", "real_vqa", "real_qa", "test_vqa"}


def test_unknown_arch_names_the_supported_ones(setup, tmp_path, capsys):
    _, world, _, _ = setup
    assert main(["make-tiny-model", "--arch", "gpt5v", "--world", str(world), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'gpt5v'; supported: llava" in err
    assert not (tmp_path / "m").exists()


def test_make_world_refuses_an_existing_folder(setup, capsys):
    _, world, _, _ = setup
    assert main(["make-world", "--out", str(world)]) == 2
    assert f"{world}: already exists" in capsys.readouterr().err


def test_evaluate_writes_every_stable_key(setup, tmp_path):
    _, world, _, model = setup
    out = tmp_path / "metrics.json"
    assert (
        main(
            (
                f"evaluate --model {model} --data {world} --mcq-mode both --max-new-tokens 4 "
                f"--name tiny --out {out} --predictions {tmp_path / 'replies' / 'items.jsonl'}"
            ).split()
        )
        == 0
    )
    metrics = json.loads(out.read_text())["tiny"]
    items = [json.loads(line) for line in (tmp_path / "replies" / "items.jsonl").read_text().splitlines()]
    assert {"id", "split", "metric", "score", "prediction"} <= items[0].keys()
    generated = [i for i in items if i["metric"] in ("letter", "cloze", "rougeL")]
    assert generated and all(isinstance(i["prediction"], str) for i in generated)  # what the model said
    assert {i["split"] for i in items} >= {"forget", "retain", "real"}
    assert metrics.keys() >= STABLE_KEYS
    assert {"forget_vqa_lik", "forget_vqa_letter", "retain_vqa_cloze", "retain_qa_rougeL_recall"} <= metrics.keys()
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_merge_writes_a_plain_model_equal_to_the_adapted_one(setup, tmp_path):
    root, world, data, model = setup
    out = tmp_path / "run"
    assert (
        main(
            (
                f"unlearn --model {model} --data {world} --out {out} --steps 3 --batch-size 2 "
                f"--no-eval --merge --cache-dir {root / 'cache'}"
            ).split()
        )
        == 0
    )
    merged = load_model(out / "merged")
    adapted = PeftModel.from_pretrained(load_model(model).model, out / "adapter")
    samples = [s for s in data.splits["forget"] if s.image is not None][:2]
    batch = merged.arch.encode(merged.processor, samples, [s.question for s in samples])
    with torch.no_grad():
        assert torch.allclose(merged.model(**batch.inputs).logits, adapted(**batch.inputs).logits, atol=1e-4)


def test_unlearn_runs_on_a_bf16_base_with_float32_adapters(setup, tmp_path):
    root, world, _, model = setup
    out = tmp_path / "bf16"
    assert (
        main(
            (
                f"unlearn --model {model} --data {world} --out {out} --steps 2 --batch-size 2 "
                f"--dtype bf16 --no-eval --cache-dir {tmp_path / 'c'}"
            ).split()
        )
        == 0
    )
    from safetensors.torch import load_file

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_every_command_scores_umu_bench_with_the_umu_protocol(setup, tmp_path, monkeypatch):
    """One EvalConfig builder: unlearn and ablations used to score UMU-Bench with the MLLMU protocol."""
    import mllm_unlearn.evaluate.harness as harness
    import mllm_unlearn.experiments.ablations as ablations
    import mllm_unlearn.train.unlearn as driver

    from .test_clear_umu import write_umu

    _, _, _, model = setup
    umu = write_umu(tmp_path / "UMU-Bench")
    seen = []

    def evaluate(lm, data, cfg=None, predictions_file=None):
        seen.append(cfg)
        return {"forget_vqa": 0.5}

    monkeypatch.setattr(harness, "evaluate", evaluate)
    monkeypatch.setattr(driver, "unlearn", lambda lm, data, cfg, method_cfg=None, **kw: (lm, []))
    monkeypatch.setattr(driver, "save_run", lambda lm, out, record, merge=False: out)
    monkeypatch.setattr(ablations, "run_ablations", lambda load, data, out, cfg, eval_cfg: seen.append(eval_cfg))
    common = ["--model", str(model), "--data", str(umu), "--benchmark", "umu"]
    assert main(["unlearn", *common, "--out", str(tmp_path / "run")]) == 0
    assert main(["ablations", *common, "--out", str(tmp_path / "abl")]) == 0
    assert main(["evaluate", *common, "--batch-size", "4", "--max-new-tokens", "7"]) == 0
    assert [c.protocol for c in seen] == ["umu"] * 3
    assert [c.mcq_mode for c in seen] == ["likelihood", "likelihood", "generate"]
    assert (seen[0].batch_size, seen[0].max_new_tokens) == (32, 50)  # --batch-size is unlearn's training batch
    assert (seen[2].batch_size, seen[2].max_new_tokens) == (4, 7)


def test_audit_and_forget_are_sub_commands_that_report_bad_input(tmp_path, capsys):
    """Both commands are wired into the main parser and end bad input with exit 2 and one message."""
    assert main(["audit", "--out", str(tmp_path / "a")]) == 2
    assert "give --vanilla and --data" in capsys.readouterr().err
    assert main(["forget", "--request", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "f")]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_unlearn_distils_on_a_folder_of_images_and_refuses_a_corrupt_one(setup, tmp_path, capsys):
    root, world, data, model = setup
    faces = tmp_path / "faces"
    faces.mkdir()
    for k, s in enumerate([s for s in data.train if s.image is not None][:3]):
        (faces / f"{k}.png").write_bytes(s.image.data)
    (faces / "broken.png").write_bytes(b"not a png")
    base = f"unlearn --model {model} --data {world} --steps 2 --batch-size 2 --no-eval --cache-dir {root / 'cache'}"
    assert main(f"{base} --out {tmp_path / 'a'} --distill-steps 3 --distill-images {faces}".split()) == 2
    assert "--distill-images" in (err := capsys.readouterr().err) and "broken.png" in err
    assert not (tmp_path / "a").exists()
    assert main(f"{base} --out {tmp_path / 'b'} --distill-images {faces}".split()) == 2
    assert "--distill-images needs --distill-steps" in capsys.readouterr().err
    (faces / "broken.png").unlink()
    assert main(f"{base} --out {tmp_path / 'c'} --distill-steps 3 --distill-images {faces}".split()) == 0
    run = json.loads((tmp_path / "c" / "run.json").read_text())
    assert run["unlearn"]["distill_steps"] == 3 and [r["distill_step"] for r in run["log"] if "distill_step" in r] == [
        0,
        2,
    ]
    assert (tmp_path / "c" / "merged" / "config.json").is_file() and not (tmp_path / "c" / "adapter").exists()


def test_demo_trains_the_oracle_in_process_when_asked(tmp_path, monkeypatch):
    """``demo --oracle-in-process`` switches ``DemoConfig.parallel_oracle`` off; by default it is on."""
    from mllm_unlearn.experiments import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, cfg: seen.append(cfg.parallel_oracle))
    assert main(["demo", "--out", str(tmp_path / "a")]) == 0
    assert main(["demo", "--out", str(tmp_path / "b"), "--oracle-in-process"]) == 0
    assert seen == [True, False]
