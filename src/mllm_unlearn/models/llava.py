"""LLaVA-1.5 (``LlavaForConditionalGeneration``, e.g. ``llava-hf/llava-1.5-7b-hf``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.sample import Sample
from .base import ArchAdapter, Batch, Texts, decoder_pattern, pad, register_arch


class LlavaAdapter(ArchAdapter):
    name = "llava"
    model_types = ("llava",)
    # transformers >= 5.6 drops CLIP's ``vision_model.`` level; match both namings.
    vision_pattern = (
        r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\."
        r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)"
    )
    vision_blocks_pattern = r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+"
    projector_pattern = r"model\.multi_modal_projector\.linear_[12]"
    llm_pattern = decoder_pattern(r"model\.language_model")

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def processor_class(self) -> type:
        from transformers import LlavaProcessor

        return LlavaProcessor

    def prompt(self, body: str, has_image: bool) -> str:
        # MLLMU-Bench's evaluation and fine-tuning template for LLaVA-1.5.
        return f"USER: <image>\n{body}\nASSISTANT:" if has_image else f"USER: {body}\nASSISTANT:"

    def encode(
        self, processor, samples: Sequence[Sample], bodies: Texts, answers: Texts | None = None, *, padding_side="right"
    ) -> Batch:
        tok = processor.tokenizer
        prompts = [self.prompt(b, s.image is not None) for s, b in zip(samples, bodies)]
        images = [s.image.load() for s in samples if s.image is not None]
        enc = processor(text=prompts, images=images or None, padding=False)
        ids = [list(x) for x in enc["input_ids"]]
        labels = None
        if answers is not None:
            ans = tok([self.answer_prefix + a.strip() for a in answers], add_special_tokens=False)["input_ids"]
            eos = self.eos_token_id(tok)
            labels = [[-100] * len(p) + a + [eos] for p, a in zip(ids, ans)]
            ids = [p + a + [eos] for p, a in zip(ids, ans)]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        inputs = {
            "input_ids": pad(ids, pad_id, padding_side),
            "attention_mask": pad([[1] * len(x) for x in ids], 0, padding_side),
        }
        if images:
            inputs["pixel_values"] = torch.as_tensor(np.stack(enc["pixel_values"]))
        return Batch(inputs, None if labels is None else pad(labels, -100, padding_side), samples)

    ivr_levels = ("projector", "vision")

    def image_features(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.get_image_features(pixel_values=inputs["pixel_values"])
        return torch.stack(list(out.pooler_output))

    def visual_tokens(self, model: Any, inputs: dict[str, torch.Tensor], level: str = "projector") -> torch.Tensor:
        if level != "vision":
            return super().visual_tokens(model, inputs, level)
        # the CLIP layer LLaVA feeds to the projector, CLS dropped as the projector sees it
        out = model.get_image_features(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        layer = model.config.vision_feature_layer
        return out.hidden_states[layer if isinstance(layer, int) else layer[-1]][:, 1:]


LLAVA = register_arch(LlavaAdapter())
