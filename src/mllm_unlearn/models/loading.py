"""Load any supported checkpoint the way Hugging Face users expect: a local path or a hub id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.options import DTYPE_NAMES
from .base import ArchAdapter, get_arch, supported_archs


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (fp32, bf16, fp16)."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    arch: ArchAdapter
    #: how the unlearning driver shaped its adapters (e.g. ``{"rank": 32, "lora_rank": 32}``), for the
    #: run's record; it outlives a merge. None for a model that got none.
    adapters: dict[str, Any] | None = None

    def save_pretrained(self, path: str | Path) -> None:
        """The model (safetensors) and its processor into ``path``, a folder :func:`load_model` reads back."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def looks_local(path_or_id: str | Path) -> bool:
    """True for what can only be a local path: it exists, starts with ``.``, ``/`` or ``~``, or has more
    than one ``/`` (a hub id is ``name`` or ``org/name``)."""
    text = str(path_or_id)
    return (
        isinstance(path_or_id, Path)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or Path(text).expanduser().exists()
    )


def check_model_source(path_or_id: str | Path) -> str:
    """What :func:`load_model` passes to ``from_pretrained``; refuses a bad local folder up front.

    A local path must be a folder holding ``config.json`` whose ``model_type`` is a supported
    architecture. A hub id (``org/name``) is returned unchanged (``from_pretrained`` resolves it).
    Raises FileNotFoundError / NotADirectoryError naming the path, ValueError naming the
    ``model_type`` and the supported architectures."""
    if not looks_local(path_or_id):
        return str(path_or_id)
    folder = Path(path_or_id).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"no such model folder: {path_or_id} (a hub id has the form org/name)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{path_or_id}: not a model folder (a file; expected a folder with config.json)")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder: config.json is missing")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{config}: not a JSON object ({exc})") from None
    try:
        get_arch(str(model_type))
    except ValueError:
        what = "has no model_type" if model_type is None else f"model_type {model_type!r} is not supported"
        raise ValueError(f"{config}: {what}; supported architectures: {', '.join(supported_archs())}") from None
    return str(folder)


def load_model(
    path_or_id: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    image_size: int | None = None,
) -> LoadedModel:
    """Load model and processor with ``from_pretrained``, picking the adapter by ``model_type``.

    A local folder is checked first (:func:`check_model_source`): a missing folder, a missing
    ``config.json`` or an unsupported ``model_type`` is named, before ``transformers`` is asked.
    Weights are read from safetensors only; remote code is never run unless asked for. ``image_size``
    (Qwen2-VL / Qwen2.5-VL) resizes every image to that square, so that images of different sizes
    give the same number of visual tokens (LLaVA's processor always does this).
    """
    from transformers import AutoConfig

    path_or_id = check_model_source(path_or_id)
    config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    arch = get_arch(config.model_type)
    model = arch.model_class().from_pretrained(
        str(path_or_id), dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    extra = {"image_size": image_size} if image_size else {}
    processor = arch.processor_class().from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code, **extra)
    processor.tokenizer.padding_side = "right"
    return LoadedModel(model.to(device), processor, arch)
