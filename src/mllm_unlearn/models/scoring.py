"""Scoring helpers written once and used by fine-tuning, every unlearning method and evaluation:
batch encoding, the answer NLL, per-sequence answer log-probabilities, greedy replies and an eval-mode guard.

Several processes: :func:`answer_nll` divides the shard's token sum by the answer-token count of the
GLOBAL batch and multiplies by the number of processes, so that DDP's gradient average is the global
batch's token mean (shards hold different numbers of answer tokens; see
:mod:`mllm_unlearn.runtime.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..data.sample import Sample
from ..runtime import distributed
from .base import Batch
from .loading import LoadedModel


def encode_pairs(lm: LoadedModel, samples: Sequence[Sample]) -> Batch:
    """Question + answer batch (labels on the answer tokens, closing EOS included), on the model's device."""
    return lm.arch.encode(lm.processor, samples, [s.question for s in samples], [s.answer for s in samples]).to(
        lm.model.device
    )


def encode_images(lm: LoadedModel, samples: Sequence[Sample]) -> Batch:
    """Image-only inputs (empty prompt bodies): what the vision tower and projector need."""
    return lm.arch.encode(lm.processor, samples, [""] * len(samples)).to(lm.model.device)


def single_image_inputs(lm: LoadedModel, samples: Sequence[Sample]) -> list[dict[str, torch.Tensor]]:
    """Each sample's image encoded on its own, its pixel entries only (``arch.pixel_keys``). The image
    processors treat images one by one, so :func:`concat_images` of any of them equals their batch
    encoding: encode once, batch any way later."""
    out = []
    for s in samples:
        one = encode_images(lm, [s]).inputs
        out.append({k: one[k] for k in lm.arch.pixel_keys})
    return out


def concat_images(inputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from :func:`single_image_inputs` entries (each key one block of rows per image along dim
    0: LLaVA's (1, C, H, W), Qwen's patch rows and grid row)."""
    return {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}


def image_batches(lm: LoadedModel, samples: Sequence[Sample], batch_size: int = 32) -> list[dict]:
    """:func:`encode_images` over ``samples`` in chunks, as model-input dicts (calibration, probes)."""
    return [encode_images(lm, samples[i : i + batch_size]).inputs for i in range(0, len(samples), batch_size)]


def sequence_logprob(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence SUMMED log-probability of the answer tokens, and the answer lengths |y|.
    ``logits`` / ``targets`` / ``rows`` are answer positions as :meth:`ArchAdapter.answer_logits` gives them."""
    tok = -F.cross_entropy(logits.float(), targets, reduction="none")
    logp = torch.zeros(n, device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)
    return logp, torch.bincount(rows, minlength=n).to(tok.dtype)


def answer_nll(
    lm: LoadedModel, samples: Sequence[Sample], image_features: torch.Tensor | None = None, batch: Batch | None = None
) -> torch.Tensor:
    """Mean answer-token NLL of a batch of training pairs (over the GLOBAL batch's tokens with
    several processes; ``samples`` is then this process's shard). ``batch``: ``samples`` already
    through :func:`encode_pairs`; ``image_features``: their projector outputs when already computed
    (:meth:`ArchAdapter.answer_logits`)."""
    batch = encode_pairs(lm, samples) if batch is None else batch
    logits, targets, _ = lm.arch.answer_logits(lm.model, batch, image_features)
    if distributed.world_size() == 1:
        return F.cross_entropy(logits.float(), targets)
    token_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return token_sum * distributed.world_size() / distributed.total(targets.numel())


def answer_logprobs(
    lm: LoadedModel,
    samples: Sequence[Sample],
    bodies: Sequence[str],
    answers: Sequence[str],
    *,
    length_norm: bool = False,
) -> torch.Tensor:
    """Log-probability of each answer (its tokens and the closing EOS) given its prompt body, per
    sample; ``length_norm`` divides by the answer's token count. Differentiable: wrap in ``no_grad``
    to score."""
    batch = lm.arch.encode(lm.processor, samples, bodies, answers).to(lm.model.device)
    logits, targets, rows = lm.arch.answer_logits(lm.model, batch)
    logp, lengths = sequence_logprob(logits, targets, rows, len(samples))
    return logp / lengths if length_norm else logp


@torch.no_grad()
def generate(lm: LoadedModel, samples: Sequence[Sample], bodies: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy replies, one per sample (left-padded batch)."""
    batch = lm.arch.encode(lm.processor, samples, bodies, padding_side="left").to(lm.model.device)
    out = lm.model.generate(
        **batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.processor.tokenizer.pad_token_id
    )
    new = out[:, batch.inputs["input_ids"].shape[1] :]
    return [t.strip() for t in lm.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` inside the block, its previous mode restored after it, also on an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
