"""Load any supported checkpoint the way Hugging Face users expect: a local path or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base import ArchAdapter, get_arch


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    arch: ArchAdapter


def load_model(path_or_id: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, trust_remote_code: bool = False,
               image_size: int | None = None) -> LoadedModel:
    """Load model and processor with ``from_pretrained``, picking the adapter by ``model_type``.

    Weights are read from safetensors only; remote code is never run unless asked for. ``image_size``
    (Qwen2-VL / Qwen2.5-VL) resizes every image to that square, so that images of different sizes
    give the same number of visual tokens (LLaVA's processor always does this).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    arch = get_arch(config.model_type)
    model = arch.model_class().from_pretrained(
        str(path_or_id), dtype=dtype or torch.float32, use_safetensors=True,
        trust_remote_code=trust_remote_code)
    extra = {"image_size": image_size} if image_size else {}
    processor = arch.processor_class().from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code,
                                                       **extra)
    processor.tokenizer.padding_side = "right"
    return LoadedModel(model.to(device), processor, arch)
