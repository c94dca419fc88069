"""Null-space-constrained LoRA (paper Sec. 3.2-3.3, Eq. 12-18) on a tiny random LLaVA."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open

from mllm_unlearn.data.sample import ImageRef, Sample
from mllm_unlearn.models import LLAVA
from mllm_unlearn.models.tiny import build_tiny_llava
from mllm_unlearn.nullspace import (
    CovarianceCache,
    NCUConfig,
    attach_lora,
    cache_key,
    cached_covariances,
    collect_covariances,
    fingerprint_samples,
    forget_specific_directions,
    lora_A_weights,
    lora_layers,
    null_space_basis,
    random_basis,
    reference_model,
    refreeze,
    retain_energy,
    target_linears,
    trainable_parameters,
    unused_layers,
)
from mllm_unlearn.nullspace.lora import FROZEN_ATTR

VISUAL = LLAVA.scope_pattern("visual")
PROJ_1 = "model.multi_modal_projector.linear_1"
Q_PROJ_0 = "model.vision_tower.encoder.layers.0.self_attn.q_proj"


def _portrait(rng: np.random.Generator, grid: int = 4) -> bytes:
    """A 32 x 32 PNG of ``grid x grid`` random colour blocks (4 x 4: one colour per 8 px patch).

    Such retain images span few activation directions, as real photos do in a trained encoder. With
    a 3 x 3 grid (blocks straddling patches) the random tiny encoder's deeper layers are far less
    rank-deficient: the null/random ratio there was 0.10-0.16 with 16 calibration images."""
    colours = rng.integers(0, 256, size=(grid, grid, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(colours).resize((32, 32), Image.NEAREST))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _samples(prefix: str, n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(
            id=f"{prefix}{i}",
            person=f"{prefix}{i}",
            task="qa",
            modality="vqa",
            question="Who is this person?",
            answer=f"Person {i}",
            image=ImageRef(_portrait(rng), f"synthetic {prefix}{i}"),
        )
        for i in range(n)
    ]


def _batches(processor, samples: list[Sample], size: int = 4) -> list[dict[str, torch.Tensor]]:
    return [
        LLAVA.encode(processor, samples[i : i + size], [s.question for s in samples[i : i + size]]).inputs
        for i in range(0, len(samples), size)
    ]


def _features(model, inputs) -> torch.Tensor:
    return LLAVA.image_features(model, inputs)


def _trainable_names(peft_model) -> set[str]:
    trainable = {id(p) for p in trainable_parameters(peft_model)}
    return {name for name, p in peft_model.named_parameters() if id(p) in trainable}


def _activations(model, names, batches) -> dict[str, torch.Tensor]:
    """X (tokens x d, float64) of each named layer's input, captured independently of the code under test."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    layers = target_linears(model, "|".join(map(re.escape, names)))
    handles = [
        layers[name].register_forward_pre_hook(
            lambda m, args, name=name: captured[name].append(args[0].detach().reshape(-1, m.in_features))
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            for inputs in batches:
                _features(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs).to(torch.float64) for name, xs in captured.items()}


@pytest.fixture(scope="module")
def tiny():
    corpus = [f"USER: <image>\nWho is this person?\nASSISTANT: Person {i}" for i in range(30)]
    model, processor = build_tiny_llava(corpus)
    model.eval()
    retain = _batches(processor, _samples("r", 16, seed=1))
    held_out = _batches(processor, _samples("h", 8, seed=2))
    return model, processor, retain, held_out


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


@pytest.fixture(scope="module")
def covariances(tiny):
    model, _, retain, _ = tiny
    return collect_covariances(model, target_linears(model, VISUAL), retain, forward=_features, progress=False)


# -- bases -----------------------------------------------------------------------------------------


def test_null_space_basis_takes_eigenvectors_of_smallest_eigenvalues():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-6, 2, 12, dtype=torch.float64)[torch.randperm(12, generator=g)]
    cov = q @ torch.diag(eigenvalues) @ q.T
    A = null_space_basis(cov, 4).double()
    assert A.shape == (4, 12) and A.dtype == torch.float64
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    projected = A @ cov @ A.T  # diagonal with the 4 smallest eigenvalues, ascending (Eq. 14-15)
    torch.testing.assert_close(projected, torch.diag(eigenvalues.sort().values[:4]), atol=1e-6, rtol=1e-4)


def test_rank_is_validated_with_the_layer_named():
    with pytest.raises(ValueError, match=r"rank r=9 larger than the input width d=8 of layer enc\.fc1"):
        null_space_basis(torch.eye(8), 9, layer="enc.fc1")
    with pytest.raises(ValueError, match="at least 1"):
        random_basis(8, 0, torch.Generator())


def test_random_basis_is_orthonormal_and_seeded():
    A = random_basis(20, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(A @ A.T, torch.eye(5), atol=1e-6, rtol=0)
    assert torch.equal(A, random_basis(20, 5, torch.Generator().manual_seed(3)))
    assert not torch.equal(A, random_basis(20, 5, torch.Generator().manual_seed(4)))


def test_null_space_blocks_synthetic_low_rank_activations():
    """X = Z M + noise with rank(M) = 40 < d = 64: the null-space A lets almost nothing through."""
    g = torch.Generator().manual_seed(0)
    n, d, k, r = 2000, 64, 40, 8
    mixing = torch.randn(k, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, k, generator=g, dtype=torch.float64) @ mixing
    X = X + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    held_out = torch.randn(500, k, generator=g, dtype=torch.float64) @ mixing
    cov = X.T @ X / n
    A_null = null_space_basis(cov, r).double()
    A_rand = random_basis(d, r, g).double()
    ratio = lambda A, Y: float(torch.linalg.norm(Y @ A.T) / torch.linalg.norm(Y))
    assert ratio(A_null, held_out) < 1e-3 * ratio(A_rand, held_out)
    assert retain_energy(A_null, cov) == pytest.approx(ratio(A_null, X) ** 2, rel=1e-6)
    assert retain_energy(A_rand, cov) == pytest.approx(ratio(A_rand, X) ** 2, rel=1e-6)


def test_forget_specific_directions_find_a_planted_direction_outside_the_excluded_rows():
    """With F = C + 10 u u^T and u of calibration energy u^T C u = c outside the excluded rows, the top
    generalised eigenvalue is (c + 10) / c with direction u; every other one is 1 (F = C elsewhere)."""
    g = torch.Generator().manual_seed(0)
    d = 12
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(-4, 1, d, dtype=torch.float64)) @ q.T
    exclude = null_space_basis(cov, 3)
    u = q[:, 7]  # an eigenvector of C outside the 3 smallest, so orthogonal to the excluded rows
    c = float(u @ cov @ u)
    ratios, directions = forget_specific_directions(cov, cov + 10 * torch.outer(u, u), exclude, layer="enc.fc2")
    assert ratios.shape == (d - 3,) and directions.shape == (d - 3, d)
    assert float(ratios[0]) == pytest.approx((c + 10) / c, rel=1e-6)
    torch.testing.assert_close(ratios[1:], torch.ones(d - 4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(float(directions[0] @ u)) == pytest.approx(1.0, abs=1e-6)
    assert float((directions @ exclude.double().T).abs().max()) < 1e-6  # never inside the excluded span
    with pytest.raises(ValueError, match=r"of layer enc\.fc2"):
        forget_specific_directions(cov, torch.eye(d + 1), exclude, layer="enc.fc2")


def test_ncu_config_refuses_bad_forget_direction_settings():
    assert NCUConfig(rank=8, forget_directions=4).lora_rank == 12
    assert NCUConfig(rank=8, forget_directions=4).lora_alpha == 12  # scaling stays 1
    with pytest.raises(ValueError, match="forget_directions must be >= 0"):
        NCUConfig(forget_directions=-1)
    with pytest.raises(ValueError, match="subspace 'random' has none"):
        NCUConfig(subspace="random", forget_directions=2)
    with pytest.raises(ValueError, match="forget_ratio must be >= 1"):
        NCUConfig(forget_directions=2, forget_ratio=0.5)


# -- calibration -------------------------------------------------------------------------------------


def test_target_linears_matches_full_paths_of_plain_and_peft_models(model):
    plain = target_linears(model, VISUAL)
    assert len(plain) == 2 * 6 + 2 and PROJ_1 in plain and Q_PROJ_0 in plain
    assert not any("language_model" in name for name in plain)
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=4, subspace="none"))
    wrapped = target_linears(peft_model, VISUAL)
    assert list(wrapped) == list(plain)
    assert all(type(layer) is torch.nn.Linear for layer in wrapped.values())  # base layers, not LoRA wrappers
    assert list(target_linears(peft_model, r".*projector.*")) == [PROJ_1, PROJ_1[:-1] + "2"]  # no LoRA internals
    with pytest.raises(ValueError, match="nothing_here"):
        target_linears(model, r"nothing_here")


def test_streamed_covariance_equals_one_shot(tiny, model, covariances):
    names = [Q_PROJ_0, "model.vision_tower.encoder.layers.1.mlp.fc2", "model.multi_modal_projector.linear_2"]
    activations = _activations(model, names, tiny[2])
    for name, tokens_per_image in zip(names, (17, 17, 16)):  # 16 patches + CLS; the projector drops CLS
        X = activations[name]
        stats = covariances[name]
        assert stats.n_tokens == X.shape[0] == 16 * tokens_per_image
        assert stats.cov.dtype == torch.float64
        torch.testing.assert_close(stats.cov, X.T @ X / X.shape[0], rtol=1e-9, atol=1e-12)


def test_full_forward_gives_the_same_vision_covariance(tiny, model, covariances):
    stats = collect_covariances(model, [Q_PROJ_0], tiny[2], progress=False)  # model(**inputs)
    torch.testing.assert_close(stats[Q_PROJ_0].cov, covariances[Q_PROJ_0].cov, rtol=1e-9, atol=1e-12)


def test_hooks_removed_after_success_and_error(tiny, model):
    layers = target_linears(model, VISUAL)

    def failing(m, inputs):
        _features(m, inputs)
        raise KeyError("boom")

    collect_covariances(model, layers, tiny[2][:1], forward=_features, progress=False)
    with pytest.raises(KeyError, match="boom"):
        collect_covariances(model, layers, tiny[2][:1], forward=failing, progress=False)
    assert all(not layer._forward_pre_hooks for layer in layers.values())


def test_layer_that_never_ran_is_an_error(tiny, model):
    llm_layer = "model.language_model.layers.0.mlp.down_proj"
    with pytest.raises(RuntimeError, match=re.escape(llm_layer)):
        collect_covariances(model, [Q_PROJ_0, llm_layer], tiny[2][:1], forward=_features, progress=False)


def test_unused_layers_found_by_backward_probe(tiny, model):
    names = list(target_linears(model, VISUAL))
    for p in model.parameters():
        p.requires_grad_(False)
    assert unused_layers(model, names, tiny[2][0]) == []
    model.config.vision_feature_layer = -2  # LLaVA-1.5: the last CLIP layer runs but its output is dropped
    last = [n for n in names if ".layers.1." in n]
    assert unused_layers(model, names, tiny[2][0]) == last
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # left as found
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=4, subspace="random"), exclude=last)
    assert set(lora_layers(peft_model)) == set(names) - set(last)


# -- NCU acceptance property ----------------------------------------------------------------------------


def test_null_space_A_nearly_annihilates_held_out_retain_activations(tiny, model, covariances):
    """Eq. 18: A x ~ 0 on retain inputs. Measured on held-out retain images, every visual layer."""
    ratios = {}
    g = torch.Generator().manual_seed(0)
    held_out = _activations(model, list(covariances), tiny[3])
    calibration = _activations(model, list(covariances), tiny[2])
    for name, X in held_out.items():
        A_null = null_space_basis(covariances[name].cov, 8, layer=name).double()
        A_rand = random_basis(X.shape[1], 8, g).double()
        null, rand = (float(torch.linalg.norm(X @ A.T) / torch.linalg.norm(X)) for A in (A_null, A_rand))
        ratios[name] = (null, rand)
        assert null < 0.1 * rand, (name, null, rand)
        X_cal = calibration[name]
        direct = float(torch.linalg.norm(X_cal @ A_null.T) ** 2 / torch.linalg.norm(X_cal) ** 2)
        assert retain_energy(A_null, covariances[name].cov) == pytest.approx(direct, rel=1e-6, abs=1e-12)
    print("\n||A X||/||X|| on held-out retain images (null, random):")
    for name, (null, rand) in ratios.items():
        print(f"  {name}: {null:.2e} {rand:.2e} (x{null / rand:.3f})")


# -- LoRA -------------------------------------------------------------------------------------------------


def _train(peft_model, inputs, steps: int = 4) -> None:
    optimiser = torch.optim.SGD(trainable_parameters(peft_model), lr=0.5)
    target = torch.randn(_features(peft_model, inputs).shape, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        with reference_model(peft_model), torch.no_grad():
            _features(peft_model, inputs)  # e.g. reference IVRs of CVF
        loss = (_features(peft_model, inputs) - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def test_attach_null_sets_and_freezes_A(model, covariances):
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=8), covariances)
    A = lora_A_weights(peft_model)
    assert set(A) == set(covariances)
    for name, weight in A.items():
        assert torch.equal(weight, null_space_basis(covariances[name].cov, 8, layer=name))
    assert _trainable_names(peft_model) == {n for n, _ in peft_model.named_parameters() if ".lora_B." in n}
    assert len(getattr(peft_model, FROZEN_ATTR)) == len(covariances)
    layer = lora_layers(peft_model)[PROJ_1]
    assert layer.scaling["default"] == 1.0  # alpha defaults to rank


def test_A_never_changes_during_training_with_reference_calls(tiny, model, covariances):
    inputs = tiny[2][0]
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=8), covariances)
    A_before = lora_A_weights(peft_model)
    B_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".lora_B." in n}
    _train(peft_model, inputs)
    A_after = lora_A_weights(peft_model)
    assert all(torch.equal(A_before[n], A_after[n]) for n in A_before)
    # reference_model re-froze A after every call, so backward never even computed a gradient for it
    assert all(not p.requires_grad and p.grad is None for n, p in peft_model.named_parameters() if ".lora_A." in n)
    changed = [n for n, p in peft_model.named_parameters() if ".lora_B." in n and not torch.equal(p, B_before[n])]
    assert changed


def test_A_trains_under_plain_lora(tiny, model):
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=8, subspace="none"))
    A_before = lora_A_weights(peft_model)
    _train(peft_model, tiny[2][0])
    A_after = lora_A_weights(peft_model)
    assert any(not torch.equal(A_before[n], A_after[n]) for n in A_before)


def test_plain_lora_A_is_drawn_from_its_seed_and_leaves_the_callers_generator_alone(tiny):
    """Under ``none`` PEFT draws A from torch's global generator, which torch seeds at random in each process
    (so the baselines' runs differed from process to process): ``attach_lora`` seeds it from ``cfg.seed``,
    inside a forked generator. The same seed gives the same A whatever the generator held before; another
    seed another A; the caller's next draw is the one it would have made without the call."""

    def plain_A(seed: int, scramble: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(scramble)  # what the process's generator holds before: must not matter
        return lora_A_weights(
            attach_lora(copy.deepcopy(tiny[0]), VISUAL, NCUConfig(rank=4, subspace="none", seed=seed))
        )

    a, b, c = plain_A(0, scramble=1), plain_A(0, scramble=2), plain_A(1, scramble=1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], c[n]) for n in a)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    attach_lora(copy.deepcopy(tiny[0]), VISUAL, NCUConfig(rank=4, subspace="none", seed=0))
    assert torch.equal(torch.rand(3), want)


def test_peft_disable_adapter_unfreezes_A_and_reference_model_refreezes(model):
    """PEFT behaviour this package works around (stack-notes): if PEFT changes, the first assert fails."""
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=4, subspace="random"))
    frozen = [p for n, p in peft_model.named_parameters() if ".lora_A." in n]
    assert not any(p.requires_grad for p in frozen)
    with peft_model.disable_adapter():
        pass
    assert all(p.requires_grad for p in frozen)  # the pitfall
    assert all(".lora_B." in name for name in _trainable_names(peft_model))  # still only B for the optimiser
    refreeze(peft_model)
    assert not any(p.requires_grad for p in frozen)
    with reference_model(peft_model):
        pass
    assert not any(p.requires_grad for p in frozen)
    with pytest.raises(ZeroDivisionError), reference_model(peft_model):
        _ = 1 / 0
    assert not any(p.requires_grad for p in frozen)


def test_adapted_model_starts_equal_and_reference_stays_original(tiny, model, covariances):
    inputs = tiny[2][0]
    with torch.no_grad():
        original_features = _features(model, inputs)
        original_logits = model(**inputs).logits
    peft_model = attach_lora(model, VISUAL, NCUConfig(rank=8), covariances)
    with torch.no_grad():
        assert torch.equal(_features(peft_model, inputs), original_features)  # B = 0
    _train(peft_model, inputs)
    with torch.no_grad():
        assert not torch.equal(_features(peft_model, inputs), original_features)
        with reference_model(peft_model):
            assert torch.equal(_features(peft_model, inputs), original_features)
            assert torch.equal(peft_model(**inputs).logits, original_logits)


def test_rank_above_layer_width_is_rejected_before_touching_the_model(model, covariances):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(f"rank r=65 larger than the input width d=64 of layer {PROJ_1}")):
        attach_lora(model, re.escape(PROJ_1), NCUConfig(rank=65), covariances)
    with pytest.raises(ValueError, match=re.escape(Q_PROJ_0)):
        attach_lora(model, VISUAL, NCUConfig(rank=8), {k: v for k, v in covariances.items() if k != Q_PROJ_0})
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- cache ------------------------------------------------------------------------------------------------


def test_cache_hit_skips_the_forward_and_fingerprint_separates_data(tiny, model, tmp_path):
    retain, held_out = tiny[2], tiny[3]
    names = [Q_PROJ_0, PROJ_1]
    calls = []

    def counting(m, inputs):
        calls.append(1)
        return _features(m, inputs)

    cache = CovarianceCache(tmp_path)
    fp_retain = fingerprint_samples(_samples("r", 16, seed=1))
    assert fp_retain == fingerprint_samples(_samples("r", 16, seed=1))
    fp_other = fingerprint_samples(_samples("r", 16, seed=5))  # same ids and questions, other images
    assert fp_other != fp_retain

    kwargs = dict(cache=cache, model_id="tiny", forward=counting, progress=False)
    first = cached_covariances(model, names, retain, data_fingerprint=fp_retain, **kwargs)
    assert len(calls) == len(retain)
    second = cached_covariances(model, names, retain, data_fingerprint=fp_retain, **kwargs)
    assert len(calls) == len(retain)  # hit: no forward pass
    for name in names:
        assert torch.equal(first[name].cov, second[name].cov) and first[name].n_tokens == second[name].n_tokens
    other = cached_covariances(model, names, held_out, data_fingerprint=fp_other, **kwargs)
    assert len(calls) == len(retain) + len(held_out)  # different data: miss
    assert not torch.equal(other[PROJ_1].cov, first[PROJ_1].cov)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{cache_key('tiny', fp, n)}.safetensors" for fp in (fp_retain, fp_other) for n in names)
    with safe_open(str(tmp_path / f"{cache_key('tiny', fp_retain, PROJ_1)}.safetensors"), framework="pt") as f:
        assert f.metadata()["layer"] == PROJ_1 and int(f.metadata()["n_tokens"]) == first[PROJ_1].n_tokens
        assert f.get_tensor("cov").dtype == torch.float64
