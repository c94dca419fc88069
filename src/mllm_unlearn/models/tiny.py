"""The tiny model zoo: real transformers classes with small configs and random weights.

No weights can be downloaded here, so tests and the demo build a real ``LlavaForConditionalGeneration``
from configs, with a byte-level BPE tokenizer trained offline on the world's text and a processor with
a chat template, saved with ``save_pretrained`` and loaded back through the very ``from_pretrained``
path that ``llava-hf/llava-1.5-7b-hf`` takes (:func:`mllm_unlearn.models.load_model`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..runtime.outputs import atomic_dir, refuse_existing
from .base import get_arch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]

# Renders exactly what LlavaAdapter.prompt() builds, so chat-template users get the same prompt.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class TinySizes:
    """Sizes of the tiny model. Defaults: 2-layer CLIP at 32x32 px (patch 8: 16 image tokens),
    2-layer Llama with d=128 — big enough to memorise ~70 synthetic people in a few minutes on a CPU."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 512
    vocab_size: int = 2000
    max_positions: int = 512


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained offline on ``corpus`` (covers any text: no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def _text_sizes(sizes: TinySizes, tokenizer) -> dict:
    """The decoder's size keywords, shared by every family's text config."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads,
        max_position_embeddings=sizes.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(corpus: Iterable[str], sizes: TinySizes = TinySizes(), seed: int = 0):
    """(model, processor) for a tiny random ``LlavaForConditionalGeneration``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = train_tokenizer(corpus, sizes.vocab_size)
    text = LlamaConfig(
        **_text_sizes(sizes, tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden,
    )
    # vision_feature_layer=-1: unlike LLaVA-1.5 (-2), every CLIP layer feeds the LLM.
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, llava_processor(tokenizer, sizes.image_size, sizes.patch_size)


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """LLaVA-1.5's processor around ``tokenizer``: CLIP preprocessing to ``image_size`` px squares,
    ``(image_size / patch_size)²`` image tokens (the CLS token dropped), our chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def train_qwen_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with Qwen's special tokens (ChatML and vision markers): ``<|im_end|>``
    is the EOS (the end of an assistant turn), ``<|endoftext|>`` the pad, no BOS — as in Qwen2-VL-Instruct.
    The special tokens are cut out of the training text so that no merges are spent on them."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .qwen2_vl import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD
    from .qwen2_vl import SPECIAL_TOKENS as QWEN_SPECIAL

    specials = re.compile("|".join(map(re.escape, QWEN_SPECIAL)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((specials.sub("", text) for text in corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        padding_side="right",
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# Renders exactly what QwenVLAdapter.prompt() builds (Qwen's ChatML, items in the order given, no
# default system turn), so chat-template users get the same prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of the rotary half-dimension into (temporal, height, width), Qwen's 1/4, 3/8, 3/8
    ([16, 24, 24] for head_dim 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _build_tiny_qwen(arch: str, corpus: Iterable[str], sizes: TinySizes, seed: int):
    from .qwen2_vl import IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

    merge = 2
    if sizes.image_size % (sizes.patch_size * merge):
        raise ValueError(
            f"image_size={sizes.image_size} must be a multiple of patch_size * merge size = "
            f"{sizes.patch_size * merge} for a tiny {arch}"
        )
    if sizes.text_hidden % sizes.text_heads or (sizes.text_hidden // sizes.text_heads) % 2:
        raise ValueError(
            f"text_hidden / text_heads must be an even whole number for M-RoPE, got "
            f"{sizes.text_hidden} / {sizes.text_heads}"
        )
    tokenizer = train_qwen_tokenizer(corpus, sizes.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)}
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    text = dict(
        **_text_sizes(sizes, tokenizer),
        rope_parameters={**rope, "mrope_section": _mrope_section(sizes.text_hidden // sizes.text_heads)},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=ids[IM_END],
    )
    common = dict(
        depth=sizes.vision_layers,
        num_heads=sizes.vision_heads,
        patch_size=sizes.patch_size,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        in_channels=3,
    )
    token_ids = dict(
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig
        from transformers import Qwen2VLForConditionalGeneration as model_class

        vision = dict(embed_dim=sizes.vision_hidden, hidden_size=sizes.text_hidden, mlp_ratio=4, **common)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
    else:
        from transformers import Qwen2_5_VLConfig
        from transformers import Qwen2_5_VLForConditionalGeneration as model_class

        # windows of 2x2 merged tokens (Qwen2.5-VL: 112 px = 4x4 at patch 14), full attention in the last block
        vision = dict(
            hidden_size=sizes.vision_hidden,
            intermediate_size=4 * sizes.vision_hidden,
            out_hidden_size=sizes.text_hidden,
            window_size=2 * merge * sizes.patch_size,
            fullatt_block_indexes=[sizes.vision_layers - 1],
            **common,
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ids[IM_END]
    return model, qwen_processor(tokenizer, sizes.image_size, sizes.patch_size, merge)


def qwen_processor(tokenizer, image_size: int, patch_size: int, merge: int = 2):
    """Qwen2-VL's processor around ``tokenizer`` with min = max pixels = ``image_size``², so that a
    square image becomes ``image_size`` px square: ``(image_size / patch_size / merge)²`` LLM tokens."""
    from .qwen2_vl import QwenVLProcessor, image_processor_class

    pixels = image_size**2
    image_processor = image_processor_class()(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch_size,
        merge_size=merge,
        temporal_patch_size=2,
    )
    return QwenVLProcessor(image_processor, tokenizer)


def build_tiny_qwen2_vl(corpus: Iterable[str], sizes: TinySizes = TinySizes(), seed: int = 0):
    """(model, processor) for a tiny random ``Qwen2VLForConditionalGeneration``: ``sizes.image_size``
    px square images in ``sizes.patch_size`` patches, merged 2x2 ((image_size / patch_size / 2)² LLM tokens)."""
    return _build_tiny_qwen("qwen2_vl", corpus, sizes, seed)


def build_tiny_qwen2_5_vl(corpus: Iterable[str], sizes: TinySizes = TinySizes(), seed: int = 0):
    """(model, processor) for a tiny random ``Qwen2_5_VLForConditionalGeneration`` (as
    :func:`build_tiny_qwen2_vl`; window attention over 2x2 merged tokens except in the last block)."""
    return _build_tiny_qwen("qwen2_5_vl", corpus, sizes, seed)


_BUILDERS = {"llava": build_tiny_llava, "qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl}


def make_tiny_model(
    arch: str, out_dir: str | Path, corpus: Iterable[str], *, sizes: TinySizes = TinySizes(), seed: int = 0
) -> Path:
    """Build a tiny model of ``arch`` and save it (safetensors) to ``out_dir``, atomically."""
    get_arch(arch)  # unknown names fail with the list of supported architectures
    if arch not in _BUILDERS:
        raise ValueError(f"no tiny model for architecture {arch!r}; tiny models exist for: {sorted(_BUILDERS)}")
    out = refuse_existing(out_dir)
    model, processor = _BUILDERS[arch](corpus, sizes, seed)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "tiny_sizes.json").write_text(json.dumps(asdict(sizes), indent=2))
    return out


def corpus_for(data, arch: str = "llava") -> list[str]:
    """Every text the model will see for a benchmark, as full prompts, to train the tokenizer on."""
    from ..data.prompts import format_cloze, format_mcq

    adapter = get_arch(arch)
    texts = []
    for s in list(data.train) + [s for items in data.splits.values() for s in items]:
        if s.task == "mcq":
            body = format_mcq(s.question, s.options)
        else:
            body = format_cloze(s.question) if s.task == "cloze" else s.question
        texts.append(adapter.prompt(body, s.image is not None) + adapter.answer_prefix + s.answer)
    return texts
