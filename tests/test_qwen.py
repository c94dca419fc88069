"""Qwen2-VL and Qwen2.5-VL: tiny random models through the same paths as LLaVA, CVF-NCU end to end."""

from __future__ import annotations

import io
import re

import pytest
import torch
from PIL import Image

from mllm_unlearn.data.mllmu import read_mllmu
from mllm_unlearn.data.sample import ImageRef, Sample
from mllm_unlearn.data.world import WorldConfig, make_world
from mllm_unlearn.evaluate.harness import EvalConfig, generate, score_items
from mllm_unlearn.methods import get_method
from mllm_unlearn.models import get_arch, load_model
from mllm_unlearn.models.qwen2_vl import IM_END, IMAGE_PAD, QwenVLProcessor
from mllm_unlearn.models.tiny import TinySizes, corpus_for, make_tiny_model
from mllm_unlearn.nullspace import lora_A_weights, target_linears
from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people, stranger_samples, unlearn

from .conftest import png

torch.set_num_threads(1)

ARCHS = ["qwen2_vl", "qwen2_5_vl"]
#: 48 px images in 8 px patches: a 6x6 patch grid, merged 2x2 into 3x3 = 9 LLM tokens per image (and, for
#: Qwen2.5-VL, 2x2-token attention windows that really permute the tokens)
QSIZES = TinySizes(image_size=48, patch_size=8, vision_hidden=32, text_hidden=64, text_intermediate=128, vocab_size=400)
TOKENS, PATCHES = 9, 36


@pytest.fixture(scope="module")
def qworld(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    world = make_world(root / "world", WorldConfig(n_people=10, n_real=4, train_photos=2, seed=3))
    return root, read_mllmu(world, forget="forget_10")


@pytest.fixture(scope="module", params=ARCHS)
def qmodel(request, qworld):
    """(arch, tiny model dir, BenchmarkData): an untrained tiny Qwen model whose tokenizer knows the world."""
    root, data = qworld
    arch = request.param
    return arch, make_tiny_model(arch, root / arch, corpus_for(data, arch), sizes=QSIZES), data


def samples() -> list[Sample]:
    return [
        Sample("v1", "1", "qa", "vqa", "What is this person's job?", "baker", png((200, 30, 30))),
        Sample("q1", "1", "qa", "qa", "What is the job of Ann Lee?", "pilot of planes"),
        Sample("v2", "2", "qa", "vqa", "Who is this?", "Bob", png((30, 200, 30))),
    ]


def test_loads_encodes_and_trains_on_answers_only(qmodel):
    arch, path, _ = qmodel
    lm = load_model(path)
    assert lm.arch is get_arch(arch) and lm.model.config.model_type == arch
    assert isinstance(lm.processor, QwenVLProcessor)
    tok = lm.processor.tokenizer
    image_id, eos_id = tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(IM_END)
    assert lm.model.config.image_token_id == image_id and lm.model.generation_config.eos_token_id == eos_id

    items = samples()
    batch = lm.arch.encode(lm.processor, items, [s.question for s in items], [s.answer for s in items])
    ids, mask, labels = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.labels
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 6]]
    assert tuple(batch.inputs["pixel_values"].shape) == (2 * PATCHES, 3 * 2 * 8 * 8)
    assert (ids == image_id).sum(1).tolist() == [TOKENS, 0, TOKENS]  # one <|image_pad|> -> 9 merged tokens
    assert torch.equal(batch.inputs["mm_token_type_ids"], (ids == image_id).long())
    for row, s in enumerate(items):  # labels: the answer and <|im_end|>, nothing of the prompt or padding
        kept = labels[row][labels[row] != -100]
        assert kept[-1] == eos_id and tok.decode(kept[:-1]) == s.answer
        n = int(mask[row].sum())
        assert torch.equal(ids[row, n - len(kept) : n], kept) and mask[row, :n].all() and not mask[row, n:].any()
        prompt = tok.decode(ids[row, : n - len(kept)])
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith(
            f"{s.question}<|im_end|>\n<|im_start|>assistant\n"
        )

    loss = lm.model(**batch.inputs, labels=labels).loss
    assert torch.isfinite(loss) and loss > 0
    logits, targets, rows = lm.arch.answer_logits(lm.model, batch)
    n_answer = int((labels != -100).sum())
    assert logits.shape == (n_answer, len(tok)) and targets.shape == rows.shape == (n_answer,)
    assert rows.tolist() == sorted(rows.tolist()) and set(rows.tolist()) == {0, 1, 2}
    # the answer logits are the full forward's logits at the same positions
    full = lm.model(**batch.inputs).logits[:, :-1][labels[:, 1:] != -100]
    assert torch.allclose(logits, full, atol=1e-5)

    left = lm.arch.encode(lm.processor, items, [s.question for s in items], padding_side="left")
    assert left.labels is None and left.inputs["attention_mask"][:, -1].all()
    assert not left.inputs["attention_mask"][:, 0].all()


def test_chat_template_renders_the_adapter_prompt(qmodel):
    arch, path, _ = qmodel
    lm = load_model(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    text = lm.processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == lm.arch.prompt("Who is this?", True)


def test_image_features_and_vision_tokens(qmodel):
    arch, path, _ = qmodel
    lm = load_model(path)
    items = [s for s in samples() if s.image is not None]
    inputs = lm.arch.encode(lm.processor, items, [""] * len(items)).inputs
    with torch.no_grad():
        feats = lm.arch.image_features(lm.model, inputs)
        assert feats.shape == (2, TOKENS, QSIZES.text_hidden)
        assert torch.equal(lm.arch.visual_tokens(lm.model, inputs), feats)
        # the LLM sees exactly these features at its image tokens
        embeds = lm.model.model(**inputs, output_hidden_states=True).hidden_states[0]
        assert torch.allclose(embeds[inputs["input_ids"] == lm.model.config.image_token_id], feats.flatten(0, 1))
        vision = lm.arch.visual_tokens(lm.model, inputs, "vision")
        assert vision.shape == (2, PATCHES, QSIZES.vision_hidden)
        # patch tokens in the order the merger concatenates them: merging them gives the features back
        merged = lm.model.model.visual.merger(vision.flatten(0, 1)).reshape(feats.shape)
        assert torch.allclose(merged, feats, atol=1e-5)
    if arch == "qwen2_5_vl":  # the window order really differs from the image order here
        order = lm.arch._vision_order(lm.model, inputs["image_grid_thw"])
        assert not torch.equal(order, torch.arange(len(order)))

    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (90, 90, 90)).save(buf, format="PNG")
    wide = Sample("w", "3", "qa", "vqa", "Who?", "x", ImageRef(buf.getvalue(), "a wide test image"))
    mixed = lm.arch.encode(lm.processor, [items[0], wide], ["", ""]).inputs
    with pytest.raises(ValueError, match="images of different sizes"):
        lm.arch.image_features(lm.model, mixed)
    with pytest.raises(ValueError, match="no images"):
        lm.arch.image_features(lm.model, lm.arch.encode(lm.processor, samples()[1:2], [""]).inputs)


@torch.no_grad()
def test_generation_left_padded_matches_single_samples(qmodel):
    arch, path, _ = qmodel
    lm = load_model(path)
    items = samples()
    replies = generate(lm, items, [s.question for s in items], max_new_tokens=4)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)

    def step_logits(batch_items):  # logits of 3 greedy steps (M-RoPE positions under left padding)
        batch = lm.arch.encode(lm.processor, batch_items, [s.question for s in batch_items], padding_side="left")
        out = lm.model.generate(
            **batch.inputs,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=lm.processor.tokenizer.pad_token_id,
        )
        return torch.stack(out.logits, 1)

    together = step_logits(items)
    for i, s in enumerate(items):
        assert torch.allclose(together[i], step_logits([s])[0], atol=1e-4), s.id


def test_patterns_hit_the_vision_tower_and_merger_only(qmodel):
    arch, path, _ = qmodel
    lm = load_model(path)
    adapter = lm.arch
    linears = {n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = {n for n in linears if n.startswith("model.visual.blocks.")}
    llm = {n for n in linears if n.startswith("model.language_model.")}
    assert set(target_linears(lm.model, adapter.vision_pattern)) == blocks
    assert len(blocks) == QSIZES.vision_layers * (4 if arch == "qwen2_vl" else 5)  # qkv, proj + the MLP
    assert set(target_linears(lm.model, adapter.projector_pattern)) == {
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    }
    assert set(target_linears(lm.model, adapter.scope_pattern("visual"))) == blocks | {
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    }
    assert set(target_linears(lm.model, adapter.llm_pattern)) == llm
    # Qwen2.5-VL's vision MLP shares the LLM's leaf names: neither family's visual regex reaches the LLM
    for other in ARCHS:
        visual = get_arch(other).scope_pattern("visual")
        assert not [n for n in llm | {"lm_head"} if re.fullmatch(visual, n)]
    assert not [n for n in llm if re.fullmatch(adapter.scope_pattern("projector"), n)]
    assert set(target_linears(lm.model, adapter.scope_pattern("all"))) == blocks | llm | {
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    }


def text_logits(lm, items):
    batch = lm.arch.encode(lm.processor, items, [s.question for s in items])
    with torch.no_grad():
        return lm.model(**batch.inputs).logits


def test_cvf_ncu_end_to_end_keeps_text_bit_identical_and_A_frozen(qmodel, tmp_path):
    arch, path, data = qmodel
    cfg = UnlearnConfig(steps=3, batch_size=2, warmup=1, cache_dir=str(tmp_path / "cache"))
    lm = load_model(path)
    text = [s for s in data.splits["forget"] + data.splits["retain"] if s.image is None][:6]
    vqa = [s for s in data.splits["forget"] if s.image is not None][:3]
    before_text, before_img = text_logits(lm, text), text_logits(lm, vqa)

    # A as calibrated on the retain set and the strangers (the same config on a fresh copy; covariances cached)
    forget, retain = split_people(data)
    strangers = stranger_samples(data, {s.person for s in forget})
    expected_A = lora_A_weights(attach_adapters(load_model(path), retain, cfg, get_method("cvf_ncu"), strangers).model)
    assert expected_A and all(k.startswith("model.visual.") for k in expected_A)
    adapted, history = unlearn(lm, data, cfg)
    assert history[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)

    after_A = lora_A_weights(adapted.model)
    assert after_A.keys() == expected_A.keys() and all(torch.equal(after_A[k], expected_A[k]) for k in after_A)
    assert all(not p.requires_grad for n, p in adapted.model.named_parameters() if "lora_A" in n)
    assert any(p.abs().sum() > 0 for n, p in adapted.model.named_parameters() if "lora_B" in n)
    assert torch.equal(text_logits(adapted, text), before_text)  # LLM frozen: text answers cannot move
    assert not torch.allclose(text_logits(adapted, vqa), before_img)  # the visual module did move
    with adapted.model.disable_adapter():
        assert torch.equal(text_logits(adapted, vqa), before_img)

    # evaluation through the harness: a few forget items of every task and modality
    picked = [
        s
        for key in sorted({(s.task, s.modality) for s in data.splits["forget"]})
        for s in [s for s in data.splits["forget"] if (s.task, s.modality) == key][:2]
    ]
    results = score_items(adapted, "forget", picked, EvalConfig(mcq_mode="both", max_new_tokens=6, batch_size=4))
    assert {r.modality for r in results} == {"vqa", "qa"} and all(0 <= r.score <= 1 for r in results)
    assert {r.metric for r in results} >= {"letter", "lik"}


def test_cvf_options_on_patch_inputs_view_pool_and_mid_push_run_views_is_refused(qmodel, tmp_path):
    """Qwen's image inputs are patches: ``views`` (which augments (B, C, H, W) pixels) is refused before
    training and names ``view_pool``; ``view_pool`` (copies made from the photos) and ``mid_push`` (a hook
    on the middle vision block) train."""
    from mllm_unlearn.methods.cvf_ncu import CVFConfig

    arch, path, data = qmodel
    lm = load_model(path)
    assert len(lm.arch.vision_blocks(lm.model)) == QSIZES.vision_layers
    cfg = UnlearnConfig(steps=2, batch_size=2, warmup=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="use view_pool"):
        unlearn(lm, data, cfg, CVFConfig(views=1))
    _, history = unlearn(load_model(path), data, cfg, CVFConfig(view_pool=1, mid_push=1.0, relearn_sim=0.0))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert [h for h in history if "mid_push" in h] and all(h["mid_push"] > 0 for h in history if "mid_push" in h)


def test_distillation_batches_patch_inputs_and_keeps_text_bit_identical(qmodel, tmp_path):
    """Noise-and-distil (``distill_steps``) on Qwen's patch inputs: one image's patch rows and grid row per
    block, concatenated per step; the student learns the teacher's tokens back and the LLM is untouched."""
    arch, path, data = qmodel
    lm = load_model(path)
    text = [s for s in data.splits["forget"] + data.splits["retain"] if s.image is None][:6]
    before = text_logits(lm, text)
    cfg = UnlearnConfig(steps=2, batch_size=2, warmup=1, cache_dir=str(tmp_path / "cache"), distill_steps=60)
    distilled, history = unlearn(lm, data, cfg)
    losses = [h["distill_loss"] for h in history if "distill_step" in h]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]  # rows at steps 0, 50 and 59
    assert torch.equal(text_logits(distilled, text), before)


def test_images_of_different_sizes_need_and_get_one_square_size(qmodel):
    arch, path, _ = qmodel
    buf = io.BytesIO()  # a wide photo: Qwen keeps aspect ratios, so its token grid differs from a square's
    Image.new("RGB", (3 * QSIZES.image_size, QSIZES.image_size), (30, 30, 200)).save(buf, format="PNG")
    wide = ImageRef(buf.getvalue(), "wide test image")
    items = [samples()[0], Sample("v3", "3", "qa", "vqa", "Who is this?", "Cy", wide)]
    lm = load_model(path)
    inputs = lm.arch.encode(lm.processor, items, [""] * 2).inputs
    with torch.no_grad(), pytest.raises(ValueError, match="--image-size"):
        lm.arch.image_features(lm.model, inputs)
    fixed = load_model(path, image_size=QSIZES.image_size)
    inputs = fixed.arch.encode(fixed.processor, items, [""] * 2).inputs
    with torch.no_grad():
        assert fixed.arch.image_features(fixed.model, inputs).shape == (2, TOKENS, QSIZES.text_hidden)
