"""MMUnlearner (Huo et al. 2025, "MMUnlearner: reformulating multimodal machine unlearning in the era of
multimodal large language models"): geometry-constrained gradient ascent with a weight-saliency mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.sample import Sample
from ..nullspace import trainable_parameters
from .base import UnlearnContext, register
from .baseline import Baseline, BaselineConfig, select, subsample
from .losses import fisher_mask, ga_loss


@dataclass
class MMUnlearnerConfig(BaselineConfig):
    forget_modality: str = "vqa"
    threshold: float = 1.0  # mask = F_f / F_p >= threshold
    preserve_forget_text: bool = True  # the preserve set holds the forget people's text-only pairs too
    fisher_samples: int = 256  # at most this many samples per set for the Fisher estimate (0 = all)


@register
class MMUnlearner(Baseline):
    """Setup: diagonal Fisher (squared gradients, averaged over batches) of the forget NLL, F_f, and of
    a preserve-set NLL, F_p, w.r.t. the trainable parameters; mask = F_f / F_p >= threshold (1).
    Training alternates by step parity: even steps are forget steps, loss -NLL(forget) with the
    gradient multiplied by the mask (parameter hooks registered here; the loop then clips the
    gradient norm to 1.0, as the public code), odd steps plain NLL(preserve).

    Choices:
    - Data: MMUnlearner forgets the *visual* pattern of a concept while keeping its textual
      knowledge, so D_f = the forget people's questions with the image (``forget_modality="vqa"``)
      and the preserve set = retain pairs + the forget people's text-only pairs
      (``preserve_forget_text``).
    - Scope ``all`` by default: the paper masks the vision tower + projector and the LLM (a vision
      mask and a language mask; with one global threshold they are the same rule). ``llm`` would
      reduce it to a language-only SalUn; App. D.2's variant is ``--scope visual``.
    - With LoRA the mask is over the LoRA parameters' gradients, not the base weights (the public
      code masks full weights). LoRA starts with B = 0, so every A has zero gradient when the mask
      is computed: F_f = 0 there and A is masked out of the forget steps (it still trains on the
      preserve steps); the forget steps move B where the forget saliency dominates.
    - One AdamW serves both step kinds, so a masked-out weight can still drift on a forget step
      from the momentum of earlier preserve steps; its forget *gradient* is zero.
    """

    name = "mmunlearner"
    config_class = MMUnlearnerConfig
    default_scope = "all"

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._masking = False

    def preserve(self, ctx: UnlearnContext) -> list[Sample]:
        forget_text = self.cfg.preserve_forget_text and not self.visual_only
        return self.pairs(ctx.retain) + (select(ctx.forget, "qa") if forget_text else [])

    def _fisher(
        self, ctx: UnlearnContext, params: dict[str, torch.nn.Parameter], samples: Sequence[Sample]
    ) -> dict[str, torch.Tensor]:
        samples = subsample(samples, self.cfg.fisher_samples, ctx.seed)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        n_batches = 0
        for i in range(0, len(samples), ctx.batch_size):
            grads = torch.autograd.grad(
                ctx.nll(samples[i : i + ctx.batch_size]), list(params.values()), allow_unused=True
            )
            for n, g in zip(params, grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            n_batches += 1
        return {n: f / max(1, n_batches) for n, f in fisher.items()}

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        for handle in self._handles:  # a new forget request (continual mode) gets a new mask
            handle.remove()
        self._handles, self._masking = [], False
        trainable = {id(p) for p in trainable_parameters(ctx.lm.model)}
        params = {n: p for n, p in ctx.lm.model.named_parameters() if id(p) in trainable}
        forget = self.pairs(ctx.forget, self.cfg.forget_modality)
        f_forget = self._fisher(ctx, params, forget)
        f_preserve = self._fisher(ctx, params, self.preserve(ctx))
        self.masks = {
            n: fisher_mask(f_forget[n], f_preserve[n], self.cfg.threshold).to(p.dtype) for n, p in params.items()
        }
        for n, p in params.items():
            self._handles.append(p.register_hook(lambda g, m=self.masks[n]: g * m if self._masking else g))
        self.mask_fraction = sum(m.sum().item() for m in self.masks.values()) / sum(
            m.numel() for m in self.masks.values()
        )

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._masking = step % 2 == 0  # read by the hooks during the loop's backward of this loss
        if self._masking:
            nll_f = ctx.nll(self.forget_batch(ctx))
            return ga_loss(nll_f), {"forget_nll": nll_f.item(), "mask_fraction": self.mask_fraction}
        nll_p = ctx.nll(ctx.stream("preserve", lambda: self.preserve(ctx)))
        return nll_p, {"preserve_nll": nll_p.item(), "mask_fraction": self.mask_fraction}
