"""CVF-NCU's options beyond the paper (docs/method.md): the stranger anchor, augmented views of the forget
photos, L_GUM on part of the retain batch, and the paper's literal reading as its own method."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mllm_unlearn.data.augment import augment_image, augment_pixels
from mllm_unlearn.data.sample import DataError
from mllm_unlearn.data.world import UNKNOWN_REPLY
from mllm_unlearn.methods import get_method
from mllm_unlearn.methods.base import UnlearnContext, distinct_images
from mllm_unlearn.methods.cvf_ncu import CVFConfig, PaperCVFConfig
from mllm_unlearn.methods.losses import calibration_output_change, cvf_pull, pool
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.nullspace import lora_layers
from mllm_unlearn.nullspace.reference import image_key
from mllm_unlearn.runtime.options import parse_options
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people, stranger_samples, unlearn_stage

FAST = dict(steps=6, batch_size=4, warmup=1)


# -- pure functions ---------------------------------------------------------------------------------
def test_augment_pixels_is_seeded_shape_preserving_and_off_at_strength_zero():
    x = torch.randn(3, 3, 16, 16)
    assert augment_pixels(x, torch.Generator().manual_seed(0), 0.0) is x
    a = augment_pixels(x, torch.Generator().manual_seed(1), 1.0)
    b = augment_pixels(x, torch.Generator().manual_seed(1), 1.0)
    c = augment_pixels(x, torch.Generator().manual_seed(2), 1.0)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    # a weak view stays closer to a (smooth) photo than a strong one
    ramp = torch.linspace(-1, 1, 16)
    smooth = (ramp[None, :, None] + ramp[None, None, :]).expand(3, 16, 16)[None].repeat(4, 1, 1, 1)
    weak = augment_pixels(smooth, torch.Generator().manual_seed(3), 0.1)
    strong = augment_pixels(smooth, torch.Generator().manual_seed(3), 1.0)
    assert (weak - smooth).norm() < (strong - smooth).norm()
    with pytest.raises(ValueError):
        augment_pixels(torch.randn(4, 16), torch.Generator(), 1.0)


def test_stranger_anchor_pull_by_formula():
    """Eq. 6 with the anchor p^a = the strangers' mean reference token per position: 1 - cos(z_u, p^a)."""
    strangers = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.0]]])  # (2 photos, 2 tokens, d=2)
    anchor = strangers.mean(0).repeat(1, 1)  # (T, d) = [[2, 0], [0, 1]]
    z_u = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # one forget image's two tokens
    expected = ((1 - 1 / 2**0.5) + (1 - 1.0)) / 2
    assert cvf_pull(z_u, anchor).item() == pytest.approx(expected, abs=1e-6)
    assert pool(strangers).mean(0).tolist() == pytest.approx([1.0, 0.5])  # the pooled anchor


def test_options_are_checked_and_parse_from_the_command_line():
    cfg = parse_options(CVFConfig, ["anchor=stranger_pair", "views=2", "augment=0.5", "gum_batch_size=8"])
    assert (cfg.anchor, cfg.views, cfg.augment, cfg.gum_batch_size) == ("stranger_pair", 2, 0.5, 8)
    for bad in (dict(anchor="celebrity"), dict(views=-1), dict(gum_batch_size=-1), dict(push_floor=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CVFConfig(**bad)


def test_paper_reading_is_its_own_registered_method():
    cls = get_method("cvf_ncu_paper")
    assert cls.config_class is PaperCVFConfig and issubclass(cls, get_method("cvf_ncu"))
    paper = dataclasses.asdict(PaperCVFConfig())
    assert paper | dict(alpha=1.0, level="pooled", center=False, queue_source="forget", anchor="retain") == paper
    assert paper["views"] == 0 and paper["gum_batch_size"] == 0
    # the library's own defaults (view pool, L_DC, beta 2) stay out of the paper's reading
    assert (paper["view_pool"], paper["decorrelate"], paper["ret_weight"]) == (0, 0.0, 1.0)
    # nor the hold on earlier requests in continual runs (keep_forgotten, Eq. 9's form): the paper has none
    assert (paper["keep_forgotten"], paper["keep_forgotten_views"]) == (0.0, 0)


# -- on a small world -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_with_strangers(tmp_path_factory):
    from mllm_unlearn.data.mllmu import read_mllmu
    from mllm_unlearn.data.world import WorldConfig, make_world
    from mllm_unlearn.models.tiny import corpus_for, make_tiny_model

    from .conftest import SMALL

    root = tmp_path_factory.mktemp("strangers")
    cfg = WorldConfig(n_people=10, n_real=4, n_strangers=6, pretrain_strangers=4, train_photos=2, test_photos=2, seed=5)
    world = make_world(root / "world", cfg)
    data = read_mllmu(world, forget="forget_10")
    return data, make_tiny_model("llava", root / "tiny", corpus_for(data), sizes=SMALL)


def test_stranger_samples_are_the_taught_strangers_photos(world_with_strangers):
    data, _ = world_with_strangers
    strangers = stranger_samples(data)
    assert strangers and all(s.answer.strip() == UNKNOWN_REPLY for s in strangers)
    assert not {s.person for s in strangers} & (data.forget_people | data.retain_people)
    assert len(strangers) == len(distinct_images(strangers)) == 4 * 2  # 4 taught strangers x 2 photos


def _train(data, model, method_cfg, strangers, people=None):
    forget, retain = split_people(data, people)
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(**FAST), cls)
    unlearn_stage(lm, cls(method_cfg), forget, retain, UnlearnConfig(**FAST), strangers=strangers)
    ctx = UnlearnContext(lm, forget, retain, 4, 0)
    imgs = distinct_images(forget)
    with torch.no_grad():
        s_mean = pool(ctx.visual_tokens(strangers, reference=True)).mean(0) if strangers else None
        return lm, pool(ctx.visual_tokens(imgs)), s_mean


def test_calibrate_strangers_keeps_strangers_activations_out_of_the_null_space(world_with_strangers):
    """``calibrate_strangers`` (cvf_ncu's default; cvf_ncu_paper's is off): A of every adapted layer lets
    through less of the stranger photos' input energy (trace(A C_s A^T) / trace(C_s), C_s their own
    covariance) than A calibrated on the retain set alone, while the retain set's stays small (0.06 at
    most here, where r is half the layer width)."""
    from mllm_unlearn.models.scoring import image_batches
    from mllm_unlearn.nullspace import collect_covariances, retain_energy

    data, model = world_with_strangers
    _, retain = split_people(data)
    strangers = stranger_samples(data)
    cls = get_method("cvf_ncu")
    plain = attach_adapters(load_model(model), retain, UnlearnConfig(**FAST, calibrate_strangers=False), cls, strangers)
    both = attach_adapters(load_model(model), retain, UnlearnConfig(**FAST), cls, strangers)  # cvf_ncu's default
    base = load_model(model)
    names = list(lora_layers(plain.model))
    forward = lambda m, x: base.arch.image_features(m, x)
    cov_s = collect_covariances(base.model, names, image_batches(base, strangers), forward=forward, progress=False)
    cov_r = collect_covariances(
        base.model, names, image_batches(base, distinct_images(retain)), forward=forward, progress=False
    )

    def a_of(lm, name):
        return dict(lm.model.named_parameters())[f"base_model.model.{name}.lora_A.default.weight"]

    less = [retain_energy(a_of(both, n), cov_s[n].cov) < retain_energy(a_of(plain, n), cov_s[n].cov) for n in names]
    assert names and all(less)
    # still a null space of the retain set: a random A of r = d / 2 rows would let through about half
    assert max(retain_energy(a_of(both, n), cov_r[n].cov) for n in names) < 0.1
    assert get_method("cvf_ncu").calibrate_strangers and not get_method("cvf_ncu_paper").calibrate_strangers


def test_calibrate_views_keeps_augmented_faces_out_of_the_null_space(world_with_strangers):
    """``UnlearnConfig.calibrate_views``: with augmented copies of the calibration images in NCU's
    covariances, A lets through less of the input energy of *other* augmented copies (drawn with another
    seed) of the retain and stranger photos than A calibrated on the photos alone, in every adapted layer
    (0.062 -> 0.059 of it in the first); a negative count, or copies with no visual null space to
    calibrate, are refused before anything runs."""
    from mllm_unlearn.data.augment import augmented_copies
    from mllm_unlearn.models.scoring import image_batches
    from mllm_unlearn.nullspace import collect_covariances, retain_energy

    data, model = world_with_strangers
    _, retain = split_people(data)
    strangers = stranger_samples(data)
    cls = get_method("cvf_ncu")
    plain = attach_adapters(load_model(model), retain, UnlearnConfig(**FAST), cls, strangers)
    viewed = attach_adapters(load_model(model), retain, UnlearnConfig(**FAST, calibrate_views=2), cls, strangers)
    base = load_model(model)
    names = list(lora_layers(plain.model))
    fresh = augmented_copies(distinct_images(retain) + strangers, torch.Generator().manual_seed(12345), 1, 0.25)
    forward = lambda m, x: base.arch.image_features(m, x)
    cov = collect_covariances(base.model, names, image_batches(base, fresh), forward=forward, progress=False)

    def energy(lm, n):
        return retain_energy(
            dict(lm.model.named_parameters())[f"base_model.model.{n}.lora_A.default.weight"], cov[n].cov
        )

    with_views = [energy(viewed, n) for n in names]
    without = [energy(plain, n) for n in names]
    assert names and all(a < b for a, b in zip(with_views, without))
    with pytest.raises(ValueError, match="calibrate_views"):
        UnlearnConfig(calibrate_views=-1)
    with pytest.raises(ValueError, match="subspace 'random' has none"):
        attach_adapters(load_model(model), retain, UnlearnConfig(subspace="random", calibrate_views=1), cls)


def test_forget_directions_add_request_specific_rows_to_the_null_space(world_with_strangers, tmp_path):
    """``UnlearnConfig.forget_directions``: A = the r null directions of the calibration set (unchanged),
    then per layer up to k orthonormal rows outside them, each carrying at least ``forget_ratio`` times
    more of the forget photos' input energy than of the calibration photos' (zero rows where fewer
    qualify). Bad settings, continual mode and a request without photos are refused before calibration."""
    from mllm_unlearn.experiments.continual import run_continual
    from mllm_unlearn.models.scoring import image_batches
    from mllm_unlearn.nullspace import collect_covariances, lora_A_weights

    data, model = world_with_strangers
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    cls = get_method("cvf_ncu")
    plain = lora_A_weights(attach_adapters(load_model(model), retain, UnlearnConfig(**FAST), cls, strangers).model)
    cfg = UnlearnConfig(**FAST, forget_directions=4, forget_ratio=1.5)
    extended = lora_A_weights(attach_adapters(load_model(model), retain, cfg, cls, strangers, forget).model)
    base = load_model(model)
    forward = lambda m, x: base.arch.image_features(m, x)
    cal = distinct_images(retain) + strangers
    cov_c, cov_f = (
        collect_covariances(base.model, list(plain), image_batches(base, imgs), forward=forward, progress=False)
        for imgs in (cal, distinct_images(forget))
    )
    found = 0
    for name, a in extended.items():
        r = plain[name].shape[0]
        assert a.shape == (r + 4, plain[name].shape[1])
        assert torch.equal(a[:r], plain[name])  # the paper's null space, untouched
        rows = a[r:].double()
        kept = rows[rows.norm(dim=1) > 0]
        found += len(kept)
        torch.testing.assert_close(kept @ kept.T, torch.eye(len(kept), dtype=torch.float64), atol=1e-5, rtol=0)
        assert float((kept @ a[:r].double().T).abs().max()) < 1e-5
        # any vector in the span of generalised eigenvectors of ratio >= rho has a ratio >= rho: so has each row
        ratios = [float(v @ cov_f[name].cov @ v) / float(v @ cov_c[name].cov @ v) for v in kept]
        assert all(x >= 1.5 * (1 - 1e-3) for x in ratios)
        assert (rows.norm(dim=1) > 0).tolist() == sorted((rows.norm(dim=1) > 0).tolist(), reverse=True)
    assert 0 < found < 4 * len(extended)  # here 48 of 56: some layers have fewer qualifying directions
    with pytest.raises(ValueError, match="forget_directions must be >= 0"):
        UnlearnConfig(forget_directions=-2)
    with pytest.raises(ValueError, match="subspace 'random' has none"):
        attach_adapters(load_model(model), retain, UnlearnConfig(subspace="random", forget_directions=2), cls)
    with pytest.raises(DataError, match="forget_directions needs the forget request's images"):
        attach_adapters(load_model(model), retain, UnlearnConfig(forget_directions=2), cls, strangers)
    with pytest.raises(ValueError, match="continual unlearning calibrates A once"):
        run_continual(load_model(model), data, tmp_path / "c", UnlearnConfig(forget_directions=2), n_tasks=2)
    assert not (tmp_path / "c").exists()


def test_stranger_anchor_moves_forget_photos_toward_strangers_not_retain_people(world_with_strangers):
    """The direction of the choice: with the stranger anchor the forget photos' IVRs end nearer the
    strangers' mean IVR than with the paper's retain anchor (same steps, same seed)."""
    data, model = world_with_strangers
    strangers = stranger_samples(data)
    _, z_retain, s_mean = _train(data, model, CVFConfig(anchor="retain", alpha=20.0), strangers)
    _, z_stranger, _ = _train(data, model, CVFConfig(anchor="stranger", alpha=20.0), strangers)
    cos_r = F.cosine_similarity(z_retain, s_mean[None]).mean()
    cos_s = F.cosine_similarity(z_stranger, s_mean[None]).mean()
    assert cos_s > cos_r


def test_views_and_gum_batch_keep_text_bit_identical(world_with_strangers):
    data, model = world_with_strangers
    text = [s for s in data.splits["retain"] if s.image is None][:6]
    lm = load_model(model)
    batch = lm.arch.encode(lm.processor, text, [s.question for s in text])
    with torch.no_grad():
        before = lm.model(**batch.inputs).logits
    cfg = CVFConfig(anchor="stranger", views=1, gum_batch_size=2)
    adapted, _, _ = _train(data, model, cfg, stranger_samples(data))
    with torch.no_grad():
        assert torch.equal(adapted.model(**batch.inputs).logits, before)


def test_without_strangers_the_stranger_anchor_falls_back_to_the_retain_anchor(world_with_strangers):
    data, model = world_with_strangers
    _, z_default, _ = _train(data, model, CVFConfig(anchor="retain"), [])
    _, z_fallback, _ = _train(data, model, CVFConfig(anchor="stranger"), [])
    assert torch.allclose(z_default, z_fallback)


def test_b_l2_and_ret_strangers_add_their_terms_by_formula(world_with_strangers):
    """L = Eq. 11 + b_l2 * sum ||B||_F^2; ret_strangers adds Eq. 9 on a stranger batch to L_RET."""
    data, model = world_with_strangers
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(subspace="random"), cls)
    for n, p in lm.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    size = sum((p.detach() ** 2).sum() for n, p in lm.model.named_parameters() if "lora_B" in n)

    def run(**kw):
        torch.manual_seed(0)
        ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0, strangers=strangers)
        method = cls(CVFConfig(queue_size=8, **kw))
        method.setup(ctx)
        return method.loss(ctx, 0)

    (plain, logs), (decayed, logs_d) = run(ret_strangers=False), run(ret_strangers=False, b_l2=0.5)
    assert decayed.item() == pytest.approx(plain.item() + 0.5 * size.item(), rel=1e-5)
    assert logs_d["b_norm2"] == pytest.approx(size.item(), rel=1e-5)
    _, logs_s = run()  # ret_strangers: cvf_ncu's default
    ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0, strangers=strangers)
    batch = ctx.stream("strangers_ret", lambda: strangers, CVFConfig().stranger_batch_size)
    with torch.no_grad():
        extra = ((ctx.visual_tokens(batch) - ctx.visual_tokens(batch, reference=True)) ** 2).sum(-1).mean()
    assert extra.item() > 0
    assert logs_s["ret"] == pytest.approx(logs["ret"] + extra.item(), rel=1e-4)


def _real_world_drift(data, model, cfg: CVFConfig) -> float:
    """Eq. 9 between the real-world people's photos' tokens after a FAST unlearning with ``cfg`` and their
    reference tokens: what Real-world VQA asks about, in no training set of the unlearning."""
    from mllm_unlearn.methods.losses import retention_mse

    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    real = distinct_images(data.items("real", modality="vqa"))
    assert real
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(**FAST), cls, strangers)
    unlearn_stage(lm, cls(cfg), forget, retain, UnlearnConfig(**FAST), strangers=strangers)
    ctx = UnlearnContext(lm, forget, retain, 4, 0)
    with torch.no_grad():
        return retention_mse(ctx.visual_tokens(real), ctx.visual_tokens(real, reference=True)).item()


def test_ret_strangers_keeps_real_world_faces_nearer_their_reference_tokens(world_with_strangers):
    """The direction of the ``ret_strangers`` choice (cvf_ncu's default since the fourth dev pass): with
    L_RET on the taught strangers' photos, the photos of the real-world people (in no training set of the
    unlearning: what Real-world VQA asks about) drift less from their reference tokens (measured: Eq. 9
    0.223 against 0.294 without, same steps and seed, with the twenty-second pass's defaults; 0.082 against
    0.098 with the seventeenth pass's; 0.165 against 0.205 with the fourth pass's)."""
    drift = {on: _real_world_drift(*world_with_strangers, CVFConfig(ret_strangers=on)) for on in (False, True)}
    assert 0 < drift[True] < drift[False]
    assert CVFConfig().ret_strangers and not PaperCVFConfig().ret_strangers


def test_beta_3_keeps_real_world_faces_nearer_their_reference_tokens_beside_the_floor(world_with_strangers):
    """The direction of beta (``ret_weight``) 3, chosen with ``push_floor=0.01`` in the twenty-second pass to
    hold other faces against the floor's larger edit (dev worlds 0-2 and 12-14, three draws: Real-world VQA
    0.969 -> 0.971, int4 retain ratio 0.967 -> 0.983): within the default, the real-world people's photos (in
    no training set of the unlearning) drift less from their reference tokens with beta 3 than with 2
    (measured: Eq. 9 0.223 against 0.273, same steps and seed). The floor's price shows too: without it (beta
    2, the seventeenth pass's default) they drift 0.082."""
    drift = {beta: _real_world_drift(*world_with_strangers, CVFConfig(ret_weight=beta)) for beta in (2.0, 3.0)}
    no_floor = _real_world_drift(*world_with_strangers, CVFConfig(ret_weight=2.0, push_floor=0.0))
    assert CVFConfig().ret_weight == 3.0 and 0 < drift[3.0] < drift[2.0]
    assert 0 < no_floor < drift[3.0]


def _earlier_request(world_with_strangers):
    """(cls, lm, forget, retain, earlier): one retain person taken out as an earlier request's people, and
    cvf_ncu's adapters (a random A) attached for a stage that forgets the forget split."""
    data, model = world_with_strangers
    forget, retain = split_people(data)
    earlier = [s for s in retain if s.person == sorted({r.person for r in retain})[0]]
    retain = [s for s in retain if s not in earlier]
    cls = get_method("cvf_ncu")
    return (
        cls,
        attach_adapters(load_model(model), retain, UnlearnConfig(subspace="random"), cls),
        forget,
        retain,
        earlier,
    )


def test_keep_forgotten_holds_earlier_requests_at_their_tokens_by_formula(world_with_strangers):
    """Continual without replay: L_RET gains keep_forgotten * Eq. 9 between the earlier-forgotten photos'
    tokens now and the tokens the model gave them when the stage began (0 until B moves)."""
    cls, lm, forget, retain, earlier = _earlier_request(world_with_strangers)

    def run(perturb: bool, **kw):
        torch.manual_seed(0)
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.zeros_(p)
        ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0, forgotten=earlier)
        method = cls(CVFConfig(queue_size=8, keep_forgotten_views=0, **kw))  # the photos only: Eq. 9 on them
        method.setup(ctx)
        moved = 0.0
        if perturb:
            with torch.no_grad():
                before = ctx.visual_tokens(distinct_images(earlier))
                for n, p in lm.model.named_parameters():
                    if "lora_B" in n:
                        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
                moved = ((ctx.visual_tokens(distinct_images(earlier)) - before) ** 2).sum(-1).mean().item()
        return method.loss(ctx, 0)[1], moved

    (still, _), (off, _) = run(False), run(False, keep_forgotten=0.0)
    assert still["ret"] == pytest.approx(off["ret"], abs=1e-6)  # B has not moved since setup
    (moved_on, moved), (moved_off, _) = run(True, keep_forgotten=2.0), run(True, keep_forgotten=0.0)
    assert moved > 0
    assert moved_on["ret"] == pytest.approx(moved_off["ret"] + 2.0 * moved, rel=1e-4)


def test_keep_forgotten_views_holds_augmented_copies_of_the_earlier_photos_too(world_with_strangers):
    """``keep_forgotten_views=N``: the hold covers N augmented copies of each earlier photo as well (same
    people, other pixels), each with its own target; 4 by default (nineteenth pass); negative counts are
    refused."""
    cls, lm, forget, retain, earlier = _earlier_request(world_with_strangers)
    held = {}
    for n in (0, 2):
        method = cls(CVFConfig(queue_size=8, keep_forgotten_views=n))
        method.setup(UnlearnContext(lm, forget, retain, batch_size=2, seed=0, forgotten=earlier))
        held[n] = method
    photos = distinct_images(earlier)
    assert CVFConfig().keep_forgotten_views == 4 and len(held[0].forgotten) == len(photos)
    assert len(held[2].forgotten) == 3 * len(photos)
    assert {s.person for s in held[2].forgotten} == {s.person for s in photos}
    assert len({s.image.data for s in held[2].forgotten}) == 3 * len(photos)  # the copies are other pixels
    assert set(held[2].forgotten_target) == {image_key(s) for s in held[2].forgotten}
    with pytest.raises(ValueError, match="keep_forgotten_views must be >= 0"):
        CVFConfig(keep_forgotten_views=-1)


def test_keep_forgotten_views_holds_other_views_of_the_earlier_faces_too(world_with_strangers):
    """The direction of ``keep_forgotten_views`` (the nineteenth pass's default): over a stage that forgets the
    forget split, *fresh* augmented copies of an earlier request's photos (drawn by a generator of their own, so
    other pixels than the held copies: the earlier face as other photos show it) drift less from the tokens
    they had when the stage began with four copies held than with the photos alone. Summed over six earlier
    requests (each retain person in turn, the stage's seed its index), 20 steps: Eq. 9 0.179 against 0.232
    (measured with the twenty-second pass's defaults; 0.221 against 0.323 with the nineteenth's, lower for 4 of
    the 6 requests), so the sum is what is asserted. (The world's own unseen photos
    were a mixed proxy on this untrained tiny model: docs/method.md, nineteenth pass.)"""
    from mllm_unlearn.data.augment import augmented_copies
    from mllm_unlearn.methods.losses import retention_mse

    data, model = world_with_strangers
    forget, retain = split_people(data)
    people = sorted({s.person for s in retain})
    cls = get_method("cvf_ncu")
    drift = {0: 0.0, 4: 0.0}
    for seed in range(6):
        earlier = [s for s in retain if s.person == people[seed % len(people)]]
        others = [s for s in retain if s not in earlier]
        fresh = augmented_copies(distinct_images(earlier), torch.Generator().manual_seed(999 + seed), 8, 0.25)
        for views in drift:
            cfg = UnlearnConfig(subspace="random", steps=20, batch_size=4, warmup=1, seed=seed)
            lm = attach_adapters(load_model(model), others, cfg, cls)
            ctx = UnlearnContext(lm, forget, others, 4, seed)
            with torch.no_grad():
                before = ctx.visual_tokens(fresh)
            method = cls(CVFConfig(queue_size=8, keep_forgotten_views=views))
            unlearn_stage(lm, method, forget, others, cfg, forgotten=earlier)
            with torch.no_grad():
                drift[views] += retention_mse(ctx.visual_tokens(fresh), before).item()
    assert 0 < drift[4] < 0.85 * drift[0]


def test_the_default_rank_is_the_methods_capped_at_half_the_narrowest_layer():
    from mllm_unlearn.train.unlearn import default_rank

    cvf, paper, ga = (get_method(m) for m in ("cvf_ncu", "cvf_ncu_paper", "ga"))
    assert (cvf.default_rank, paper.default_rank, ga.default_rank) == (32, 8, 8)
    assert default_rank(cvf, [64, 256, 128]) == 32  # the demo model's vision tower + projector
    assert default_rank(cvf, [1024, 4096]) == 32  # CLIP ViT-L
    assert default_rank(cvf, [32, 128]) == 16  # the tests' 32-wide tower: never the whole input space
    assert default_rank(ga, [64]) == 8 and default_rank(cvf, [1]) == 1


def test_a_larger_null_space_moves_the_forget_photos_further(world_with_strangers):
    """The direction of the rank choice (docs/method.md): with r = 16 (the default on this 32-wide
    tower) the forget photos' IVRs leave their reference further than with r = 4, same steps and seed
    (measured: 1 - cos 1.22 vs 0.57, retain photos 0.82 vs 0.28, with the twenty-second pass's defaults; 1.02 vs
    0.37 and 0.61 vs 0.11 with earlier ones)."""
    data, model = world_with_strangers
    forget, retain = split_people(data)
    cls = get_method("cvf_ncu")
    moved = {}
    for rank in (4, None):
        cfg = UnlearnConfig(**FAST, rank=rank)
        lm = attach_adapters(load_model(model), retain, cfg, cls)
        lora_a = next(p for n, p in lm.model.named_parameters() if "lora_A" in n)
        assert lora_a.shape[0] == (rank or 16)
        unlearn_stage(lm, cls(CVFConfig()), forget, retain, cfg)
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        moved[rank] = {}
        for who, samples in (("forget", forget), ("retain", retain)):
            images = distinct_images(samples)
            with torch.no_grad():
                now, ref = pool(ctx.visual_tokens(images)), pool(ctx.visual_tokens(images, reference=True))
            moved[rank][who] = 1 - F.cosine_similarity(now, ref).mean().item()
    assert moved[None]["forget"] > 2 * moved[4]["forget"]
    # the price, visible even on this untrained 32-wide tower: retain photos move more too, but less than
    # the forget photos (on the trained demo model Retain VQA stayed at 1.00, docs/method.md)
    assert moved[4]["retain"] < moved[None]["retain"] < moved[None]["forget"]


def _ctx_and_method(data, model, strangers=(), people=None, **kw):
    forget, retain = split_people(data, people)
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(subspace="random"), cls)
    for n, p in lm.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0, strangers=list(strangers))
    method = cls(CVFConfig(queue_size=8, **kw))
    method.setup(ctx)
    return ctx, method


def test_stranger_reply_is_the_reference_models_reply_about_a_stranger_learnt_on_forget_photos(world_with_strangers):
    """L_SR: each forget image pair's target is the reference model's greedy reply to the same question
    asked about a stranger's photo; the term is the answer NLL of a batch of those, added with its weight."""
    from mllm_unlearn.models.scoring import answer_nll, generate
    from mllm_unlearn.nullspace import reference_model

    data, model = world_with_strangers
    strangers = stranger_samples(data)
    ctx, method = _ctx_and_method(
        data, model, strangers, stranger_reply=0.5, stranger_reply_batch_size=2, relearn_sim=0.0
    )
    pairs = [s for s in ctx.forget if s.image is not None]
    targets = method.stranger_targets
    assert [dataclasses.replace(s, answer="") for s in targets] == [dataclasses.replace(s, answer="") for s in pairs]
    assert any(t.answer != s.answer for t, s in zip(targets, pairs))
    # each forget person has one impostor (a stranger, distinct ones while there are enough), and each
    # reply is the reference model's answer to the pair's question about one of the impostor's photos
    impostors = {p: {s.person for s in photos} for p, photos in method.impostors.items()}
    assert set(impostors) == {s.person for s in ctx.forget} and all(len(v) == 1 for v in impostors.values())
    assert not set().union(*impostors.values()) & (data.forget_people | data.retain_people)
    for pair, target in list(zip(pairs, targets))[:3]:
        photos = method.impostors[pair.person]
        with torch.no_grad(), reference_model(ctx.lm.model):
            replies = generate(ctx.lm, photos, [pair.question] * len(photos), max_new_tokens=32)
        assert target.answer in replies
    with torch.no_grad():
        _, with_sr = method.loss(ctx, 0)
        batch = UnlearnContext(ctx.lm, ctx.forget, ctx.retain, 2, 0).stream("stranger_reply", lambda: targets, 2)
        assert with_sr["stranger_reply"] == pytest.approx(answer_nll(ctx.lm, batch).item(), rel=1e-5)
    # added with its weight: the same step with weights 0.5 and 1.5 differs by one term
    losses = []
    for w in (0.5, 1.5):
        ctx_w, method_w = _ctx_and_method(
            data, model, strangers, stranger_reply=w, stranger_reply_batch_size=2, relearn_sim=0.0
        )
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(method_w.loss(ctx_w, 0)[0].item())
    assert losses[1] - losses[0] == pytest.approx(with_sr["stranger_reply"], rel=1e-4)
    # without stranger photos the term is off (no targets), as every stranger option
    _, without = _ctx_and_method(data, model, (), stranger_reply=0.5)
    assert without.stranger_targets == []


@pytest.mark.parametrize(
    ("attack", "identity", "steps"),
    [("answers", False, 1), ("tokens", False, 1), ("tokens", True, 1), ("tokens", False, 3)],
)
def test_relearn_sim_gradient_is_eq7_of_the_held_out_half_at_the_attacked_weights(
    world_with_strangers, attack, identity, steps
):
    """The meta step: W' = W - lr * sign(grad_W L_A), L_A = NLL of A's pairs or Eq. 9 of A's photos, taken
    ``relearn_sim_steps`` times (each gradient at the weights the step before left); the surrogate's value is
    0 and its gradient w.r.t. B is that of Eq. 7 on B's photos at W' (with ``identity_meta``, plus
    ``identity_push`` * L_ID of those photos); W is restored bit for bit."""
    from mllm_unlearn.methods.losses import identity_hinge, retention_mse

    data, model = world_with_strangers
    extra = {"identity_push": 2.0, "identity_meta": True} if identity else {}
    ctx, method = _ctx_and_method(
        data,
        model,
        relearn_sim=1.0,
        relearn_sim_lr=1e-2,
        relearn_sim_batch_size=2,
        relearn_sim_attack=attack,
        relearn_sim_steps=steps,
        **extra,
    )
    weights = [w.detach().clone() for w in method.attack_weights]
    retain = ctx.stream("retain_vqa", lambda: [s for s in ctx.retain if s.image is not None], 16)
    h_rr_all = ctx.visual_tokens(retain, reference=True)
    gen = method.generator.get_state()
    surrogate, meta = method._relearn_sim(ctx, h_rr_all)
    assert surrogate.item() == 0.0
    assert all(torch.equal(w, v) for w, v in zip(method.attack_weights, weights))
    params = [p for p in ctx.lm.model.parameters() if p.requires_grad]
    got = torch.autograd.grad(surrogate, params, allow_unused=True)
    # by hand, with the same draws
    method.generator.set_state(gen)
    g = method.generator
    people = [method.forget_people[i] for i in torch.randperm(len(method.forget_people), generator=g).tolist()]
    half = max(1, len(people) // 2)
    pool_a = [s for s in method.forget_pairs if s.person in set(people[:half])]
    pairs = [pool_a[i] for i in torch.randperm(len(pool_a), generator=g)[:2].tolist()]
    held = set(people[half:]) or set(people[:half])  # one forget person here: A = B
    pool_b = distinct_images([s for s in method.forget_pairs if s.person in held])
    photos = [pool_b[i] for i in torch.randperm(len(pool_b), generator=g)[:2].tolist()]
    signs = []
    for _ in range(steps):
        for w in method.attack_weights:
            w.requires_grad_(True)
        if attack == "answers":
            attack_loss = ctx.nll(pairs)
        else:
            shown = distinct_images(pairs)
            attack_loss = retention_mse(ctx.visual_tokens(shown), ctx.visual_tokens(shown, reference=True))
        grads = torch.autograd.grad(attack_loss, method.attack_weights)
        for w in method.attack_weights:
            w.requires_grad_(False)
        with torch.no_grad():
            for w, gw in zip(method.attack_weights, grads):
                w.sub_(1e-2 * gw.sign())
        signs.append(torch.cat([gw.sign().flatten() for gw in grads]))
    if steps > 1:  # the later steps' gradients are not the first one's again: each was taken where it stood
        assert not torch.equal(signs[0], signs[-1])
    h_u, h_r = ctx.visual_tokens(photos), ctx.visual_tokens(photos, reference=True)
    z_u, z_r = h_u.reshape(-1, h_u.shape[-1]), h_r.reshape(-1, h_r.shape[-1])
    anchor = h_rr_all.mean(0).repeat(len(h_u), 1)
    want = cvf_pull(z_u, anchor) + cvf_push_of(method, z_u, z_r)
    if identity:
        prototypes = torch.stack([method.identity[s.person] for s in photos])
        l_id = identity_hinge(pool(h_u) - method.center, prototypes, 0.0)
        assert l_id.item() > 0  # the term is active: the check below can fail
        want = want + 2.0 * l_id
    assert want.item() == pytest.approx(meta, rel=1e-5)
    expected = torch.autograd.grad(want, params, allow_unused=True)
    with torch.no_grad():
        for w, v in zip(method.attack_weights, weights):
            w.copy_(v)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a is not None and a.abs().sum() > 0 for a in got)


def cvf_push_of(method, z_u, z_r):
    from mllm_unlearn.methods.losses import cvf_push

    return cvf_push(z_u - method.center, z_r - method.center, method.queue, method.cfg.tau, floor=method.cfg.push_floor)


def test_relearn_sim_keeps_the_other_half_forgotten_when_half_is_relearned(tmp_path_factory):
    """The direction of the relearn_sim choice, in the visual module: after unlearning two people, an
    attacker fine-tunes every visual weight to give person A's photos their old tokens back; person B's
    tokens come back less far toward their reference when training simulated that attack."""
    from mllm_unlearn.data.mllmu import read_mllmu
    from mllm_unlearn.data.world import WorldConfig, make_world
    from mllm_unlearn.methods.losses import retention_mse
    from mllm_unlearn.models.tiny import corpus_for, make_tiny_model

    from .conftest import SMALL

    root = tmp_path_factory.mktemp("relearn")
    cfg = WorldConfig(n_people=20, n_real=4, n_strangers=0, pretrain_strangers=0, train_photos=2, test_photos=1, seed=4)
    data = read_mllmu(make_world(root / "world", cfg), forget="forget_10")
    model = make_tiny_model("llava", root / "tiny", corpus_for(data), sizes=SMALL)
    forget, retain = split_people(data)
    a, b = sorted({s.person for s in forget})[:2]
    photos = {p: distinct_images([s for s in forget if s.person == p]) for p in (a, b)}
    cls = get_method("cvf_ncu")
    back = {}
    for weight in (0.0, 1.0):
        run_cfg = UnlearnConfig(steps=30, batch_size=4, warmup=2)
        lm = attach_adapters(load_model(model), retain, run_cfg, cls)
        # the defaults when this was measured: 16 retain pairs a step (no strangers in this world; with 12, B's
        # tokens already move away under the attack without relearn_sim, -7.3 vs -5.1 with it), two view-pool
        # copies, no L_DC, beta 1. With the seventeenth pass's L_DC, four copies and beta 2 B's tokens move away
        # under the attack without relearn_sim too (measured: -2.3 of the way back without, 0.16 with); no
        # floor under Eq. 4 (the twenty-second pass's)
        old = dict(retain_batch_size=16, view_pool=2, decorrelate=0.0, ret_weight=1.0, push_floor=0.0)
        method = cls(CVFConfig(relearn_sim=weight, relearn_sim_every=1, relearn_sim_lr=1e-2, **old))
        unlearn_stage(lm, method, forget, retain, run_cfg)
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        with torch.no_grad():
            ref = {p: ctx.visual_tokens(photos[p], reference=True) for p in (a, b)}
        lm.model = lm.model.merge_and_unload()
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        with torch.no_grad():
            before = retention_mse(ctx.visual_tokens(photos[b]), ref[b]).item()
        params = [p for n, p in lm.model.named_parameters() if "vision" in n or "projector" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-3)
        for _ in range(10):  # the attack: person A's photos back to their old tokens
            opt.zero_grad()
            retention_mse(ctx.visual_tokens(photos[a]), ref[a]).backward()
            opt.step()
        with torch.no_grad():
            back[weight] = 1 - retention_mse(ctx.visual_tokens(photos[b]), ref[b]).item() / before
    assert back[1.0] < back[0.0]  # measured: 0.10 of the way back without, -4.3 (further away) with


def test_mid_push_adds_eq4_at_the_middle_block_by_formula(world_with_strangers):
    """``mid_push``: the loss grows by alpha * weight * Eq. 4 of the forget photos' hidden states at the
    middle vision block (against the reference model's there; the retain batch's, detached, as negatives;
    centred on their mean), computed here by hand from forward hooks; a block index out of range is refused."""
    from mllm_unlearn.methods.losses import cvf_push
    from mllm_unlearn.models.base import block_outputs
    from mllm_unlearn.nullspace import reference_model

    data, model = world_with_strangers
    ctx, plain = _ctx_and_method(data, model, relearn_sim=0.0, view_pool=0)  # the photos' stream only

    def loss(method_ctx):
        torch.manual_seed(0)
        return method_ctx[1].loss(method_ctx[0], 0)

    base, _ = loss((ctx, plain))
    ctx2, method = _ctx_and_method(data, model, relearn_sim=0.0, view_pool=0, mid_push=0.5)  # A, B as ctx's
    total, logs = loss((ctx2, method))
    # by hand, on the batches the fresh streams give first
    ctx3 = UnlearnContext(ctx2.lm, ctx.forget, ctx.retain, batch_size=2, seed=0)
    forget = ctx3.stream("forget_images", lambda: distinct_images(ctx3.forget))
    retain = ctx3.stream(
        "retain_vqa", lambda: [s for s in ctx3.retain if s.image is not None], CVFConfig().retain_batch_size
    )
    block = ctx2.lm.arch.vision_blocks(ctx2.lm.model)[0]  # (2 - 1) // 2: the first of this tower's two
    with torch.no_grad():
        with block_outputs(block) as fu:
            ctx3.visual_tokens(forget)
        with block_outputs(block) as ru:
            ctx3.visual_tokens(retain)
        with block_outputs(block) as fr, reference_model(ctx2.lm.model):
            ctx3.visual_tokens(forget)
    d = fu[0].shape[-1]
    neg = ru[0].reshape(-1, d)
    c = neg.mean(0)
    assert not torch.allclose(fu[0], fr[0])  # B != 0 moved the block's output
    expected = cvf_push(fu[0].reshape(-1, d) - c, fr[0].reshape(-1, d) - c, neg - c, 0.07).item()
    assert logs["mid_push"] == pytest.approx(expected, rel=1e-4)
    assert total.item() == pytest.approx(base.item() + CVFConfig().alpha * 0.5 * expected, rel=1e-4)
    with pytest.raises(ValueError, match="mid_layer=5"):
        _ctx_and_method(data, model, mid_push=1.0, mid_layer=5)


def test_view_pool_adds_seeded_augmented_copies_of_each_forget_photo(world_with_strangers):
    """``view_pool=K``: the push / pull draws from the photos and K augmented copies of each (same person,
    other bytes, the same for the same seed), whose reference tokens are cached with the photos'."""
    from PIL import Image

    from mllm_unlearn.nullspace.reference import image_key

    data, model = world_with_strangers
    ctx, method = _ctx_and_method(data, model, view_pool=2, relearn_sim=0.0)
    photos = distinct_images(ctx.forget)
    copies = method.push_images[len(photos) :]
    assert method.push_images[: len(photos)] == photos and len(copies) == 2 * len(photos)
    assert [c.person for c in copies] == [p.person for p in photos] * 2
    assert len({c.image.data for c in copies} | {p.image.data for p in photos}) == 3 * len(photos)
    assert all(image_key(c) in ctx.reference for c in copies)
    _, again = _ctx_and_method(data, model, view_pool=2, relearn_sim=0.0)
    assert [c.image.data for c in again.push_images] == [c.image.data for c in method.push_images]
    _, plain = _ctx_and_method(data, model, relearn_sim=0.0, view_pool=0)
    assert plain.push_images == photos
    img = photos[0].image.load()
    assert augment_image(img, torch.Generator(), 0.0) is img
    out = augment_image(img, torch.Generator().manual_seed(0), 1.0)
    assert isinstance(out, Image.Image) and out.size == img.size and out.tobytes() != img.tobytes()
    with pytest.raises(ValueError, match="view_pool"):
        CVFConfig(view_pool=-1)


def _unseen_and_retain_moved(data, model, method_cfg: CVFConfig) -> dict[str, float]:
    """1 - cos between pooled tokens and their reference tokens after 20 steps with ``method_cfg``, meaned over
    the forget people's unseen photos (``Test_Set``, which no step sees: asserted) and over the retain photos."""
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    unseen = distinct_images([s for s in data.splits["test"] if s.person in data.forget_people and s.image])
    assert unseen and not {image_key(s) for s in unseen} & {image_key(s) for s in distinct_images(forget)}
    cls, cfg = get_method("cvf_ncu"), UnlearnConfig(steps=20, batch_size=4, warmup=1)
    lm = attach_adapters(load_model(model), retain, cfg, cls, strangers)
    unlearn_stage(lm, cls(method_cfg), forget, retain, cfg, strangers=strangers)
    ctx = UnlearnContext(lm, forget, retain, 4, 0)
    moved = {}
    for who, images in (("unseen", unseen), ("retain", distinct_images(retain))):
        with torch.no_grad():
            now, ref = pool(ctx.visual_tokens(images)), pool(ctx.visual_tokens(images, reference=True))
        moved[who] = 1 - F.cosine_similarity(now, ref).mean().item()
    return moved


def test_view_pool_moves_the_forget_persons_unseen_photos_further(world_with_strangers):
    """The direction of the ``view_pool`` choice of the third pass (2 copies, with beta 1 and no L_DC, the
    defaults then): with augmented copies of the forget photos in the push / pull's stream, the forget person's
    unseen photo (``Test_Set``, which no step sees) leaves its reference tokens further than without, same steps
    and seed (measured: 1 - cos 0.86 -> 0.98). The price shows too: the retain photos move more (0.41 -> 0.50). On
    the trained dev worlds 0-2 (docs/method.md, third pass) two copies took unseen-photo forget VQA 0.325 -> 0.252
    and Real-world VQA 0.960 -> 0.950. Since the seventeenth pass the default is 4 copies, chosen as one setting
    with L_DC and beta 2; on this small world 4 copies against none within it move the unseen photo less (0.79
    against 0.86), so this test pins the setting whose direction it shows."""
    third_pass = dict(relearn_sim=0.0, decorrelate=0.0, ret_weight=1.0, push_floor=0.0)
    moved = {n: _unseen_and_retain_moved(*world_with_strangers, CVFConfig(view_pool=n, **third_pass)) for n in (0, 2)}
    assert moved[2]["unseen"] > moved[0]["unseen"] + 0.05
    assert moved[0]["retain"] < moved[2]["retain"] < moved[2]["unseen"]
    assert CVFConfig().view_pool == 4


def test_push_floor_moves_the_forget_persons_unseen_photos_further(world_with_strangers):
    """The direction of ``push_floor=0.01`` (twenty-second pass; dev worlds 0-2 and 12-14, three draws with
    beta 3: unseen-photo forget VQA 0.290 -> 0.221, relearning recovery 0.186 -> 0.062): within the default,
    with Eq. 4's terms under a floor the forget person's unseen photos (``Test_Set``, which no step sees) leave
    their reference tokens further than with Eq. 4's own terms, same steps and seed (measured: 1 - cos of the
    pooled tokens 0.90 -> 1.07), while the retain photos move about as much (0.302 -> 0.308)."""
    moved = {f: _unseen_and_retain_moved(*world_with_strangers, CVFConfig(push_floor=f)) for f in (0.0, 0.01)}
    assert moved[0.01]["unseen"] > moved[0.0]["unseen"] + 0.05
    assert moved[0.01]["retain"] < moved[0.0]["retain"] + 0.05
    assert CVFConfig().push_floor == 0.01 and PaperCVFConfig().push_floor == 0.0


def _push_on_first_batch(ctx, method):
    """``method``'s logged Eq. 4 at its first step, and by hand the batch a fresh stream gives first:
    (logged push, batch, centred unlearned tokens (n * T, d), centred reference tokens, queue, centre)."""
    queue, center = method.queue.clone(), method.center
    torch.manual_seed(0)
    _, logs = method.loss(ctx, 0)
    fresh = UnlearnContext(ctx.lm, ctx.forget, ctx.retain, batch_size=2, seed=0)
    batch = fresh.stream("forget_images", lambda: method.push_images)
    with torch.no_grad():
        h_u, h_r = fresh.visual_tokens(batch), fresh.visual_tokens(batch, reference=True)
    d = h_u.shape[-1]
    return logs["push"], batch, h_u.reshape(-1, d) - center, h_r.reshape(-1, d) - center, queue, center


def test_person_push_target_pushes_from_the_persons_mean_reference_tokens_by_formula(world_with_strangers):
    """``push_target=person``: Eq. 4's positive is the person's mean reference tokens over all of their
    push images (photos and view-pool copies; per token position), not the photo's own; computed by hand
    on the batch the fresh stream gives first. An unknown target is refused."""
    from mllm_unlearn.methods.losses import cvf_push

    data, model = world_with_strangers
    ctx, method = _ctx_and_method(data, model, relearn_sim=0.0, push_target="person")  # the default view pool
    people = sorted({s.person for s in method.push_images})
    for person in people:
        imgs = [s for s in method.push_images if s.person == person]
        photos = [s for s in distinct_images(ctx.forget) if s.person == person]
        assert len(imgs) == (1 + CVFConfig().view_pool) * len(photos)
        assert torch.equal(method.person_tokens[person], ctx.visual_tokens(imgs, reference=True).mean(0))
    push, batch, z_u, z_r, queue, center = _push_on_first_batch(ctx, method)
    mean = torch.stack([method.person_tokens[s.person] for s in batch]).reshape(z_u.shape) - center
    f = method.cfg.push_floor
    expected = cvf_push(z_u, mean, queue, 0.07, floor=f).item()
    assert push == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(cvf_push(z_u, z_r, queue, 0.07, floor=f).item(), rel=1e-3)
    with pytest.raises(ValueError, match="push_target"):
        CVFConfig(push_target="face")


def test_push_focus_weights_eq4_by_each_ivrs_remaining_likeness_to_its_reference(world_with_strangers):
    """``push_focus=gamma``: Eq. 4's per-IVR terms averaged with weights max(0, cos(z_u - c, z_r - c))^gamma
    (equal weights give Eq. 4's mean, a one-hot weight that IVR's term); computed by hand on the batch the
    fresh stream gives first. A negative gamma is refused."""
    from mllm_unlearn.methods.losses import cvf_push

    g = torch.Generator().manual_seed(0)
    u, r, q = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    plain = cvf_push(u, r, q, 0.07)
    assert cvf_push(u, r, q, 0.07, torch.full((5,), 3.0)).item() == pytest.approx(plain.item(), rel=1e-6)
    one = cvf_push(u[2:3], r[2:3], q, 0.07)
    assert cvf_push(u, r, q, 0.07, torch.eye(5)[2]).item() == pytest.approx(one.item(), rel=1e-6)

    data, model = world_with_strangers
    ctx, method = _ctx_and_method(data, model, relearn_sim=0.0, push_focus=2.0)
    push, _, z_u, z_r, queue, _ = _push_on_first_batch(ctx, method)
    w = F.cosine_similarity(z_u, z_r, dim=-1).clamp(min=0) ** 2
    assert w.min() < 0.5 * w.max()  # the weights differ between IVRs: the check below can fail
    f = method.cfg.push_floor
    expected = cvf_push(z_u, z_r, queue, 0.07, w, f).item()
    assert push == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(cvf_push(z_u, z_r, queue, 0.07, floor=f).item(), rel=1e-3)
    with pytest.raises(ValueError, match="push_focus"):
        CVFConfig(push_focus=-1.0)


def test_identity_push_holds_each_forget_ivr_off_its_persons_prototype_by_formula(world_with_strangers):
    """L_ID (``identity_push``): mean over pooled forget IVRs of max(0, cos(z - c, p_person) - margin), p the
    person's mean pooled reference IVR over their push images, centred; by hand on hand-made tensors and on
    the batch the fresh stream gives first. Off by default; a weight < 0 or a margin outside [-1, 1) is
    refused."""
    from mllm_unlearn.methods.losses import identity_hinge

    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    # cosines 1, 1/sqrt(2), -1/sqrt(2): margin 0 keeps the first two, margin 0.9 the first (0.1)
    assert identity_hinge(z, p, 0.0).item() == pytest.approx((1 + 2**-0.5) / 3, rel=1e-6)
    assert identity_hinge(z, p, 0.9).item() == pytest.approx(0.1 / 3, rel=1e-5)
    assert identity_hinge(z, p, -1.0).item() == pytest.approx((2 + (1 + 2**-0.5) + (1 - 2**-0.5)) / 3, rel=1e-6)

    data, model = world_with_strangers
    ctx, method = _ctx_and_method(data, model, relearn_sim=0.0, identity_push=1.0, identity_margin=-0.5)
    torch.manual_seed(0)
    _, logs = method.loss(ctx, 0)
    fresh = UnlearnContext(ctx.lm, ctx.forget, ctx.retain, batch_size=2, seed=0)
    batch = fresh.stream("forget_images", lambda: method.push_images)
    proto = {
        person: F.normalize(
            pool(ctx.visual_tokens([s for s in method.push_images if s.person == person], reference=True)).mean(0)
            - method.center,
            dim=-1,
        )
        for person in {s.person for s in batch}
    }
    with torch.no_grad():
        z_u = pool(fresh.visual_tokens(batch)) - method.center
    cos = F.cosine_similarity(z_u, torch.stack([proto[s.person] for s in batch]), dim=-1)
    assert (cos > -0.5).all()  # every term is active: the hinge's value is the plain mean below
    assert logs["identity"] == pytest.approx((cos + 0.5).mean().item(), rel=1e-4)
    assert CVFConfig().identity_push == 0.0
    with pytest.raises(ValueError, match="identity_push"):
        CVFConfig(identity_push=-1.0)
    with pytest.raises(ValueError, match="identity_margin"):
        CVFConfig(identity_margin=1.0)
    with pytest.raises(ValueError, match="identity_meta"):
        CVFConfig(identity_meta=True)


def test_identity_push_moves_the_forget_photos_off_their_persons_prototype(world_with_strangers):
    """The direction of L_ID on the small world: same steps and seed, the forget photos' pooled IVRs end with
    a smaller cosine to their person's identity prototype (mean pooled reference IVR, centred on the retain
    set's mean) with ``identity_push=3`` than without (measured: -0.58 against -0.46 with the twenty-second pass's
    defaults; -0.54 against -0.37 with earlier ones)."""
    data, model = world_with_strangers
    forget, retain = split_people(data)
    imgs = distinct_images(forget)
    own = {}
    for weight in (0.0, 3.0):
        lm, z, _ = _train(data, model, CVFConfig(identity_push=weight, relearn_sim=0.0), [])
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        with torch.no_grad():
            center = pool(ctx.visual_tokens(distinct_images(retain), reference=True)).mean(0)
            ref = pool(ctx.visual_tokens(imgs, reference=True)) - center
        proto = {p: F.normalize(ref[[s.person == p for s in imgs]].mean(0), dim=-1) for p in {s.person for s in imgs}}
        cos = F.cosine_similarity(z - center, torch.stack([proto[s.person] for s in imgs]), dim=-1)
        own[weight] = cos.mean().item()
    assert own[3.0] < own[0.0] - 0.05


def test_stranger_profile_holds_forget_ivrs_as_far_from_every_known_person_as_strangers_by_formula(
    world_with_strangers,
):
    """L_SP (``stranger_profile``): mean over pooled forget IVRs of max(0, max_k cos(z - c, p_k) - m), p_k the
    prototypes of every known person (the request's and the retain set's), m the reference model's mean
    cosine of a stranger photo to its nearest one; by hand on hand-made tensors and on the first batch.
    Without stranger photos it is off; a weight < 0 is refused and ``identity_meta`` accepts it alone."""
    from mllm_unlearn.methods.losses import stranger_profile_hinge

    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    known = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # nearest known cosines 1, 1/sqrt(2), -1/sqrt(2): margin 0.5 keeps the first two
    assert stranger_profile_hinge(z, known, 0.5).item() == pytest.approx((0.5 + 2**-0.5 - 0.5) / 3, rel=1e-6)
    assert stranger_profile_hinge(z, known, -1.0).item() == pytest.approx((2 + 1 + 2**-0.5 + 1 - 2**-0.5) / 3)

    data, model = world_with_strangers
    strangers = stranger_samples(data)
    assert _ctx_and_method(data, model, relearn_sim=0.0, stranger_profile=1.0)[1].known is None
    ctx, method = _ctx_and_method(data, model, strangers, relearn_sim=0.0, stranger_profile=1.0)
    with torch.no_grad():  # B = 0: the photos start where the reference model puts them, nearer than strangers
        for n, p in ctx.lm.model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    torch.manual_seed(0)
    _, logs = method.loss(ctx, 0)
    _, retain = split_people(data)
    with torch.no_grad():
        center = pool(ctx.visual_tokens(distinct_images(retain), reference=True)).mean(0)
        images = method.push_images + distinct_images(retain)
        ref = pool(ctx.visual_tokens(images, reference=True)) - center
        protos = F.normalize(_by_person(ref, images), dim=-1)
        s_z = F.normalize(pool(ctx.visual_tokens(method.strangers, reference=True)) - center, dim=-1)
        margin = (s_z @ protos.T).max(-1).values.mean().item()
    assert len(method.known) == len({s.person for s in images})  # every forget and retain person
    assert method.stranger_margin == pytest.approx(margin, rel=1e-5)
    fresh = UnlearnContext(ctx.lm, ctx.forget, ctx.retain, batch_size=2, seed=0, strangers=strangers)
    batch = fresh.stream("forget_images", lambda: method.push_images)
    with torch.no_grad():
        z_u = F.normalize(pool(fresh.visual_tokens(batch)) - center, dim=-1)
    nearest = (z_u @ protos.T).max(-1).values
    expected = (nearest - margin).clamp(min=0).mean().item()
    assert expected > 0  # the term is active: the check can fail
    assert logs["stranger_profile"] == pytest.approx(expected, rel=1e-4)
    assert "identity" not in logs
    assert CVFConfig(stranger_profile=1.0, identity_meta=True).identity_meta
    with pytest.raises(ValueError, match="stranger_profile"):
        CVFConfig(stranger_profile=-1.0)


def test_stranger_profile_moves_forget_photos_away_from_every_known_person(world_with_strangers):
    """The direction of L_SP on the small world: same steps and seed, the forget photos' pooled IVRs end with a
    smaller cosine to their nearest known person's prototype with ``stranger_profile=3`` than without (measured:
    0.48 against 0.61 with the twenty-second pass's defaults; 0.44 against 0.72 with earlier ones)."""
    data, model = world_with_strangers
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    imgs = distinct_images(forget) + distinct_images(retain)
    nearest = {}
    for weight in (0.0, 3.0):
        lm, z, _ = _train(data, model, CVFConfig(stranger_profile=weight, relearn_sim=0.0), strangers)
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        with torch.no_grad():
            center = pool(ctx.visual_tokens(distinct_images(retain), reference=True)).mean(0)
            ref = pool(ctx.visual_tokens(imgs, reference=True)) - center
        protos = F.normalize(_by_person(ref, imgs), dim=-1)
        nearest[weight] = (F.normalize(z - center, dim=-1) @ protos.T).max(-1).values.mean().item()
    assert nearest[3.0] < nearest[0.0] - 0.05, nearest


def _by_person(x: torch.Tensor, images) -> torch.Tensor:
    """The mean of ``x``'s rows (one per image of ``images``) over each person's, people sorted by name."""
    return torch.stack([x[[s.person == p for s in images]].mean(0) for p in sorted({s.person for s in images})])


def _three_forget_people(data) -> list[str]:
    """The small world's forget person and two of its retain people: L_DC needs two people or more."""
    return sorted(data.forget_people) + sorted(data.retain_people - data.forget_people)[:2]


def _person_shifts(ctx, images) -> torch.Tensor:
    """Each person's mean shift of pooled IVRs (unlearned minus reference) over ``images``, people sorted."""
    with torch.no_grad():
        shift = pool(ctx.visual_tokens(images)) - pool(ctx.visual_tokens(images, reference=True))
    return _by_person(shift, images)


def test_decorrelate_is_the_mean_squared_cosine_between_peoples_shifts_by_formula(world_with_strangers):
    """L_DC (``decorrelate``): mean over pairs of different forget people of cos(d_p, d_q)^2, d_p the person's
    mean shift of pooled IVRs (unlearned minus reference) over their images in the batch; by hand on hand-made
    tensors and on the first batch. Off by default; a weight < 0 is refused."""
    from mllm_unlearn.methods.losses import shift_alignment

    d = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # cosines 0, 1/sqrt(2), 1/sqrt(2): squared 0, 1/2, 1/2
    assert shift_alignment(d).item() == pytest.approx(1 / 3, rel=1e-6)
    assert shift_alignment(d[:1]).item() == 0.0
    assert shift_alignment(torch.tensor([[1.0, 1.0], [-2.0, -2.0]])).item() == pytest.approx(1.0, rel=1e-6)

    data, model = world_with_strangers
    three = _three_forget_people(data)
    ctx, method = _ctx_and_method(data, model, people=three, relearn_sim=0.0, decorrelate=1.0)
    torch.manual_seed(0)
    _, logs = method.loss(ctx, 0)
    fresh = UnlearnContext(ctx.lm, ctx.forget, ctx.retain, batch_size=2, seed=0)
    batch = fresh.stream("forget_images", lambda: method.push_images)
    shifts = _person_shifts(fresh, batch)
    assert len(shifts) >= 2  # two people or more in the batch: the term is defined and can differ
    assert logs["decorrelate"] == pytest.approx(shift_alignment(shifts).item(), rel=1e-4)
    assert CVFConfig().decorrelate == 1.0
    with pytest.raises(ValueError, match="decorrelate"):
        CVFConfig(decorrelate=-1.0)


def test_decorrelate_moves_forget_people_along_directions_of_their_own(world_with_strangers):
    """The direction of L_DC, the default's weight (1, since the seventeenth pass) against none, on the small world:
    same steps and seed, the forget people's mean IVR shifts end less aligned with each other (mean squared
    pairwise cosine; measured: 0.33 against 0.78; with ``decorrelate=3`` and the defaults before it, 0.39
    against 0.79). Pinned to the setting it was chosen in (no floor under Eq. 4, beta 2): within the
    twenty-second pass's default (``push_floor=0.01``, beta 3) the shifts on this small world are less aligned
    without L_DC than with it (0.17 against 0.26), the floor itself spreading them. On the trained development
    worlds L_DC still earns its place beside the floor (twenty-third pass: relearning recovery 0.147 without it
    against 0.062, three draws on six worlds), so that small-world alignment is not what it is kept for."""
    from mllm_unlearn.methods.losses import shift_alignment

    data, model = world_with_strangers
    three = _three_forget_people(data)
    forget, retain = split_people(data, three)
    strangers = stranger_samples(data)
    aligned = {}
    default = CVFConfig().decorrelate
    for weight in (0.0, default):
        cfg = CVFConfig(decorrelate=weight, relearn_sim=0.0, push_floor=0.0, ret_weight=2.0)
        lm, _, _ = _train(data, model, cfg, strangers, three)
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        aligned[weight] = shift_alignment(_person_shifts(ctx, distinct_images(forget))).item()
    assert default == 1.0 and aligned[default] < aligned[0.0] - 0.05, aligned


def _calibration_change(lm) -> float:
    """The mean over the adapted layers of trace(dW C dW^T) / trace(W C W^T) on NCU's calibration photos."""
    from mllm_unlearn.nullspace import calibration_terms

    with torch.no_grad():
        moved = [calibration_output_change(*terms).item() for terms in calibration_terms(lm.model)]
    return sum(moved) / len(moved)


def test_preserve_penalises_the_calibration_photos_layer_output_change_by_formula(world_with_strangers):
    """``preserve``: each adapted layer keeps A C A^T and trace(W C W^T) of NCU's calibration covariance C
    (Eq. 13, here the retain images and the strangers' photos), and the loss adds ``preserve`` times the mean
    over the layers of trace(dW C dW^T) / trace(W C W^T), dW = s B A, by hand from C collected anew. A random
    A has no calibration: refused, naming the subspace."""
    from mllm_unlearn.models.scoring import image_batches
    from mllm_unlearn.nullspace import collect_covariances

    data, model = world_with_strangers
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(), cls, strangers)
    for n, p in lm.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    plain = load_model(model)
    images = distinct_images(retain) + distinct_images(strangers)
    layers = lora_layers(lm.model)
    cov = collect_covariances(
        plain.model, list(layers), image_batches(plain, images), forward=plain.arch.image_features, progress=False
    )
    adapter, moved = lm.model.active_adapter, []
    for name, layer in layers.items():
        a, b = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.detach().double()
        dw, w, c = layer.scaling[adapter] * b @ a, layer.base_layer.weight.detach().double(), cov[name].cov
        moved.append((torch.trace(dw @ c @ dw.T) / torch.trace(w @ c @ w.T)).item())
    assert min(moved) > 0 and _calibration_change(lm) == pytest.approx(sum(moved) / len(moved), rel=1e-4)

    def run(**kw):
        torch.manual_seed(0)
        ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0, strangers=strangers)
        method = cls(CVFConfig(queue_size=8, relearn_sim=0.0, **kw))
        method.setup(ctx)
        return method.loss(ctx, 0)

    (base, _), (penalised, logs) = run(), run(preserve=3.0)
    assert logs["preserve"] == pytest.approx(sum(moved) / len(moved), rel=1e-4)
    assert penalised.item() == pytest.approx(base.item() + 3.0 * logs["preserve"], rel=1e-5)
    rand = attach_adapters(load_model(model), retain, UnlearnConfig(subspace="random"), cls)
    with pytest.raises(ValueError, match="subspace='null'"):
        cls(CVFConfig(preserve=1.0)).setup(UnlearnContext(rand, forget, retain, batch_size=2, seed=0))


def test_preserve_moves_the_calibration_photos_less_and_the_forget_photos_still(world_with_strangers):
    """The direction of ``preserve``: same steps and seed, the penalty lowers the calibration photos' layer
    output change (its own quantity) while the forget photos still leave their reference tokens (measured:
    weight 30 against 0, calibration 0.148 -> 0.024, forget photos' 1 - cos 1.01 -> 0.92 with the twenty-second
    pass's defaults; 0.145 -> 0.016 and 0.91 -> 0.87 with earlier ones)."""
    data, model = world_with_strangers
    forget, retain = split_people(data)
    strangers = stranger_samples(data)
    cls, cfg = get_method("cvf_ncu"), UnlearnConfig(steps=20, batch_size=4, warmup=1)
    changed, left = {}, {}
    for weight in (0.0, 30.0):
        lm = attach_adapters(load_model(model), retain, cfg, cls, strangers)
        method = cls(CVFConfig(preserve=weight, relearn_sim=0.0))
        unlearn_stage(lm, method, forget, retain, cfg, strangers=strangers)
        ctx = UnlearnContext(lm, forget, retain, 4, 0)
        changed[weight] = _calibration_change(lm)
        images = distinct_images(forget)
        with torch.no_grad():
            now, ref = pool(ctx.visual_tokens(images)), pool(ctx.visual_tokens(images, reference=True))
        left[weight] = 1 - F.cosine_similarity(now, ref).mean().item()
    assert changed[30.0] < 0.5 * changed[0.0]
    assert left[30.0] > 0.5 * left[0.0]


def test_what_a_step_reads_outside_the_forward_is_refused_under_sharded_parameters(world_with_strangers, monkeypatch):
    """``relearn_sim`` (moves full base weights) and ``preserve`` (reads every B) are refused in ``setup``, before
    any step, when ZeRO-3 / FSDP shard the parameters; the message names the option to turn off."""
    from mllm_unlearn.runtime import distributed

    data, model = world_with_strangers
    forget, retain = split_people(data)
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(), cls)
    monkeypatch.setattr(distributed, "sharded", lambda: True)
    for kw, name in (({}, "relearn_sim"), ({"relearn_sim": 0.0, "preserve": 1.0}, "preserve")):
        with pytest.raises(ValueError, match=f"{name} .*ZeRO-3 / FSDP shard: run with --opt {name}=0"):
            cls(CVFConfig(**kw)).setup(UnlearnContext(lm, forget, retain, batch_size=2, seed=0))
    cls(CVFConfig(relearn_sim=0.0)).setup(UnlearnContext(lm, forget, retain, batch_size=2, seed=0))
