"""What the baselines the paper compares against (Sec. 4.1, App. D.2, D.4) share: their config, the
forget / retain batch streams and the reference model's logits. Each baseline is one module of this
package (``ga``, ``ga_diff``, ``kl_min``, ``npo``, ``simnpo``, ``mmunlearner``, ``manu``, ``siu``) that
only defines its loss (or, for MANU, its one-off weight edit); the math of each loss is a pure tensor
function in :mod:`.losses`; the driver (:mod:`mllm_unlearn.train.unlearn`) puts LoRA on the update
scope and runs the shared loop.

Notation: NLL(D) = mean answer-token negative log-likelihood of a batch of D (labels on the answer
only); logp(y|x) = per-sequence SUMMED answer log-probability; "ref" = the model before unlearning,
i.e. the same model with its adapters disabled (:func:`~mllm_unlearn.nullspace.reference_model`).

Shared choices:

- Scope and subspace: LoRA on the LLM (``default_scope = "llm"``) and plain LoRA
  (``default_subspace = "none"``), as the baselines' public codes (MLLMU-Bench, open-unlearning),
  except MMUnlearner and MANU whose papers edit the vision side and the LLM (``all``).
  ``--scope visual`` gives App. D.2's variants.
- Learning rate ``BASELINE_LR = 1e-3``. The public configs use 1e-5..2e-5 for 7B models, and the
  same rate as their memorisation fine-tune (MLLMU-Bench: 2e-5 for both). Our tiny models are
  memorised at 1e-3 (``experiments/demo.py``), so the same relation gives 1e-3; 2e-5 would move a
  tiny model's LoRA by ~1e-2 per coordinate in 300 Adam steps, i.e. not at all. For real 7B
  checkpoints pass ``--lr 2e-5``. Nothing was tuned for any method.
- Forget data: every training pair of the forget people (questions with and without the image,
  ``forget_modality="all"``), as the public codes unlearn the forget split's fine-tune data;
  ``vqa`` / ``qa`` restrict it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.sample import Sample
from ..models.base import Batch
from ..models.loading import LoadedModel
from ..nullspace import lora_layers, reference_model
from .base import UnlearnContext, UnlearningMethod

BASELINE_LR = 1e-3
#: which forget training pairs a baseline unlearns on: all, with the image (vqa), text-only (qa)
FORGET_MODALITIES = ("all", "vqa", "qa")


def subsample(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` of the samples (0 = all), drawn with a seeded generator."""
    samples = list(samples)
    return random.Random(seed).sample(samples, limit) if 0 < limit < len(samples) else samples


def select(samples: Sequence[Sample], modality: str) -> list[Sample]:
    """The samples of a modality (``vqa``: with the image, ``qa``: text only, ``all``)."""
    if modality not in FORGET_MODALITIES:
        raise ValueError(f"modality must be one of {FORGET_MODALITIES}, not {modality!r}")
    return [s for s in samples if modality == "all" or s.modality == modality]


@dataclass
class BaselineConfig:
    forget_modality: str = "all"  # which forget training pairs to unlearn on: all | vqa | qa

    def __post_init__(self) -> None:
        if self.forget_modality not in FORGET_MODALITIES:
            raise ValueError(f"forget_modality must be one of {FORGET_MODALITIES}, not {self.forget_modality!r}")


class Baseline(UnlearningMethod):
    """Shared plumbing: the forget / retain batch streams and the reference model's logits.

    With a visual-only update scope (``visual``, ``projector``) text-only pairs never reach the
    adapters: their NLL is a constant (a batch of them would have no gradient at all), so the
    streams then keep only the pairs asked with the image.
    """

    config_class = BaselineConfig
    default_scope = "llm"
    default_subspace = "none"
    default_lr = BASELINE_LR
    #: a separately loaded reference model (NPO's ``reference_model_path``); None = adapters disabled
    ref_lm: LoadedModel | None = None
    #: set by :meth:`setup`: every adapter is in the vision tower / projector
    visual_only: bool = False

    def setup(self, ctx: UnlearnContext) -> None:
        visual = ctx.lm.arch.scope_pattern("visual")
        self.visual_only = all(re.fullmatch(visual, n) for n in lora_layers(ctx.lm.model))

    def pairs(self, samples: Sequence[Sample], modality: str = "all") -> list[Sample]:
        """The samples of ``modality`` that can carry a gradient under the update scope."""
        if self.visual_only and modality == "qa":
            raise ValueError("text-only pairs cannot reach adapters on the visual module only")
        return select(samples, "vqa" if self.visual_only else modality)

    def forget_batch(self, ctx: UnlearnContext) -> list[Sample]:
        mod = self.cfg.forget_modality
        return ctx.stream(f"forget_{mod}", lambda: self.pairs(ctx.forget, mod))

    def retain_batch(self, ctx: UnlearnContext) -> list[Sample]:
        return ctx.stream("retain", lambda: self.pairs(ctx.retain))

    def retain_term(self, ctx: UnlearnContext, weight: float) -> torch.Tensor:
        """``weight`` * NLL(retain batch); no forward (and a zero) when the weight is 0."""
        return weight * ctx.nll(self.retain_batch(ctx)) if weight else torch.zeros((), device=ctx.lm.model.device)

    def reference_logits(self, ctx: UnlearnContext, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Answer logits, targets and rows of the reference model (no gradient)."""
        with torch.no_grad():
            if self.ref_lm is not None:
                return ctx.lm.arch.answer_logits(self.ref_lm.model, batch)
            with reference_model(ctx.lm.model):
                return ctx.lm.arch.answer_logits(ctx.lm.model, batch)
