"""The tiny model zoo: real transformers classes with small configs and random weights.

No weights can be downloaded here, so tests and the demo build a real ``LlavaForConditionalGeneration``
from configs, with a byte-level BPE tokenizer trained offline on the world's text and a processor with
a chat template, saved with ``save_pretrained`` and loaded back through the very ``from_pretrained``
path that ``llava-hf/llava-1.5-7b-hf`` takes (:func:`mllm_unlearn.models.load_model`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="right")


def build_tiny_llava(corpus: Iterable[str], sizes: TinySizes = TinySizes(), seed: int = 0):
    """(model, processor) for a tiny random ``LlavaForConditionalGeneration``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_tokenizer(corpus, sizes.vocab_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes.text_hidden,
                       intermediate_size=sizes.text_intermediate, num_hidden_layers=sizes.text_layers,
                       num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_heads,
                       max_position_embeddings=sizes.max_positions, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                              num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                              image_size=sizes.image_size, patch_size=sizes.patch_size,
                              projection_dim=sizes.vision_hidden)
    # vision_feature_layer=-1: unlike LLaVA-1.5 (-2), every CLIP layer feeds the LLM.
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": sizes.image_size},
                                         crop_size={"height": sizes.image_size, "width": sizes.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


_BUILDERS = {"llava": build_tiny_llava}


def make_tiny_model(arch: str, out_dir: str | Path, corpus: Iterable[str], *, sizes: TinySizes = TinySizes(),
                    seed: int = 0) -> Path:
    """Build a tiny model of ``arch`` and save it (safetensors) to ``out_dir``, atomically."""
    get_arch(arch)  # unknown names fail with the list of supported architectures
    if arch not in _BUILDERS:
        raise ValueError(f"no tiny model for architecture {arch!r}; tiny models exist for: {sorted(_BUILDERS)}")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new --out")
    model, processor = _BUILDERS[arch](corpus, sizes, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "tiny_sizes.json").write_text(__import__("json").dumps(asdict(sizes), indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def corpus_for(data, arch: str = "llava") -> list[str]:
    """Every text the model will see for a benchmark, as full prompts, to train the tokenizer on."""
    from ..data.prompts import format_cloze, format_mcq

    adapter = get_arch(arch)
    texts = []
    for s in list(data.train) + [s for items in data.splits.values() for s in items]:
        body = {"mcq": lambda: format_mcq(s.question, s.options), "cloze": lambda: format_cloze(s.question)}.get(
            s.task, lambda: s.question)()
        texts.append(adapter.prompt(body, s.image is not None) + " " + s.answer)
    return texts
