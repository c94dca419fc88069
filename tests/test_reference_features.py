"""Reference features computed once per request, L_GUM from the retain batch's visual pass, and that
both give what the per-step passes gave."""

from __future__ import annotations

import pytest
import torch

from mllm_unlearn.data.sample import Sample
from mllm_unlearn.methods import get_method
from mllm_unlearn.methods.base import UnlearnContext, distinct_images
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.scoring import encode_images, encode_pairs
from mllm_unlearn.models.tiny import corpus_for, make_tiny_model
from mllm_unlearn.nullspace import trainable_parameters
from mllm_unlearn.nullspace.reference import CAPTURED_ATTR, ReferenceFeatures, image_key
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people

from .conftest import png
from .test_qwen import QSIZES, samples

torch.set_num_threads(1)


def test_store_keeps_exact_values_in_memory_and_in_chunk_files(tmp_path):
    items = [s for s in samples() if s.image is not None]
    feats = torch.randn(len(items), 5, 3)
    small = ReferenceFeatures(memory_mb=1)
    small.put(items, feats)
    assert len(small) == 2 and small.chunk_files == 0 and torch.equal(small.get(items), feats)
    # a zero budget spills every put to its own safetensors chunk, read back memory-mapped, bit for bit
    disk = ReferenceFeatures(memory_mb=0, spill_dir=tmp_path)
    disk.put(items[:1], feats[:1])
    disk.put(items, feats)  # the first image is there already: only the second is written
    assert disk.chunk_files == 2 and len(list(tmp_path.glob("*/chunk-*.safetensors"))) == 2
    assert torch.equal(disk.get(items[::-1]), feats.flip(0)) and disk.missing(items) == []
    more = [s for s in samples() if s.image is None] + [items[0]]
    assert disk.missing(more) == []  # text-only samples have no image to store
    disk.close()
    assert not list(tmp_path.iterdir())
    assert image_key(items[0]) != image_key(items[1])


def test_logits_from_features_equal_logits_from_pixels(setup, tmp_path):
    _, _, data, model = setup
    paths = {"llava": model}
    for arch in ("qwen2_vl", "qwen2_5_vl"):  # 9 image tokens per image, M-RoPE positions
        paths[arch] = make_tiny_model(arch, tmp_path / arch, corpus_for(data, arch), sizes=QSIZES)
    items = samples()
    for arch, path in paths.items():
        lm = load_model(path)
        batch = encode_pairs(lm, items)
        images = [s for s in items if s.image is not None]
        with torch.no_grad():
            feats = lm.arch.image_features(lm.model, {k: v for k, v in batch.inputs.items() if k != "input_ids"})
            from_pixels = lm.arch.answer_logits(lm.model, batch)
            from_feats = lm.arch.answer_logits(lm.model, batch, feats)
        assert feats.shape[0] == len(images)
        for a, b in zip(from_pixels, from_feats):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=arch)
        with pytest.raises(ValueError, match="image tokens in the batch but"):
            lm.arch.answer_logits(lm.model, batch, feats[:1])
        # images encoded one by one and kept per request == the batch encoding, bit for bit
        ctx = UnlearnContext(lm, [], [], batch_size=1, seed=0)
        ctx._pixels(images[1:])
        kept = ctx._pixels(images[::-1] + images)
        batched = encode_images(lm, images[::-1] + images).inputs
        assert all(torch.equal(kept[k], batched[k]) for k in lm.arch.pixel_keys), arch


def test_calibration_pass_fills_the_store_and_matches_its_own_pass(setup, tmp_path):
    _, _, data, model = setup
    forget, retain = split_people(data)
    method = get_method("cvf_ncu")
    cfg = UnlearnConfig(cache_dir=str(tmp_path / "cache"))
    lm = attach_adapters(load_model(model), retain, cfg, method)  # calibrates: captures the retain images
    captured = lm.model.__dict__[CAPTURED_ATTR]
    assert len(captured) == len(distinct_images(retain))
    again = attach_adapters(load_model(model), retain, cfg, method)  # every layer cached: no pass, no store
    assert CAPTURED_ATTR not in again.model.__dict__

    ctx = UnlearnContext(lm, forget, retain, batch_size=4, seed=0)
    ctx.cache_reference(distinct_images(retain) + distinct_images(forget))
    assert ctx.reference is captured and CAPTURED_ATTR not in lm.model.__dict__  # one request took it
    fresh = UnlearnContext(again, forget, retain, batch_size=4, seed=0)
    fresh.cache_reference(distinct_images(retain) + distinct_images(forget))
    images = distinct_images(retain) + distinct_images(forget)
    # captured during calibration == computed in the request's own pass (same batches): same bits
    assert torch.equal(ctx.visual_tokens(images, reference=True), fresh.visual_tokens(images, reference=True))
    # == what the per-step reference pass computes, batch by batch (up to float rounding of batch sizes)
    for i in range(0, len(images), 4):
        per_step = ctx._reference_tokens(images[i : i + 4])
        torch.testing.assert_close(ctx.visual_tokens(images[i : i + 4], reference=True), per_step, rtol=0, atol=1e-6)


def test_a_cvf_step_gives_the_loss_and_gradient_of_the_per_step_passes(setup, tmp_path):
    """One CVF step with the store and the shared retain pass == the same step computed the old way
    (reference model run on each batch, L_GUM re-encoding the images), after B has moved."""
    _, _, data, model = setup
    forget, retain = split_people(data)
    cls = get_method("cvf_ncu")
    lm = attach_adapters(load_model(model), retain, UnlearnConfig(cache_dir=str(tmp_path / "c")), cls)
    with torch.no_grad():  # move B so that the adapted and the reference model differ
        for p in trainable_parameters(lm.model):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)

    def one_step(cache: bool) -> tuple[float, list[torch.Tensor], dict]:
        ctx = UnlearnContext(lm, forget, retain, batch_size=4, seed=0)
        # without the simulated relearning step: its sign() turns last-bit differences between the two
        # paths into different attacked weights (it is checked by formula in test_cvf_options.py)
        method = cls(cls.config_class(relearn_sim=0.0))
        if not cache:  # the old path: no store, and L_GUM without the precomputed features
            ctx.cache_reference = lambda samples: None
            ctx.pairs = lambda samples: None
            ctx.nll = lambda samples, image_features=None, batch=None: UnlearnContext.nll(ctx, samples)
        torch.manual_seed(0)
        method.setup(ctx)
        assert (ctx.reference is not None) == cache
        params = trainable_parameters(lm.model)
        loss, logs = method.loss(ctx, 0)
        grads = torch.autograd.grad(loss, params)
        return loss.item(), grads, logs

    new_loss, new_grads, new_logs = one_step(True)
    old_loss, old_grads, old_logs = one_step(False)
    assert new_loss == pytest.approx(old_loss, rel=1e-6, abs=1e-7)
    for key in ("push", "pull", "ret", "gum"):
        assert new_logs[key] == pytest.approx(old_logs[key], rel=1e-5, abs=1e-7), key
    for g_new, g_old in zip(new_grads, old_grads):
        torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-6)


def test_store_fills_only_missing_images_and_falls_back_without_store(setup, tmp_path):
    _, _, data, model = setup
    forget, retain = split_people(data)
    lm = attach_adapters(
        load_model(model), retain, UnlearnConfig(subspace="random", cache_dir=None), get_method("cvf_ncu")
    )
    ctx = UnlearnContext(lm, forget, retain, batch_size=2, seed=0)
    images = distinct_images(forget)
    without = ctx.visual_tokens(images, reference=True)  # no store: computed
    assert ctx.reference is None
    store = ctx.cache_reference(images)
    assert len(store) == len(images) and store.fill(images, lambda s: 1 / 0) == 0  # nothing recomputed
    assert torch.equal(ctx.visual_tokens(images, reference=True), without)
    extra = [s for s in retain if s.image is not None][:1] + [Sample("x", "x", "qa", "vqa", "?", "a", png((1, 2, 3)))]
    got = ctx.visual_tokens(extra, reference=True)  # images the store lacks are added first
    assert len(store) == len(images) + 2 and got.shape[0] == 2 and not got.requires_grad
