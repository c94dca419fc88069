"""CVF-NCU end to end on a small world and a tiny random LLaVA: the guarantees the method promises."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from mllm_unlearn.cli.main import main
from mllm_unlearn.data.sample import DataError
from mllm_unlearn.evaluate.audit import load_audit_data
from mllm_unlearn.evaluate.audit.unseen import unseen_probe
from mllm_unlearn.experiments.continual import run_continual, stage_model
from mllm_unlearn.methods import get_method
from mllm_unlearn.methods.base import UnlearnContext, distinct_images
from mllm_unlearn.methods.cvf_ncu import CVFConfig
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.nullspace import lora_A_weights
from mllm_unlearn.runtime.options import parse_options
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people, unlearn_stage

FAST = dict(steps=6, batch_size=4, warmup=1)


def logits(lm, samples):
    batch = lm.arch.encode(lm.processor, samples, [s.question for s in samples])
    with torch.no_grad():
        return lm.model(**batch.inputs).logits


def test_cvf_ncu_changes_images_keeps_text_bit_identical_and_freezes_A(setup):
    _, _, data, model = setup
    lm = load_model(model)
    text = [s for s in data.splits["forget"] + data.splits["retain"] if s.image is None][:8]
    vqa = [s for s in data.splits["forget"] if s.image is not None][:4]
    before_text, before_img = logits(lm, text), logits(lm, vqa)

    forget, retain = split_people(data)
    adapted = attach_adapters(lm, retain, UnlearnConfig(**FAST), get_method("cvf_ncu"))
    a_before = lora_A_weights(adapted.model)
    history = unlearn_stage(adapted, get_method("cvf_ncu")(), forget, retain, UnlearnConfig(**FAST))

    assert torch.equal(logits(adapted, text), before_text)  # LLM frozen: text QA cannot move
    assert not torch.allclose(logits(adapted, vqa), before_img)  # the visual module did move
    after = lora_A_weights(adapted.model)
    assert a_before.keys() == after.keys() and all(torch.equal(a_before[k], after[k]) for k in after)
    assert all(p.requires_grad is False for n, p in adapted.model.named_parameters() if "lora_A" in n)
    with adapted.model.disable_adapter():  # the reference model is the original model
        assert torch.equal(logits(adapted, vqa), before_img)
    assert {"push", "pull", "ret", "gum"} <= history[0].keys()


def test_unlearn_cli_writes_a_peft_adapter_that_reloads(setup, capsys):
    root, world, data, model = setup
    out = root / "run"
    code = main(
        (
            f"unlearn --model {model} --data {world} --out {out} --steps 4 --batch-size 4 "
            f"--no-eval --opt push=nmse --cache-dir {root / 'cache'}"
        ).split()
    )
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["method_config"]["push"] == "nmse" and record["resolved"]["subspace"] == "null"
    assert record["resolved"]["rank"] == 16  # the rank used: cvf_ncu's 32 capped at half the 32-wide tower
    assert len(list((root / "cache").glob("*.safetensors"))) > 0  # covariances cached for the next run
    reloaded = PeftModel.from_pretrained(load_model(model).model, out / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in reloaded.named_parameters())
    # an existing output folder is refused before any work, with its name
    assert main(["unlearn", "--model", str(model), "--data", str(world), "--out", str(out), "--no-eval"]) == 2
    assert str(out) in capsys.readouterr().err


def test_unlearn_cli_continual_measures_each_request_on_its_unseen_photos(setup, tmp_path):
    """``unlearn --tasks``: per request Forget VQA on the training photos and, from the world's Test_Set,
    on the unseen photos too, equal to the audit's unseen probe pooled over the requests' items."""
    root, world, data, model = setup
    out = tmp_path / "cont"
    args = f"unlearn --model {model} --data {world} --forget forget_15 --tasks 2 --steps 2 --batch-size 2 --out {out}"
    assert main([*args.split(), "--cache-dir", str(root / "cache")]) == 0
    matrix = json.loads((out / "matrix.json").read_text())
    audit = load_audit_data(world, "forget_15")
    sizes = [len(audit.unseen_mcqs(people)) for people in matrix["tasks"]]
    per_task = matrix["before"]["unseen_forget_vqa_per_task"]
    pooled = sum(v * k for v, k in zip(per_task, sizes)) / sum(sizes)
    assert pooled == pytest.approx(unseen_probe(load_model(model), audit)["forget_vqa"])
    assert all(len(s["unseen_forget_vqa_per_task"]) == 2 for s in matrix["stages"])


def test_bad_requests_fail_clearly(setup, tmp_path):
    root, world, data, model = setup
    with pytest.raises(DataError, match="no training pairs for the forget people"):
        split_people(data, forget_people=["no-such-id"])
    with pytest.raises(ValueError, match="rank r=999 larger than the input width d=32 of layer model.vision_tower"):
        attach_adapters(load_model(model), split_people(data)[1], UnlearnConfig(rank=999), get_method("cvf_ncu"))
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*cvf_ncu"):
        get_method("nope")
    with pytest.raises(ValueError, match="bad option 'gamma=1' for CVFConfig; options: alpha"):
        parse_options(get_method("cvf_ncu").config_class, ["gamma=1"])
    with pytest.raises(ValueError, match="push must be one of"):
        parse_options(get_method("cvf_ncu").config_class, ["push=shove"])


def test_nan_loss_stops_with_a_clear_error_and_writes_nothing(setup, tmp_path):
    root, world, data, model = setup
    out = tmp_path / "nan_run"
    code = main(
        (
            f"unlearn --model {model} --data {world} --out {out} --steps 3 --batch-size 2 "
            f"--no-eval --lr nan --cache-dir {root / 'cache'}"
        ).split()
    )
    assert code == 2
    assert not out.exists() and not list(tmp_path.glob(".nan_run*"))


def test_ablation_switches_turn_terms_off(setup):
    _, _, data, model = setup
    lm = attach_adapters(
        load_model(model), split_people(data)[1], UnlearnConfig(subspace="random"), get_method("cvf_ncu")
    )
    forget, retain = split_people(data)
    ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0)
    cls = get_method("cvf_ncu")
    method = cls(cls.config_class(pull=False, ret=False, gum=False, push="nmse", queue_size=8))
    method.setup(ctx)
    loss, logs = method.loss(ctx, 0)
    assert logs["pull"] == logs["ret"] == logs["gum"] == 0.0
    assert loss.item() == pytest.approx(10.0 * logs["push"], rel=1e-5)  # alpha * lambda * L_nMSE
    assert len(distinct_images(forget)) < len([s for s in forget if s.image is not None])


def test_continual_run_writes_matrix_plots_and_resumes(setup, tmp_path):
    _, world, data, model = setup
    cfg = UnlearnConfig(steps=3, batch_size=2, warmup=1, cache_dir=str(tmp_path / "cache"))
    n = min(3, len(data.forget_people))
    unseen = load_audit_data(world, "forget_10")
    state = run_continual(load_model(model), data, tmp_path / "cont", cfg, n_tasks=n, unseen=unseen)
    assert len(state["stages"]) == n and all(len(s["forget_vqa_per_task"]) == n for s in state["stages"])
    for f in ("matrix.json", "heatmap.png", "curves.png", f"stage-{n}/adapter_model.safetensors"):
        assert (tmp_path / "cont" / f).exists(), f
    # per request on the unseen photos: weighted by its items, the audit's unseen probe of the same model
    per_task = state["before"]["unseen_forget_vqa_per_task"]
    sizes = [len(unseen.unseen_mcqs(people)) for people in state["tasks"]]
    assert min(sizes) >= 5 * len(unseen.unseen[state["tasks"][0][0]])  # every unseen photo, 5 questions each
    pooled = sum(v * k for v, k in zip(per_task, sizes)) / sum(sizes)
    assert pooled == pytest.approx(unseen_probe(load_model(model), unseen)["forget_vqa"])
    assert all(len(s["unseen_forget_vqa_per_task"]) == n for s in state["stages"])
    # a finished run given the same folder resumes past every stage: nothing is retrained
    again = run_continual(load_model(model), data, tmp_path / "cont", cfg, n_tasks=n, unseen=unseen)
    assert again["stages"] == state["stages"]
    # other method options (not only other driver settings) are refused, naming what changed; so is
    # resuming without the unseen photos the run was measured on
    with pytest.raises(ValueError, match="other method_config"):
        run_continual(
            load_model(model), data, tmp_path / "cont", cfg, CVFConfig(relearn_sim=0.0), n_tasks=n, unseen=unseen
        )
    with pytest.raises(ValueError, match="other unseen_photos"):
        run_continual(load_model(model), data, tmp_path / "cont", cfg, n_tasks=n)
    # a run recorded before the distill options existed (its config lacks their keys) resumes; one
    # recorded with another value of them would be refused
    progress = tmp_path / "cont" / "progress.json"
    record = json.loads(progress.read_text())
    old = {k: v for k, v in record["config"].items() if not k.startswith("distill_")}
    progress.write_text(json.dumps({**record, "config": old}))
    assert (
        run_continual(load_model(model), data, tmp_path / "cont", cfg, n_tasks=n, unseen=unseen)["stages"]
        == (state["stages"])
    )
    progress.write_text(json.dumps({**record, "config": {**old, "distill_noise": 0.1}}))
    with pytest.raises(ValueError, match="other config"):
        run_continual(load_model(model), data, tmp_path / "cont", cfg, n_tasks=n, unseen=unseen)


def test_recalibrate_gives_each_request_a_null_space_off_the_earlier_requests(setup, tmp_path):
    """``UnlearnConfig.recalibrate`` (continual, no replay): stage 2's A is calibrated on the model with
    stage 1's edit folded in, over the retain photos and request 1's: in every adapted layer it lets
    through less of request 1's input energy (as that model encodes them) than stage 1's A. The run is
    carried by ``merged/``; one interrupted after stage 1 resumes to the same bytes; replay and a single
    request are refused before any training."""
    import shutil

    from safetensors.torch import load_file

    from mllm_unlearn.data.mllmu import read_mllmu
    from mllm_unlearn.models.scoring import image_batches
    from mllm_unlearn.nullspace import collect_covariances, retain_energy
    from mllm_unlearn.train.unlearn import unlearn

    _, world, _, model = setup
    data = read_mllmu(world, forget="forget_15")
    cfg = UnlearnConfig(steps=3, batch_size=2, warmup=1, cache_dir=str(tmp_path / "cache"), recalibrate=True)
    out = tmp_path / "rc"
    state = run_continual(load_model(model), data, out, cfg, n_tasks=2, replay=False)
    a1, a2 = (load_file(out / f"stage-{k}" / "adapter_model.safetensors") for k in (1, 2))
    keys = [k for k in a1 if "lora_A" in k]
    names = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys]
    lm1 = stage_model(load_model(model), out, 1, recalibrated=True)
    first = distinct_images([s for s in data.train if s.person in state["tasks"][0]])
    forward = lambda m, x: lm1.arch.image_features(m, x)
    cov = collect_covariances(lm1.model, names, image_batches(lm1, first), forward=forward, progress=False)
    energy = [(retain_energy(a2[k], cov[n].cov), retain_energy(a1[k], cov[n].cov)) for k, n in zip(keys, names)]
    assert keys and all(e2 < e1 for e2, e1 in energy), energy
    merged_weights = load_file(out / "merged" / "model.safetensors")

    progress = json.loads((out / "progress.json").read_text())
    (out / "progress.json").write_text(json.dumps({**progress, "stages": progress["stages"][:1]}))
    shutil.rmtree(out / "stage-2")
    shutil.rmtree(out / "merged")
    again = run_continual(load_model(model), data, out, cfg, n_tasks=2, replay=False)
    assert again["stages"] == state["stages"]
    resumed = load_file(out / "merged" / "model.safetensors")
    assert resumed.keys() == merged_weights.keys() and all(torch.equal(resumed[k], merged_weights[k]) for k in resumed)

    with pytest.raises(ValueError, match="without replay"):
        run_continual(load_model(model), data, tmp_path / "replayed", cfg, n_tasks=2)
    assert not (tmp_path / "replayed").exists()
    with pytest.raises(ValueError, match="per request of a continual run"):
        unlearn(load_model(model), data, cfg)
