"""Per-architecture adapters: the only place that knows how a model family lays out its modules.

An :class:`ArchAdapter` says which class loads the checkpoint, how a question becomes a prompt, how a
batch of samples becomes model inputs (with answer-only labels), where the vision module and the
projector are, and how to get per-image visual representations. Everything else in the package is
architecture-agnostic and goes through an adapter picked from a small registry by ``model_type``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..data.sample import Sample

#: prompt bodies or answers, one per sample
Texts = Sequence[str]

_REGISTRY: dict[str, ArchAdapter] = {}


def register_arch(adapter: ArchAdapter) -> ArchAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_archs() -> list[str]:
    return sorted({a.name for a in _REGISTRY.values()})


def get_arch(name_or_model_type: str) -> ArchAdapter:
    """The adapter for an architecture name (``llava``) or a config ``model_type``."""
    for adapter in _REGISTRY.values():
        if name_or_model_type == adapter.name:
            return adapter
    if name_or_model_type in _REGISTRY:
        return _REGISTRY[name_or_model_type]
    raise ValueError(f"unknown architecture {name_or_model_type!r}; supported: {', '.join(supported_archs())}")


def pad(seqs: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    """Rows of different lengths as one rectangular int64 tensor, filled up with ``value`` on ``side``
    (``"right"`` to train and score, ``"left"`` to generate)."""
    width = max(len(s) for s in seqs)
    rows = [
        list(s) + [value] * (width - len(s)) if side == "right" else [value] * (width - len(s)) + list(s) for s in seqs
    ]
    return torch.tensor(rows, dtype=torch.long)


def decoder_pattern(prefix: str) -> str:
    r"""Anchored regex over the attention and MLP Linears of a Llama-style decoder whose layers are
    ``{prefix}.layers.N`` (``prefix`` itself a regex, e.g. ``r"model\.language_model"``)."""
    return (
        rf"{prefix}\.layers\.\d+\."
        r"(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))"
    )


@dataclass
class Batch:
    """Model inputs for a list of samples. ``labels`` is -100 except on answer tokens."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    samples: Sequence[Sample]

    def to(self, device: torch.device | str) -> Batch:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels.to(device)
        return Batch(inputs, labels, self.samples)


class ArchAdapter:
    """Base class. Subclasses set the class attributes and implement the abstract methods."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    #: anchored full-path regexes (as PEFT ``target_modules`` strings are re.fullmatch'ed)
    vision_pattern: str = ""
    projector_pattern: str = ""
    llm_pattern: str = ""
    #: anchored regex of the vision encoder's blocks (transformer layers), numbered in order
    vision_blocks_pattern: str = ""

    def model_class(self) -> type:
        raise NotImplementedError

    def processor_class(self) -> type:
        raise NotImplementedError

    #: what separates the prompt from the answer text (LLaVA: a space after "ASSISTANT:")
    answer_prefix: str = " "

    # -- prompts -------------------------------------------------------------------------------
    def prompt(self, body: str, has_image: bool) -> str:
        """The full prompt text up to where the answer starts."""
        raise NotImplementedError

    def eos_token_id(self, tokenizer: Any) -> int:
        """The token that closes an answer (training labels end with it)."""
        return tokenizer.eos_token_id

    # -- batches -------------------------------------------------------------------------------
    def encode(
        self, processor, samples: Sequence[Sample], bodies: Texts, answers: Texts | None = None, *, padding_side="right"
    ) -> Batch:
        """Tokenise prompts (and answers, with answer-only labels ending in EOS) into a batch."""
        raise NotImplementedError

    # -- module layout -------------------------------------------------------------------------
    def vision_blocks(self, model: Any) -> list[torch.nn.Module]:
        """The vision encoder's blocks in order (e.g. to read a middle layer's hidden states with
        :func:`block_outputs`); ``model`` may be PEFT-wrapped."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        blocks = [m for n, m in base.named_modules() if re.fullmatch(self.vision_blocks_pattern, n)]
        if not blocks:
            raise ValueError(f"no vision blocks matching {self.vision_blocks_pattern!r} in this {self.name} model")
        return blocks

    def scope_pattern(self, scope: str) -> str:
        """Anchored regex over module paths for an update scope: llm, visual, projector, all."""
        patterns = {
            "llm": self.llm_pattern,
            "visual": f"(?:{self.vision_pattern})|(?:{self.projector_pattern})",
            "projector": self.projector_pattern,
            "all": f"(?:{self.vision_pattern})|(?:{self.projector_pattern})|(?:{self.llm_pattern})",
        }
        if scope not in patterns:
            raise ValueError(f"unknown scope {scope!r}; expected one of {sorted(patterns)}")
        return patterns[scope]

    def answer_logits(
        self, model: Any, batch: Batch, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at the answer positions only, their target ids, and each position's row in the batch.

        Projecting to the vocabulary only where a label exists is much cheaper than the full
        ``logits`` of a causal-LM forward (most positions are prompt and image tokens).
        ``image_features``: the batch images' projector outputs (images, tokens, d), e.g. from
        :meth:`image_features` on the same images; given, the visual module is not run
        (:meth:`inputs_with_image_features`) and the logits equal those from the pixels.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inputs = (
            batch.inputs if image_features is None else self.inputs_with_image_features(base, batch, image_features)
        )
        hidden = base.model(**inputs).last_hidden_state[:, :-1]
        targets = batch.labels[:, 1:]
        mask = targets != -100
        rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[mask]
        return base.lm_head(hidden[mask]), targets[mask], rows

    #: the model's inputs the LLM needs besides ``inputs_embeds`` when the image features are given
    keep_with_embeds: tuple[str, ...] = ("attention_mask",)

    def inputs_with_image_features(self, model: Any, batch: Batch, features: torch.Tensor) -> dict[str, Any]:
        """The inputs of ``model.model`` (the multimodal backbone) with the image features already in
        place: the token embeddings with each image token's row replaced by the next feature row, in
        order (what the backbone does with its own ``get_image_features`` output), and no pixels."""
        ids = batch.inputs["input_ids"]
        embeds = model.model.get_input_embeddings()(ids)
        mask = ids == model.config.image_token_id
        rows = features.reshape(-1, features.shape[-1])
        if int(mask.sum()) != rows.shape[0]:
            raise ValueError(
                f"{int(mask.sum())} image tokens in the batch but {rows.shape[0]} feature rows "
                f"({tuple(features.shape)}): the features must be those of the batch's images, in order"
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), rows.to(embeds.device, embeds.dtype))
        return {"inputs_embeds": embeds, **{k: v for k, v in batch.inputs.items() if k in self.keep_with_embeds}}

    def image_features(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-image projector outputs (the LLM's visual input tokens), shape (images, tokens, d)."""
        raise NotImplementedError

    #: the entries of an encoded batch that carry its images, one block of rows per image along dim 0
    #: (:meth:`image_features` needs only these)
    pixel_keys: tuple[str, ...] = ("pixel_values",)

    #: IVR levels :meth:`visual_tokens` offers
    ivr_levels: tuple[str, ...] = ("projector",)

    def visual_tokens(self, model: Any, inputs: dict[str, torch.Tensor], level: str = "projector") -> torch.Tensor:
        """Token-level intermediate visual representations (IVRs) at ``level``: ``projector`` = the
        visual module's output, i.e. the LLM's input (the paper's choice); other levels per family."""
        if level not in self.ivr_levels:
            raise ValueError(f"IVR level {level!r} not available for {self.name}; choose from {self.ivr_levels}")
        return self.image_features(model, inputs)


@contextmanager
def block_outputs(module: torch.nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """The output hidden states of every forward of ``module`` while inside, in order (the first tensor
    when a block returns a tuple; with their graph, when computed with one). ``None``: records nothing."""
    seen: list[torch.Tensor] = []
    if module is None:
        yield seen
        return
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield seen
    finally:
        handle.remove()
