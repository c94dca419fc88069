"""The baselines: each loss equals its formula, the mask/prune/scope guarantees hold, and every method
runs end to end through the driver on a small world with a tiny random LLaVA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mllm_unlearn.methods import available_methods, get_method
from mllm_unlearn.methods.base import UnlearnContext
from mllm_unlearn.methods.baselines import (
    fisher_mask,
    ga_loss,
    kl_divergence,
    manu_scores,
    npo_loss,
    person_names,
    select,
    sequence_logprob,
    simnpo_loss,
    top_k_rows,
)
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.nullspace import lora_layers
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people, unlearn, unlearn_stage

torch.set_num_threads(1)
FAST = dict(steps=2, batch_size=4, warmup=1)
BASELINES = ("ga", "ga_diff", "kl_min", "npo", "simnpo", "mmunlearner", "manu", "siu")


@pytest.fixture(scope="module")
def setup(setup):
    """(BenchmarkData, tiny model dir) of the shared small world."""
    return setup[2], setup[3]


def context(lm, data, seed=0):
    forget, retain = split_people(data)
    return UnlearnContext(lm, forget, retain, batch_size=4, seed=seed)


# -- the formulas, on hand-made tensors --------------------------------------------------------
def test_ga_is_negative_nll():
    assert ga_loss(torch.tensor(2.5)).item() == -2.5


def test_npo_at_the_reference_is_2_log2_over_beta_and_falls_as_logp_falls():
    logp = torch.tensor([-3.0, -7.0])
    for beta in (0.1, 0.4):
        assert npo_loss(logp, logp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    by_hand = -(2 / 0.1) * F.logsigmoid(torch.tensor([-0.1 * -2.0, -0.1 * 1.0])).mean()
    assert npo_loss(torch.tensor([-5.0, -6.0]), logp, 0.1).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert npo_loss(logp - 10, logp, 0.1) < npo_loss(logp, logp, 0.1)  # forgetting lowers the loss


def test_simnpo_uses_length_normalised_nll():
    nll_sum, lengths = torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0])  # per-token NLL 1 and 2
    expected = -(2 / 4.5) * (math.log(1 / (1 + math.exp(-4.5))) + math.log(1 / (1 + math.exp(-9.0)))) / 2
    assert simnpo_loss(nll_sum, lengths, 4.5, 0.0).item() == pytest.approx(expected, rel=1e-6)
    delta = -(2 / 4.5) * (math.log(0.5) + math.log(1 / (1 + math.exp(-4.5)))) / 2
    assert simnpo_loss(nll_sum, lengths, 4.5, 1.0).item() == pytest.approx(delta, rel=1e-6)


def test_kl_direction_and_vocabulary_mask():
    p, q = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    kl_pq = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl_qp = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(kl_pq, rel=1e-5)
    assert kl_divergence(q.log(), p.log()).item() == pytest.approx(kl_qp, rel=1e-5)
    # batchmean over positions = PyTorch's kl_div(log q, p)
    lp, lq = torch.randn(5, 7), torch.randn(5, 7)
    torch_kl = F.kl_div(F.log_softmax(lq, -1), F.softmax(lp, -1), reduction="batchmean")
    assert kl_divergence(lp, lq).item() == pytest.approx(torch_kl.item(), rel=1e-5)
    # vocabulary mask: the masked column is dropped and both rows renormalised
    p3, q3 = torch.tensor([[0.45, 0.05, 0.5]]), torch.tensor([[0.25, 0.25, 0.5]])
    keep = torch.tensor([True, True, False])
    assert kl_divergence(p3.log(), q3.log(), keep).item() == pytest.approx(kl_pq, rel=1e-5)
    assert kl_divergence(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_sequence_logprob_sums_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]))
    targets, rows = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 2])
    logp, lengths = sequence_logprob(logits, targets, rows, 3)
    assert torch.allclose(logp, torch.tensor([math.log(0.5 * 0.75), 0.0, math.log(0.9)]))
    assert lengths.tolist() == [2, 0, 1]


def test_fisher_mask_and_manu_scores_and_top_k():
    f_f, f_p = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 0.0, 3.0])
    assert fisher_mask(f_f, f_p).tolist() == [True, False, False, True]
    assert fisher_mask(f_f, f_p, 2.0).tolist() == [True, False, False, False]
    stats_f = {"mean_abs": torch.tensor([2.0, 1.0]), "std": torch.tensor([1.0, 1.0]),
               "rms": torch.tensor([4.0, 1.0]), "freq": torch.tensor([1.0, 0.0])}
    stats_r = {k: torch.ones(2) for k in stats_f}
    w = {"mean_abs": 2.0, "std": 2.0, "rms": 2.0, "freq": 0.0}
    expected = 2 * (2 / (1 + 1e-5) - 1) + 2 * (1 / (1 + 1e-5) - 1) + 2 * (4 / (1 + 1e-5) - 1)
    assert manu_scores(stats_f, stats_r, w)[0].item() == pytest.approx(expected, rel=1e-6)
    rows = top_k_rows({"a": torch.tensor([0.1, 5.0, 0.2]), "b": torch.tensor([3.0, 0.0, 4.0, 0.3])}, 0.4)
    assert {k: v.tolist() for k, v in rows.items()} == {"a": [1], "b": [0, 2]}  # ceil(0.4 * 7) = 3


def test_person_names_are_found_in_text_questions(setup):
    data, _ = setup
    names = person_names(data.train)
    for s in data.train:
        if s.image is None and s.question.startswith("What is") and s.question.endswith("'s job?"):
            assert " ".join(names[s.person]) in s.question


# -- behaviour on the tiny model ---------------------------------------------------------------
def test_ga_loss_is_minus_the_forget_nll_and_npo_starts_at_2_log2_over_beta(setup):
    data, model = setup
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
    data, model = setup
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
    data, model = setup
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


@pytest.mark.parametrize("scope, frozen", [("llm", ("vision_tower", "multi_modal_projector")),
                                           ("visual", ("language_model", "lm_head"))])
def test_scope_leaves_everything_outside_it_bit_identical(setup, scope, frozen):
    data, model = setup
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


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_runs_through_the_driver(setup, name):
    data, model = setup
    assert name in available_methods()
    cls = get_method(name)
    options = {"mmunlearner": dict(fisher_samples=8), "manu": dict(max_samples=8)}.get(name, {})
    lm = load_model(model)
    base_before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    lm, history = unlearn(lm, data, UnlearnConfig(method=name, **FAST), cls.config_class(**options))
    assert all(math.isfinite(row.get("loss", 0.0)) for row in history)
    base = lm.model.get_base_model()
    if name == "manu":
        assert history[0]["pruned"] > 0
        now = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
        assert any(not torch.equal(now[n], base_before[n]) for n in base_before)
    else:
        assert len(history) == 2 and "loss" in history[0]
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in base.named_parameters())


def test_siu_relabels_forget_images_to_an_unseen_identity(setup):
    data, model = setup
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
