"""Published model configurations (written into the repository, never downloaded) and models built
from them on the meta device: full-size shapes, no memory, no weights — for cost projections.

The JSON files live in ``configs/models/`` of a source checkout (``CONFIG_DIR``); each is the
``config.json`` a checkpoint publishes on the Hugging Face hub, with a ``_source`` note.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .base import get_arch
from .loading import LoadedModel

#: the repository's folder of published configurations (source checkouts)
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "models"
#: short name -> file in CONFIG_DIR
PUBLISHED = {"llava-1.5-7b": "llava-1.5-7b.json", "qwen2-vl-7b": "qwen2-vl-7b-instruct.json"}


def published_config(name_or_path: str | Path) -> Any:
    """The transformers config of a published model: a name of :data:`PUBLISHED` or a JSON file."""
    from transformers import AutoConfig

    path = Path(CONFIG_DIR / PUBLISHED[name_or_path]) if name_or_path in PUBLISHED else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no published config {name_or_path!r} (known: {sorted(PUBLISHED)}; looked for {path})")
    d = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build_on_meta(config: Any, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The model class of ``config``'s architecture, instantiated on the meta device in ``dtype``."""
    model_class = get_arch(config.model_type).model_class()
    with torch.device("meta"):
        model = model_class(config)
    return model.to(dtype)


def build_random(
    name_or_path: str | Path,
    corpus: Iterable[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    image_size: int | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> LoadedModel:
    """A published architecture at its published size with **random weights** on ``device``: what a GPU
    cost measurement needs when no checkpoint can be downloaded (the step's cost depends on the shapes,
    not on what the weights know).

    The tokenizer is the tiny zoo's, trained on ``corpus`` (the world's text; its ids index the first
    rows of the published vocabulary, whose size is kept), with the published image processing: LLaVA-1.5
    at the vision config's 336 px (576 image tokens), Qwen2-VL at ``image_size`` px squares (default
    448: 1024 patches, 256 LLM tokens; every image resized so one batch has one token grid).
    ``overrides`` ({"text_config": {...}, "vision_config": {...}, "": {...}}) shrinks the config for tests.
    """
    from .tiny import IMAGE_TOKEN, llava_processor, qwen_processor, train_qwen_tokenizer, train_tokenizer

    config = published_config(name_or_path)
    for part, values in (overrides or {}).items():
        target = getattr(config, part) if part else config
        for key, value in values.items():
            setattr(target, key, value)
    arch = get_arch(config.model_type)
    text, vision = config.text_config, config.vision_config
    if config.model_type == "llava":
        tokenizer = train_tokenizer(corpus, 2000)
        config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        eos = tokenizer.eos_token_id
        processor = llava_processor(tokenizer, vision.image_size, vision.patch_size)
    else:
        from .qwen2_vl import IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

        tokenizer = train_qwen_tokenizer(corpus, 2000)
        ids = tokenizer.convert_tokens_to_ids
        config.image_token_id, config.video_token_id = ids(IMAGE_PAD), ids(VIDEO_PAD)
        config.vision_start_token_id, config.vision_end_token_id = ids(VISION_START), ids(VISION_END)
        eos = text.eos_token_id = ids(IM_END)
        text.bos_token_id = tokenizer.pad_token_id
        processor = qwen_processor(tokenizer, image_size or 448, vision.patch_size, vision.spatial_merge_size)
    text.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"the world's tokenizer has {len(tokenizer)} tokens, the vocabulary only {text.vocab_size}")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of 7 B weights
    try:
        with torch.device(device):
            model = arch.model_class()(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_token_id, eos
    processor.tokenizer.padding_side = "right"
    return LoadedModel(model.to(dtype), processor, arch)
