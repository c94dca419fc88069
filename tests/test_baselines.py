"""The baselines on a small world with a tiny LLaVA: the mask/prune/scope guarantees hold, and every
method, run through the driver, lowers the likelihood of the answers it is asked to forget. (Their
loss formulas are tested on hand-made tensors in test_losses.py.)"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from mllm_unlearn.methods import available_methods, get_method, report_order
from mllm_unlearn.methods.base import UnlearnContext
from mllm_unlearn.methods.baseline import select
from mllm_unlearn.methods.siu import person_names
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.scoring import answer_logprobs
from mllm_unlearn.nullspace import lora_layers
from mllm_unlearn.train.finetune import finetune
from mllm_unlearn.train.loop import TrainConfig
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people, unlearn, unlearn_stage

torch.set_num_threads(1)
FAST = dict(steps=2, batch_size=4, warmup=1)
BASELINES = ("ga", "ga_diff", "kl_min", "npo", "simnpo", "mmunlearner", "manu", "siu")


@pytest.fixture(scope="module")
def setup(setup):
    """(BenchmarkData, tiny model dir, world dir) of the shared small world."""
    return setup[2], setup[3], setup[1]


def context(lm, data, seed=0):
    forget, retain = split_people(data)
    return UnlearnContext(lm, forget, retain, batch_size=4, seed=seed)


def test_person_names_are_the_name_words_no_one_else_carries(setup):
    """person_names finds each person's name words in the text-only questions: exactly the words of
    their true name (world.json) that no other person's name shares; shared words cannot identify."""
    data, _, world = setup
    true = {str(p["ID"]): p["name"].split() for p in json.loads((world / "world.json").read_text())["people"]}
    owners = Counter(w for words in true.values() for w in set(words))
    names = {p: n for p, n in person_names(data.train).items() if p in true}  # strangers have no name
    assert set(names) == {s.person for s in data.train if s.person in true}
    assert names == {p: [w for w in true[p] if owners[w] == 1] for p in names}
    assert sum(map(bool, names.values())) >= len(names) - 1 and names["3"] == ["Bodil", "Ostrander"]
    forget_person = split_people(data)[0][0].person
    assert names[forget_person] == true[forget_person]  # the forget person is named in full


# -- behaviour on the tiny model ---------------------------------------------------------------
def test_ga_loss_is_minus_the_forget_nll_and_npo_starts_at_2_log2_over_beta(setup):
    data, model, _ = setup
    lm = attach_adapters(load_model(model), split_people(data)[1], UnlearnConfig(), get_method("ga"))
    loss, _ = get_method("ga")().loss(context(lm, data), 0)
    ctx = context(lm, data)
    batch = ctx.stream("forget_all", lambda: ctx.forget)
    assert loss.item() == pytest.approx(-ctx.nll(batch).item(), rel=1e-5)
    npo = get_method("npo")
    method = npo(npo.config_class(retain_weight=0.0))
    method.setup(ctx)
    loss, logs = method.loss(ctx, 0)  # B = 0: the model is its reference
    assert logs["logratio"] == 0.0 and loss.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    # a separately loaded reference (here the same checkpoint) gives the same log-ratio
    method = npo(npo.config_class(retain_weight=0.0, reference_model_path=str(model)))
    method.setup(ctx)
    loss2, logs2 = method.loss(ctx, 1)
    assert method.ref_lm is not None and abs(logs2["logratio"]) < 1e-4
    gd = get_method("ga_diff")  # alternate: forget on even steps, retain on odd ones
    alternating = gd(gd.config_class(alternate=True))
    assert set(alternating.loss(ctx, 0)[1]) == {"forget_nll"} and set(alternating.loss(ctx, 1)[1]) == {"retain_nll"}
    kl = get_method("kl_min")
    for direction in ("ref_theta", "theta_ref"):  # B = 0: p_theta = p_ref in either direction
        assert kl(kl.config_class(kl_direction=direction)).loss(ctx, 0)[1]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_manu_zeroes_exactly_the_top_k_rows(setup):
    data, model, _ = setup
    cls = get_method("manu")
    lm = attach_adapters(load_model(model), split_people(data)[1], UnlearnConfig(), cls)
    before = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_layers(lm.model).items()}
    lm.model.get_base_model().config.vision_feature_layer = -2  # as LLaVA-1.5: the last CLIP layer is unused
    method = cls(cls.config_class(prune_fraction=0.05))
    logs = method.apply(context(lm, data))
    flat = torch.cat(list(method.scores.values()))
    k = math.ceil(0.05 * len(flat))
    assert logs["pruned"] == k
    threshold = torch.topk(flat, k).values.min()
    vision = [n for n in method.scores if ".vision_tower." in n]
    assert vision and any(".language_model." in n for n in method.scores)
    assert not any(".encoder.layers.1." in n for n in vision)  # the unused layer is left out
    for n, m in lora_layers(lm.model).items():
        after, rows = m.get_base_layer().weight, method.pruned.get(n, [])
        others = [r for r in range(after.shape[0]) if r not in rows]
        assert not after[rows].any() and torch.equal(after[others], before[n][others]), n
        if rows:
            assert (method.scores[n][rows] >= threshold).all()


def test_mmunlearner_forget_step_leaves_masked_weights_unchanged(setup):
    data, model, _ = setup
    cls = get_method("mmunlearner")
    cfg = UnlearnConfig(steps=1, batch_size=4, warmup=1)
    lm = attach_adapters(load_model(model), split_people(data)[1], cfg, cls)
    forget, retain = split_people(data)
    method = cls(cls.config_class(threshold=1.0, fisher_samples=16))
    params = dict(lm.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    unlearn_stage(lm, method, forget, retain, cfg)  # step 0 = one forget step
    masked_in = masked_out = 0
    for n, mask in method.masks.items():
        moved = params[n].detach() != before[n]
        assert not moved[mask == 0].any(), n  # no forget gradient -> no update (fresh Adam state)
        masked_in += int(moved[mask == 1].sum())
        masked_out += int((mask == 0).sum())
    assert masked_in > 0 and masked_out > 0
    assert not any(method.masks[n].any() for n in method.masks if "lora_A" in n)  # B = 0 at mask time


@pytest.mark.parametrize(
    "scope, frozen", [("llm", ("vision_tower", "multi_modal_projector")), ("visual", ("language_model", "lm_head"))]
)
def test_scope_leaves_everything_outside_it_bit_identical(setup, scope, frozen):
    data, model, _ = setup
    lm = load_model(model)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    lm, history = unlearn(lm, data, UnlearnConfig(method="ga", scope=scope, **FAST))
    assert math.isfinite(history[-1]["loss"])
    base = lm.model.get_base_model()
    outside = [n for n in before if any(f".{part}" in f".{n}" for part in frozen)]
    assert outside
    for n, _ in base.named_parameters():
        if any(f".{part}" in f".{n}" for part in frozen):
            assert "lora_" not in n, n  # no adapter outside the scope
    current = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    assert all(torch.equal(current[n], before[n]) for n in outside)
    inside_lora = [p for n, p in base.named_parameters() if "lora_B" in n]
    assert inside_lora and any(p.abs().sum() > 0 for p in inside_lora)


def test_a_baseline_run_does_not_depend_on_what_the_generator_held_before(setup):
    """Same seed, same bytes, for plain LoRA too: two GA_Diff runs that start with torch's generator in
    different states (as two processes do: torch seeds it at random) end with identical adapters."""
    data, model, _ = setup
    adapters = []
    for scramble in (1, 2):
        torch.manual_seed(scramble)
        lm, _ = unlearn(load_model(model), data, UnlearnConfig(method="ga_diff", **FAST))
        adapters.append({n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" in n})
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


@pytest.fixture(scope="module")
def memorised(setup, tmp_path_factory):
    """The tiny LLaVA fine-tuned on every training pair (answer NLL ~0.4 per token): something to forget."""
    data, model, _ = setup
    return finetune(
        load_model(model),
        data.train,
        TrainConfig(steps=400, lr=3e-3, batch_size=8, warmup=5),
        tmp_path_factory.mktemp("memorised") / "model",
    )


def forget_loglik(lm, samples):
    """Mean over ``samples`` of the answer's summed log-probability given the question."""
    with torch.no_grad():
        return answer_logprobs(lm, samples, [s.question for s in samples], [s.answer for s in samples]).mean().item()


def test_report_order_puts_the_baselines_first_and_cvf_ncu_last():
    """``--methods all`` (audit and demo) lists rows as the README does: the eight baselines
    alphabetically, then the paper's literal reading, then cvf_ncu; every registered method once."""
    order = report_order()
    assert sorted(order) == available_methods()
    assert order == [*sorted(BASELINES), "cvf_ncu_paper", "cvf_ncu"]


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_lowers_the_forget_answers_likelihood(setup, memorised, name):
    """Through the driver, a few steps (MANU: its one pruning) lower the mean log-likelihood of the
    forget pairs each method unlearns (its ``forget_modality``; SIU: the questions with the image,
    whose answers it relabels) by more than 0.5 nats."""
    data, _, _ = setup
    assert name in available_methods()
    cls = get_method(name)
    method_cfg = cls.config_class(**{"mmunlearner": dict(fisher_samples=8), "manu": dict(max_samples=8)}.get(name, {}))
    targets = select(split_people(data)[0], "vqa" if name == "siu" else method_cfg.forget_modality)
    lm = load_model(memorised)
    before = forget_loglik(lm, targets)
    lm, history = unlearn(lm, data, UnlearnConfig(method=name, steps=8, lr=1e-2, batch_size=4, warmup=1), method_cfg)
    after = forget_loglik(lm, targets)
    assert history and all(math.isfinite(row.get("loss", 0.0)) for row in history)
    assert ("pruned" if name == "manu" else "loss") in history[0]
    assert after < before - 0.5, f"{name}: forget log-likelihood {before:.3f} -> {after:.3f}"


def test_siu_relabels_forget_images_to_an_unseen_identity(setup):
    data, model, _ = setup
    cls = get_method("siu")
    lm = attach_adapters(load_model(model), split_people(data)[1], UnlearnConfig(), cls)
    ctx = context(lm, data)
    method = cls()
    method.setup(ctx)
    names = [" ".join(w) for w in method.name_words.values()]
    assert names and all(names)
    assert len(method.relabelled) == len(select(ctx.forget, "vqa"))
    assert all(n not in s.answer for s in method.relabelled for n in names)
    assert any("Robin Vale" in s.answer for s in method.relabelled)  # the name question gets the new name
    assert not method.vocab_keep.all()
    loss, logs = method.loss(ctx, 0)
    assert 0 < logs["kl_positions"] < 1 and logs["dmk"] == pytest.approx(0.0, abs=1e-6)  # B = 0: p = p_ref
