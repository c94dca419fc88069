"""The audit (issue #9): every probe on a tiny world, and a test per probe showing that it can fail."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_unlearn.evaluate.audit import load_audit_data, load_run
from mllm_unlearn.evaluate.audit.card import HEADLINE, References, summary_score
from mllm_unlearn.evaluate.audit.forget_quality import forget_items_scores, forget_quality
from mllm_unlearn.evaluate.audit.identity import classify_reply, count_replies
from mllm_unlearn.evaluate.audit.mia import auc
from mllm_unlearn.evaluate.audit.oracle import oracle_model
from mllm_unlearn.evaluate.audit.quantization import full_precision_vqa, quantized_vqa
from mllm_unlearn.experiments.audit import mean_ci, prepare_seed, quick_config, run_audit, run_multiseed
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.quantize import QuantSpec, fake_quantize_, quantize_weight, quantized_copy
from mllm_unlearn.train.loop import TrainConfig

# ---------------------------------------------------------------- pure functions


def test_relearn_route_keeps_a_change_in_or_out_of_a_span_and_measures_its_share() -> None:
    """``scripts/relearn_route.py``: ``span_share`` of a change (out x in) in the input directions a basis spans,
    by hand (a change along input 0 of a basis of inputs 0-1: 1; along input 2: 0; half and half: 0.5); and
    ``keep_change`` leaves W0 + dW Q Q^T (inside) or W0 + dW (I - Q Q^T) (outside) after a step."""
    route = _script("relearn_route")
    q = torch.eye(4, dtype=torch.float64)[:, :2]  # inputs 0 and 1
    along = lambda *cols: torch.stack([torch.eye(4, dtype=torch.float64)[c] for c in cols]).sum(0).expand(3, 4)
    assert route.span_share(along(0), q) == pytest.approx(1.0)
    assert route.span_share(along(2), q) == pytest.approx(0.0)
    assert route.span_share(along(1, 3), q) == pytest.approx(0.5)

    model = torch.nn.Linear(4, 3, bias=False).double()
    start = {"weight": model.weight.detach().clone()}
    step = torch.arange(12, dtype=torch.float64).reshape(3, 4) + 1.0
    for inside, kept in (
        (True, step * torch.tensor([1.0, 1.0, 0.0, 0.0])),
        (False, step * torch.tensor([0.0, 0.0, 1.0, 1.0])),
    ):
        with torch.no_grad():
            model.weight.copy_(start["weight"] + step)
        route.keep_change(start, {"weight": q}, inside)(model)
        assert torch.allclose(model.weight - start["weight"], kept)


def test_quantize_per_channel_and_group_wise() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 100)
    for bits in (8, 4, 2):
        q = quantize_weight(w, QuantSpec(bits))
        step = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((q - w).abs() <= step / 2 + 1e-6).all()  # round to nearest on the row's grid
        assert max(len(torch.unique(row)) for row in q) <= 2**bits - 1
    g = quantize_weight(w, QuantSpec.parse("int4-g32"))  # 100 = 3 groups of 32 and one of 4
    assert max(len(torch.unique(g[0, i : i + 32])) for i in range(0, 100, 32)) <= 16
    assert (g - w).abs().mean() < (quantize_weight(w, QuantSpec(4)) - w).abs().mean()  # finer grids, less error
    assert torch.equal(quantize_weight(torch.zeros(2, 8), QuantSpec(4)), torch.zeros(2, 8))
    assert QuantSpec.parse("int4-g128").name == "int4-g128" and QuantSpec.parse("8").name == "int8"
    with pytest.raises(ValueError):
        QuantSpec.parse("fp4")

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = [p.clone() for p in model.parameters()]
    clone = quantized_copy(model, QuantSpec(2), skip=r"2")  # the second Linear is skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the original is untouched
    assert not torch.equal(clone[0].weight, model[0].weight) and torch.equal(clone[2].weight, model[2].weight)
    assert fake_quantize_(model, QuantSpec(8)) == ["0", "2"]


def test_misidentification_count_tells_another_known_name_from_no_name() -> None:
    names = {"1": "Ana Lind", "2": "Bram Okafor", "1001": "Cleo Brandt"}
    assert classify_reply("This is Ana Lind, a baker from Oslo.", "Ana Lind", names.values()) == "true_name"
    assert classify_reply("This is bram  okafor, a pilot.", "Ana Lind", names.values()) == "other_name"
    assert classify_reply("This is Ana, a baker.", "Ana Lind", names.values()) == "no_name"
    assert classify_reply("I don't know who this is.", None, names.values()) == "no_name"
    counts = count_replies(
        [
            "This is Bram Okafor.",
            "This is Cleo Brandt, a nurse.",
            "I don't know who this is.",
            "a baker from Oslo",
            "This is Ana Lind.",
        ],
        ["Ana Lind"] * 5,
        names,
    )
    assert (counts["true_name"], counts["other_name"], counts["no_name"], counts["unknown_reply"]) == (1, 2, 2, 1)
    assert counts["misidentified"] == pytest.approx(0.4)


def test_auc_and_confidence_interval() -> None:
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0 and auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5 and auc([2, 0], [1]) == 0.5
    m = mean_ci([0.2, 0.4, 0.6])
    assert m["mean"] == pytest.approx(0.4) and m["ci95"] == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([0.5])["ci95"]) and mean_ci([math.nan, 1.0])["n"] == 1


# ---------------------------------------------------------------- a trained tiny world

TRAINED = quick_config(seeds=(3,), finetune_steps=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-person world whose vanilla model knows everyone, its oracle, a second model fine-tuned without
    the forget people (another seed) and a run whose adapter changes nothing (LoRA with B = 0)."""
    root = tmp_path_factory.mktemp("audit")
    paths = prepare_seed(replace(TRAINED, methods=()), 3, root / "cache")
    data = load_audit_data(paths["world"], TRAINED.forget)
    other_seed = TrainConfig(**{**TRAINED.finetune.__dict__, "seed": 11})
    paths["retrained"] = oracle_model(paths["base"], data.bench, other_seed, root / "cache")
    from peft import LoraConfig, get_peft_model

    lm = load_model(paths["vanilla"])
    null = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    null.save_pretrained(root / "null" / "adapter")  # B starts at 0: the adapter changes nothing
    paths["null"] = root / "null"
    return root, paths, data


def test_relearn_probe_both_ways_pools_each_persons_other_half_attack(trained) -> None:
    """``relearn_probe(both_halves=True)`` (``AuditConfig.relearn_both_halves``): its first way is the protocol's
    one-way result to the last digit, the second attacks the other half, the two ways' measured people are the
    forget people once each, and the pooled accuracies are the ways' means weighted by their questions (so the
    pooled "before" is every forget person's forget VQA)."""
    from mllm_unlearn.evaluate.audit.card import reference_metrics
    from mllm_unlearn.evaluate.audit.relearn import relearn_probe

    _, paths, data = trained
    lm = load_model(paths["retrained"])  # never saw the forget people: the attack has something to teach
    budget = TRAINED.audit.budget
    one = relearn_probe(lm, data, budget)
    both = relearn_probe(lm, data, budget, both_halves=True)
    first, second = both["ways"]
    assert first == one
    assert second["attack_people"] == one["held_out_people"] and second["held_out_people"] == one["attack_people"]
    assert sorted(first["held_out_people"] + second["held_out_people"]) == sorted(data.forget_people)
    questions = {
        "forget_vqa": [len(data.image_mcqs("forget", w["held_out_people"])) for w in (first, second)],
        "unseen_vqa": [len(data.unseen_mcqs(w["held_out_people"])) for w in (first, second)],
    }
    for key, n in questions.items():
        for when in ("before", "after"):
            want = (first[f"{key}_{when}"] * n[0] + second[f"{key}_{when}"] * n[1]) / sum(n)
            assert both[f"{key}_{when}"] == pytest.approx(want, abs=1e-12)
    assert both["forget_vqa_before"] == pytest.approx(reference_metrics(lm, data)["forget_vqa"], abs=1e-12)
    assert both["recovery"] == pytest.approx(both["forget_vqa_after"] - both["forget_vqa_before"], abs=1e-12)
    assert both["unseen_recovery"] == pytest.approx(both["unseen_vqa_after"] - both["unseen_vqa_before"], abs=1e-12)


def test_vanilla_knows_everyone_and_the_null_adapter_loads_as_vanilla(trained) -> None:
    _, paths, data = trained
    vanilla = load_model(paths["vanilla"])
    assert full_precision_vqa(vanilla, data) == {"forget_vqa": 1.0, "retain_vqa": 1.0}
    null = load_run(paths["null"], paths["vanilla"])
    for (name, a), b in zip(vanilla.model.state_dict().items(), null.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(data.strangers) == 4 and all(len(v) == 2 for v in data.unseen.values())
    assert len(data.unseen_mcqs(data.forget_people)) == 2 * 2 * 5  # 2 forget people x 2 unseen photos x 5 MCQs


def test_unseen_probe_counts_the_people_still_recognised(trained) -> None:
    """Per forget person on their unseen photos: the vanilla model recognises both forget people (above
    chance + 0.15), the oracle, never trained on them, neither; the pooled accuracy is their mean (the
    same number of items each)."""
    from mllm_unlearn.evaluate.audit.unseen import RECOGNISED, unseen_probe

    _, paths, data = trained
    for path, share in ((paths["vanilla"], 1.0), (paths["oracle"], 0.0)):
        out = unseen_probe(load_model(path), data)
        assert list(out["per_person"]) == data.forget_people
        assert out["forget_vqa"] == pytest.approx(sum(out["per_person"].values()) / len(data.forget_people))
        assert out["still_recognised"] == share
        assert sum(v > RECOGNISED for v in out["per_person"].values()) == share * len(data.forget_people)


def test_null_adapter_relearns_nothing_and_misidentifies_as_vanilla(trained) -> None:
    """Relearning probe and identity probe, both shown able to fail: an adapter that changes nothing
    has nothing to recover (recovery 0, forget VQA at vanilla's 1.0 before and after) and names exactly
    whom vanilla names. The report has the stable keys."""
    root, paths, _ = trained
    cfg = replace(TRAINED.audit, probes=("unseen", "identity", "relearn"))
    report = run_audit(paths["vanilla"], {"null": paths["null"]}, paths["world"], root / "report_null", cfg)
    null, vanilla = report["runs"]["null"], report["runs"]["vanilla"]
    assert null["relearn"]["forget_vqa_before"] == 1.0 and abs(null["relearn"]["recovery"]) <= 0.05
    assert null["relearn"]["recovery"] == vanilla["relearn"]["recovery"]
    for key in ("forget_train", "forget_unseen", "strangers", "strangers_taught"):
        assert {k: v for k, v in null["identity"][key].items()} == vanilla["identity"][key]
    assert vanilla["identity"]["forget_train"]["true_name"] == vanilla["identity"]["forget_train"]["n"]
    assert null["headline"]["summary"] == 0.0  # forgot nothing
    saved = json.loads((root / "report_null" / "report.json").read_text())
    assert saved["schema"] == "mllm-unlearn/audit/1" and set(saved["runs"]) == {"vanilla", "null"}
    assert set(saved["runs"]["null"]["headline"]) == set(HEADLINE)
    assert (root / "report_null" / "report.png").stat().st_size > 0
    assert "| misid_unseen" in (root / "report_null" / "report.md").read_text()


def test_forget_quality_is_high_for_a_model_never_trained_on_the_forget_people(trained) -> None:
    """KS forget quality: another model fine-tuned without the forget people (other seed) is
    indistinguishable from the oracle; the vanilla model is not (the probe can fail)."""
    _, paths, data = trained
    oracle = forget_items_scores(load_model(paths["oracle"]), data)
    retrained = forget_quality(forget_items_scores(load_model(paths["retrained"]), data), oracle)
    vanilla = forget_quality(forget_items_scores(load_model(paths["vanilla"]), data), oracle)
    assert retrained["forget_quality"] > 0.05, retrained
    assert vanilla["forget_quality"] < 1e-3, vanilla
    assert vanilla["truth_ratio_median"] < retrained["truth_ratio_median"]


def test_two_bit_quantisation_breaks_retain_and_eight_bit_does_not(trained) -> None:
    _, paths, data = trained
    vanilla = load_model(paths["vanilla"])
    assert quantized_vqa(vanilla, data, QuantSpec(8))["retain_vqa"] >= 0.95
    broken = quantized_vqa(vanilla, data, QuantSpec(2))  # ternary weights: 1.00 -> 0.725 measured
    assert broken["retain_vqa"] <= 0.8, broken


def test_membership_inference_separates_trained_faces_from_strangers(trained) -> None:
    from mllm_unlearn.evaluate.audit.mia import mia_probe

    _, paths, data = trained
    assert mia_probe(load_model(paths["vanilla"]), data)["mia_auc"] >= 0.9
    assert mia_probe(load_model(paths["oracle"]), data)["mia_auc"] <= 0.8


def test_cli_audit_one_world(trained, capsys) -> None:
    from mllm_unlearn.cli.audit import add_parser

    root, paths, _ = trained
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "audit",
            "--vanilla",
            str(paths["vanilla"]),
            "--data",
            str(paths["world"]),
            "--runs",
            f"null={paths['null']}",
            "--oracle",
            str(paths["oracle"]),
            "--probes",
            "unseen,quantization,oracle",
            "--quant",
            "int8,int4-g64",
            "--out",
            str(root / "cli"),
        ]
    )
    assert args.fn(args) == 0
    report = json.loads((root / "cli" / "report.json").read_text())
    q = report["runs"]["null"]["quantization"]
    assert set(q) == {"int8", "int4-g64"} and q["int8"]["retain_vqa_vanilla"] == q["int8"]["retain_vqa"]
    assert report["runs"]["null"]["oracle"]["forget_quality"] == report["runs"]["vanilla"]["oracle"]["forget_quality"]
    assert "Headline" in capsys.readouterr().out


def test_attack_scope_trains_only_its_weights_and_the_cli_keeps_the_base_budget(trained) -> None:
    """``AttackBudget.scope``: a two-step attack on the visual weights leaves every LLM weight bit-identical
    and moves the vision tower's; on the LLM, the reverse. ``--relearn-scope`` changes only the scope of the
    quick audit's budget, ``--relearn-both-halves`` only the relearning probe's ways; an unknown scope or an empty
    budget is refused naming the field."""
    from mllm_unlearn.cli.audit import _audit_config, add_parser
    from mllm_unlearn.evaluate.audit import AttackBudget
    from mllm_unlearn.evaluate.audit.relearn import finetune_copy

    _, paths, data = trained
    lm = load_model(paths["vanilla"])
    train = data.bench.train[:8]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    is_llm = lambda name: name.startswith("model.language_model.")
    is_vision = lambda name: name.startswith("model.vision_tower.")
    for scope, frozen, moved in (("visual", is_llm, is_vision), ("llm", is_vision, is_llm)):
        tuned = finetune_copy(lm, train, AttackBudget(steps=2, batch_size=4, lr=1e-3, scope=scope))
        after = tuned.model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before if frozen(k)), scope
        assert any(not torch.equal(after[k], before[k]) for k in before if moved(k)), scope
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())  # the copy, not lm

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["audit", "--vanilla", "v", "--data", "d", "--out", "o", "--relearn-scope", "llm"])
    budget = _audit_config(args, TRAINED.audit).budget
    assert (budget.scope, budget.steps, budget.batch_size) == ("llm", TRAINED.audit.budget.steps, 4)
    assert _audit_config(args).budget == AttackBudget(scope="llm")
    assert not _audit_config(args).relearn_both_halves  # the protocol's one way unless asked
    args = parser.parse_args(["audit", "--vanilla", "v", "--data", "d", "--out", "o", "--relearn-both-halves"])
    assert _audit_config(args, TRAINED.audit).relearn_both_halves
    with pytest.raises(ValueError, match="AttackBudget.scope: 'vision'"):
        AttackBudget(scope="vision")
    with pytest.raises(ValueError, match=r"AttackBudget: steps \(0\)"):
        AttackBudget(steps=0)


def test_finetune_copy_trains_the_named_parameters_and_runs_the_hook_after_each_step(trained) -> None:
    """``finetune_copy(trainable=..., on_step=...)`` (scripts/relearn_route.py): only the parameters the
    predicate names move, and a hook that projects one weight's change onto a subspace after every step leaves
    that change inside it (here: the first 8 of its input directions; the unprojected attack moves the others)."""
    from mllm_unlearn.evaluate.audit import AttackBudget
    from mllm_unlearn.evaluate.audit.relearn import finetune_copy

    _, paths, data = trained
    lm = load_model(paths["vanilla"])
    train = data.bench.train[:8]
    budget = AttackBudget(steps=2, batch_size=4, lr=1e-3)
    name = next(n for n, _ in lm.model.named_parameters() if "vision_tower" in n and n.endswith("q_proj.weight"))
    start = dict(lm.model.named_parameters())[name].detach().clone()
    keep = torch.zeros(start.shape[1], dtype=start.dtype)
    keep[:8] = 1.0
    calls = []

    def project(model) -> None:
        calls.append(1)
        w = dict(model.named_parameters())[name]
        with torch.no_grad():
            w.copy_(start + (w - start) * keep)

    free = finetune_copy(lm, train, budget, trainable=lambda n: n == name)
    held = finetune_copy(lm, train, budget, trainable=lambda n: n == name, on_step=project)
    original = dict(lm.model.named_parameters())
    for tuned in (free, held):
        assert [n for n, w in tuned.model.named_parameters() if not torch.equal(w, original[n])] == [name]
    change = dict(free.model.named_parameters())[name] - start
    assert change[:, 8:].abs().max() > 0
    change = dict(held.model.named_parameters())[name] - start
    assert change[:, 8:].abs().max() == 0 and change[:, :8].abs().max() > 0
    assert len(calls) == budget.steps


# ---------------------------------------------------------------- several worlds


def test_multiseed_quick_variant(tmp_path: Path) -> None:
    """The quick variant end to end over two worlds: cached preparation, one report per seed, mean and
    CI per run and metric; a second call reuses every cached model."""
    cfg = quick_config(seeds=(3, 4))
    cfg.audit = replace(cfg.audit, probes=("unseen", "identity", "relearn", "oracle"))
    summary = run_multiseed(tmp_path / "out", cfg, tmp_path / "cache")
    assert set(summary["runs"]) == {"vanilla", "oracle", "cvf_ncu"}
    unseen = summary["runs"]["cvf_ncu"]["unseen_forget_vqa"]
    assert unseen["n"] == 2 and not math.isnan(unseen["ci95"])
    assert (tmp_path / "out" / "seed4" / "report.json").is_file() and (tmp_path / "out" / "summary.md").is_file()
    # the 32-wide quick tower gets the driver's capped rank, never the whole input space (r = d = 32)
    record = json.loads((tmp_path / "cache" / "seed3" / "runs" / "cvf_ncu" / "run.json").read_text())
    assert record["resolved"]["rank"] == record["resolved"]["lora_rank"] == 16
    mtime = (tmp_path / "cache" / "seed3" / "vanilla" / "config.json").stat().st_mtime
    run_multiseed(tmp_path / "out2", replace(cfg, seeds=(3,)), tmp_path / "cache")
    assert (tmp_path / "cache" / "seed3" / "vanilla" / "config.json").stat().st_mtime == mtime
    assert np.isfinite(summary["runs"]["vanilla"]["retain_vqa"]["mean"])


def test_summary_score_pays_for_lost_text_knowledge() -> None:
    """F on unseen photos (oracle-scaled), R = the weakest kept ratio (retain / real VQA, text QA)."""
    refs = References()
    refs.vanilla = {"unseen_forget_vqa": 0.9, "retain_vqa": 1.0, "real_vqa": 1.0, "forget_qa": 1.0, "retain_qa": 1.0}
    refs.oracle = {"unseen_forget_vqa": 0.2}
    kept = {"retain_vqa": 1.0, "real_vqa": 1.0, "forget_qa": 1.0, "retain_qa": 1.0}
    assert summary_score({"unseen_forget_vqa": 0.2, **kept}, refs) == pytest.approx(1.0)
    # same forgetting, but half of the forget people's text-only answers lost: R = 0.5, 2FR/(F+R) = 2/3
    assert summary_score({"unseen_forget_vqa": 0.2, **kept, "forget_qa": 0.5}, refs) == pytest.approx(2 / 3)
    # half the gap closed, everything kept: F = 0.5
    assert summary_score({"unseen_forget_vqa": 0.55, **kept}, refs) == pytest.approx(2 / 3)
    assert summary_score({"unseen_forget_vqa": 0.9, **kept}, refs) == 0.0


def _audit_out(root: Path, seeds: list[int], runs: dict[str, list[float]]) -> Path:
    """An ``audit --seeds`` folder with per-seed reports: ``runs`` = model -> summary score per seed."""
    root.mkdir()
    (root / "summary.json").write_text(json.dumps({"seeds": seeds}))
    for i, seed in enumerate(seeds):
        (root / f"seed{seed}").mkdir()
        cards = {name: {"headline": {"summary": values[i]}} for name, values in runs.items()}
        (root / f"seed{seed}" / "report.json").write_text(json.dumps({"runs": cards}))
    return root


def _script(name: str):
    """A module of ``scripts/`` (not a package), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_audit_table_pools_seeds_of_several_outs(tmp_path) -> None:
    audit_table = _script("audit_table")
    # one process per world (seeds 6 and 7 side by side), and a model added later over both
    a = _audit_out(tmp_path / "a", [6], {"vanilla": [0.0], "cvf_ncu": [0.8]})
    b = _audit_out(tmp_path / "b", [7], {"vanilla": [0.0], "cvf_ncu": [0.9]})
    c = _audit_out(tmp_path / "c", [6, 7], {"vanilla": [0.5, 0.5], "siu": [0.6, 0.7]})
    text = audit_table.table([a, b, c])
    assert text.startswith("Seeds 6, 7:")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    pooled = mean_ci([0.8, 0.9])
    assert f"{pooled['mean']:.2f} ± {pooled['ci95']:.2f}" in rows["cvf_ncu"]
    assert "0.00 ± 0.00" in rows["vanilla"]  # the first report of a model for a seed is kept
    assert "0.65 ±" in rows["siu"]
    # metrics no report has are left out (reports made before a metric existed keep their table)
    assert text.splitlines()[2] == "| model | Summary ↑ |"
    assert audit_table.table([a, b, c], ["summary", "retain_vqa"]).splitlines()[2] == "| model | Summary ↑ |"
    # a model some seed lacks is refused, naming it and the seed
    d = _audit_out(tmp_path / "d", [8], {"vanilla": [0.0]})
    with pytest.raises(SystemExit, match=r"cvf_ncu has no report for seed\(s\) \[8\]"):
        audit_table.table([a, b, d])
    # one world has no interval: its values alone, no "± nan"
    single = audit_table.table([a])
    assert single.startswith("Seeds 6: one world.") and "nan" not in single
    assert "| cvf_ncu | 0.80 |" in single


def test_continual_misses_counts_requests_with_and_without_a_person_static_runs_leave_recognisable(tmp_path) -> None:
    """``scripts/continual_misses.py``, by hand on two 2-request continual runs of one world: person 1 is above 0.40
    on their unseen photos in both of per_person.py's draws (hard at ``--draws-hard 2``), person 2 in one. Run a
    leaves request 1 (person 1) at 0.5 from its own stage on; run b brings request 1 back to 0.6 after its own stage
    left it at 0.3, and leaves request 2 (person 2) at exactly 0.40, the goal: not a miss."""
    misses = _script("continual_misses")
    rows = "| world | person | unseen ↓ | train ↓ |\n|---|---|---|---|\n| 3 | 1 | 0.60* | 0.2 |\n| 3 | 2 | {} | 0.2 |\n"
    (tmp_path / "pp.md").write_text("## draw 0\n" + rows.format("0.50*") + "\n## draw 1\n" + rows.format("0.20"))
    for name, first, last in (("a", [0.5, 0.9], [0.5, 0.2]), ("b", [0.3, 0.9], [0.6, 0.40])):
        stages = [{"unseen_forget_vqa_per_task": first}, {"unseen_forget_vqa_per_task": last}]
        (tmp_path / name).mkdir()
        (tmp_path / name / "matrix.json").write_text(json.dumps({"tasks": [["1"], ["2"]], "stages": stages}))
    unseen = misses.per_person_unseen(tmp_path / "pp.md")
    assert unseen == {(3, "1"): [0.6, 0.6], (3, "2"): [0.5, 0.2]}
    runs = {3: [tmp_path / "a", tmp_path / "b"]}
    c = misses.count(unseen, runs, draws_hard=2)
    assert (c["requests"], c["misses"], c["hard_people"]) == (4, 2, [(3, "1")])
    assert c["missed_at_own_stage"] == 1  # run a's request 1; run b's was brought back by stage 2
    assert c["hard"] == [2, 2] and c["other"] == [0, 2]
    assert misses.count(unseen, runs, draws_hard=1)["hard"] == [2, 4]  # person 2 is hard in one draw


def test_sweep_table_pools_a_settings_draws_across_names_caches_and_files(tmp_path, capsys) -> None:
    """``scripts/sweep_table.py`` by hand: rows of one setting under other variant names, another world's cache folder
    and another unlearning seed are one group; a setting that differs in one option is another. Per world the draws'
    mean, then mean ± t over worlds, Welch's p against the worlds named in ``--versus``, and with ``--spread`` the
    standard deviation between a world's draws, pooled over worlds."""
    table = _script("sweep_table")

    def row(world: int, offset: int, name: str, relearn: float, floor: float = 0.01) -> str:
        key = {
            "seed": world,
            "unlearn": {"seed": world + offset, "cache_dir": f"C{world}/ncu_cache", "steps": 200},
            "method_config": {"push_floor": floor},
            "probes": ["relearn"],
        }
        return json.dumps(
            {"key": json.dumps(key), "seed": world, "variant": name, "headline": {"relearn_recovery": relearn}}
        )

    dev = [
        row(0, 0, "b3", 0.1),
        row(0, 1, "b3_d1", 0.3),
        row(1, 0, "b3", 0.0),
        row(1, 1, "b3_d1", 0.0),
        row(0, 0, "pf0", 0.9, floor=0.0),
    ]
    held = [row(3, 0, "default", 0.4), row(3, 2, "d2", 0.4), row(4, 0, "default", 0.2), row(4, 2, "d2", 0.4)]
    (tmp_path / "dev.jsonl").write_text("\n".join(dev) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(held) + "\n")
    files = [str(tmp_path / "dev.jsonl"), str(tmp_path / "held.jsonl")]
    table.main([*files, "--versus", "3,4", "--columns", "relearn_recovery"])
    out = capsys.readouterr().out.split("== ")[1:]
    assert len(out) == 2 and out[0].startswith("b3, b3_d1, default, d2") and out[1].startswith("pf0")
    pooled = mean_ci([0.2, 0.0, 0.4, 0.3])  # worlds 0, 1, 3, 4: the mean of each world's draws
    assert f"{pooled['mean']:.3f} ± {pooled['ci95']:.3f} (0: 0.200, 1: 0.000, 3: 0.400, 4: 0.300) draws [2]" in out[0]
    from scipy.stats import ttest_ind

    p = ttest_ind([0.4, 0.3], [0.2, 0.0], equal_var=False).pvalue
    assert f"worlds [3, 4] 0.350 vs the others 0.100, Welch p = {p:.2f}" in out[0]
    assert "relearn_recovery     0.900 (0: 0.900) draws [1]" in out[1]  # one world: no interval
    assert "±" not in out[1] and "Welch" not in out[1]  # and no test
    table.main([*files, "--columns", "relearn_recovery", "--spread"])
    out = capsys.readouterr().out.split("== ")[1:]
    # within worlds 0 and 4 the draws differ by 0.2 (variance 0.02 each), within 1 and 3 not at all
    assert out[0].rstrip().endswith("SD between draws 0.100") and out[1].rstrip().endswith("SD between draws nan")
