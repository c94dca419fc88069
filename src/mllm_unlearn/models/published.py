"""Published model configurations (written into the repository, never downloaded) and models built
from them on the meta device: full-size shapes, no memory, no weights — for cost projections.

The JSON files live in ``configs/models/`` of a source checkout (``CONFIG_DIR``); each is the
``config.json`` a checkpoint publishes on the Hugging Face hub, with a ``_source`` note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import get_arch

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
