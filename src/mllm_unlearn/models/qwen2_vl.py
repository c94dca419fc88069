"""Qwen2-VL (``Qwen2VLForConditionalGeneration``, e.g. ``Qwen/Qwen2-VL-7B-Instruct``) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``, e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``).

Both families share the prompt format (ChatML with ``<|vision_start|><|image_pad|><|vision_end|>``),
the image processor (dynamic resolution: an image becomes ``t*h*w`` flattened patches, merged 2x2 into
``t*h*w / merge_size**2`` LLM tokens) and the module layout of the LLM and of the projector (the
vision tower's ``merger``). They differ in the vision blocks' MLP: Qwen2-VL has ``mlp.fc1/fc2``,
Qwen2.5-VL ``mlp.gate_proj/up_proj/down_proj`` — the LLM's leaf names, so every pattern here is an
anchored full-path regex — and Qwen2.5-VL runs most vision blocks on windows, in a permuted token
order that the merger undoes (its outputs are in image order again).

``Qwen2VLProcessor`` needs a video processor, which needs torchvision; this package has no use for
videos, so :class:`QwenVLProcessor` pairs the checkpoint's tokenizer and ``Qwen2VLImageProcessor``
(the same files a real checkpoint ships) and :meth:`QwenVLAdapter.encode` builds the inputs itself.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.sample import Sample
from .base import ArchAdapter, Batch, Texts, decoder_pattern, pad, register_arch

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"
#: special tokens the prompts use (real checkpoints ship them all)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def image_processor_class() -> type:
    """``Qwen2VLImageProcessor``; its PIL backend where torchvision is missing (same outputs, no warning)."""
    if importlib.util.find_spec("torchvision") is None:
        try:
            from transformers import Qwen2VLImageProcessorPil

            return Qwen2VLImageProcessorPil
        except ImportError:  # older transformers: the class itself falls back or works
            pass
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor


class QwenVLProcessor:
    """Tokenizer + ``Qwen2VLImageProcessor`` of a Qwen2-VL / Qwen2.5-VL checkpoint (no video processor).

    Loads and saves the files ``Qwen2VLProcessor`` uses for text and images (tokenizer files with
    the chat template, ``preprocessor_config.json``), so a folder it writes is a normal checkpoint.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, image_size: int | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        #: resize every image to this square first (None: Qwen's native, size-dependent resolution).
        #: Token-level CVF and the calibration batches need every image to give the same token grid.
        self.image_size = image_size

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, image_size: int | None = None, **kwargs: Any) -> QwenVLProcessor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
        kwargs.pop("trust_remote_code", None)
        image_processor = image_processor_class().from_pretrained(str(path_or_id), **kwargs)
        return cls(image_processor, tokenizer, image_size)

    def save_pretrained(self, out_dir: str | Path, **kwargs: Any) -> list[str]:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        files = list(self.tokenizer.save_pretrained(str(out_dir), **kwargs))
        files += list(self.image_processor.save_pretrained(str(out_dir), **kwargs) or [])
        return files

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def _token_id(tok: Any, token: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    if i is None or i == tok.unk_token_id or tok.convert_ids_to_tokens(i) != token:
        raise ValueError(f"the tokenizer has no special token {token!r}: not a Qwen2-VL / Qwen2.5-VL tokenizer")
    return i


class QwenVLAdapter(ArchAdapter):
    """Shared by Qwen2-VL and Qwen2.5-VL; subclasses set the names, the model class and the vision MLP."""

    #: leaf names of the vision blocks' MLP
    vision_mlp: tuple[str, ...] = ()
    vision_blocks_pattern = r"model\.visual\.blocks\.\d+"
    projector_pattern = r"model\.visual\.merger\.mlp\.[02]"
    llm_pattern = decoder_pattern(r"model\.language_model")
    ivr_levels = ("projector", "vision")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.vision_mlp:
            cls.vision_pattern = (
                r"model\.visual\.blocks\.\d+\."
                rf"(?:attn\.(?:qkv|proj)|mlp\.(?:{'|'.join(cls.vision_mlp)}))"
            )

    def processor_class(self) -> type:
        return QwenVLProcessor

    # -- prompts -------------------------------------------------------------------------------
    def prompt(self, body: str, has_image: bool) -> str:
        # Qwen's ChatML turn (without the default system turn), the image before the text.
        vision = f"{VISION_START}{IMAGE_PAD}{VISION_END}" if has_image else ""
        return f"{IM_START}user\n{vision}{body}{IM_END}\n{IM_START}assistant\n"

    answer_prefix = ""  # the answer follows "assistant\n" directly

    def eos_token_id(self, tokenizer: Any) -> int:
        """The token closing an answer (labels end with it): ``<|im_end|>``, the end of an assistant turn."""
        return _token_id(tokenizer, IM_END)

    # -- batches -------------------------------------------------------------------------------
    def encode(
        self, processor, samples: Sequence[Sample], bodies: Texts, answers: Texts | None = None, *, padding_side="right"
    ) -> Batch:
        """Prompts (and answers + ``<|im_end|>``) as ids, each ``<|image_pad|>`` expanded to the image's
        number of merged tokens; ``mm_token_type_ids`` is 1 on image tokens (M-RoPE needs it)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        if len(bodies) != len(samples) or (answers is not None and len(answers) != len(samples)):
            raise ValueError("samples, bodies and answers must have the same length")
        tok = processor.tokenizer
        image_id, eos_id = _token_id(tok, IMAGE_PAD), self.eos_token_id(tok)
        prompts = [self.prompt(b, s.image is not None) for s, b in zip(samples, bodies)]
        ids = [list(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
        for s, row in zip(samples, ids):
            expected = int(s.image is not None)
            if row.count(image_id) != expected:
                raise ValueError(
                    f"sample {s.id}: its prompt holds {row.count(image_id)} {IMAGE_PAD} tokens, "
                    f"expected {expected} (does the question text contain {IMAGE_PAD}?)"
                )
        images = [s.image.load() for s in samples if s.image is not None]
        side = getattr(processor, "image_size", None)
        if side:
            images = [img.resize((side, side)) for img in images]
        pixel = {}
        if images:
            ip = processor.image_processor
            enc = ip(images=images, return_tensors="pt")
            pixel = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
            counts = iter((enc["image_grid_thw"].prod(-1) // ip.merge_size**2).tolist())
            ids = [[t for i in row for t in ([image_id] * next(counts) if i == image_id else [i])] for row in ids]
        labels = None
        if answers is not None:
            ans = tok([self.answer_prefix + a.strip() for a in answers], add_special_tokens=False)["input_ids"]
            labels = [[-100] * len(p) + list(a) + [eos_id] for p, a in zip(ids, ans)]
            ids = [p + list(a) + [eos_id] for p, a in zip(ids, ans)]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
        inputs = {
            "input_ids": pad(ids, pad_id, padding_side),
            "attention_mask": pad([[1] * len(x) for x in ids], 0, padding_side),
            "mm_token_type_ids": pad([[int(i == image_id) for i in x] for x in ids], 0, padding_side),
            **pixel,
        }
        return Batch(inputs, None if labels is None else pad(labels, -100, padding_side), samples)

    #: M-RoPE positions are computed from the ids, the image grids and the image-token mask
    #: (``Qwen2VLModel.compute_3d_position_ids``); the backbone accepts ids next to ``inputs_embeds``
    keep_with_embeds = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
    pixel_keys = ("pixel_values", "image_grid_thw")

    # -- visual representations ---------------------------------------------------------------
    @staticmethod
    def _image_inputs(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.get("pixel_values") is None or inputs.get("image_grid_thw") is None:
            raise ValueError("these inputs hold no images (no pixel_values / image_grid_thw)")
        return inputs["pixel_values"], inputs["image_grid_thw"]

    @staticmethod
    def _stack(per_image: Sequence[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        lengths = sorted({int(x.shape[0]) for x in per_image})
        if len(lengths) > 1:
            raise ValueError(
                f"images of different sizes in one batch give different numbers of visual tokens {lengths} "
                f"(patch grids t,h,w: {grid.tolist()}); per-image features stack only for equal sizes: load the "
                "model with image_size=N (CLI: --image-size N) to resize every image to one square"
            )
        return torch.stack(list(per_image))

    def image_features(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-image merger outputs (the LLM's visual input tokens), shape (images, tokens, d)."""
        pixel_values, grid = self._image_inputs(inputs)
        out = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
        return self._stack(out.pooler_output, grid)

    def _vision_order(self, model: Any, grid: torch.Tensor) -> torch.Tensor | None:
        """Index putting the vision blocks' output tokens back in image order (None: already so)."""
        return None

    def visual_tokens(self, model: Any, inputs: dict[str, torch.Tensor], level: str = "projector") -> torch.Tensor:
        """``projector``: :meth:`image_features`; ``vision``: the last vision block's patch tokens, per
        image, in the processor's patch order (groups of ``merge_size**2`` the merger concatenates)."""
        if level != "vision":
            return super().visual_tokens(model, inputs, level)
        pixel_values, grid = self._image_inputs(inputs)
        hidden = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid).last_hidden_state
        order = self._vision_order(model, grid)
        if order is not None:
            unit = model.config.vision_config.spatial_merge_size**2
            hidden = hidden.reshape(-1, unit, hidden.shape[-1])[order.to(hidden.device)].reshape(hidden.shape)
        return self._stack(torch.split(hidden, grid.prod(-1).tolist()), grid)


class Qwen2VLAdapter(QwenVLAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    vision_mlp = ("fc1", "fc2")

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration


class Qwen25VLAdapter(QwenVLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    vision_mlp = ("gate_proj", "up_proj", "down_proj")

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def _vision_order(self, model: Any, grid: torch.Tensor) -> torch.Tensor | None:
        # the blocks run on merge units permuted into attention windows; the merger's output is
        # un-permuted with argsort(window_index), and so are the patch tokens here
        from transformers.vision_utils import get_vision_window_index

        vc = model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size, patch_size=vc.patch_size
        )
        return torch.argsort(window_index)


QWEN2_VL = register_arch(Qwen2VLAdapter())
QWEN2_5_VL = register_arch(Qwen25VLAdapter())
