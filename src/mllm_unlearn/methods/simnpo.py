"""SimNPO (Fan et al. 2024, "Simplicity prevails: rethinking negative preference optimization"), an extra
baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.scoring import encode_pairs, sequence_logprob
from .base import UnlearnContext, register
from .baseline import Baseline, BaselineConfig
from .losses import simnpo_loss


@dataclass
class SimNPOConfig(BaselineConfig):
    beta: float = 4.5  # SimNPO's inverse temperature
    delta: float = 0.0  # reward margin
    retain_weight: float = 1.0


@register
class SimNPO(Baseline):
    """loss = -(2/beta) * mean log sigmoid(beta * (NLL_sum(y|x)/|y| - delta)) + w * NLL(retain),
    beta = 4.5, delta = 0 (open-unlearning's defaults). Reference-free: the length-normalised NLL
    replaces NPO's log-ratio. w = 1 as for NPO (open-unlearning also weights the forget term by
    gamma = 0.125; we keep it at 1 like the other baselines' forget terms).
    """

    name = "simnpo"
    config_class = SimNPOConfig

    def loss(self, ctx: UnlearnContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        forget = self.forget_batch(ctx)
        logp, lengths = sequence_logprob(
            *ctx.lm.arch.answer_logits(ctx.lm.model, encode_pairs(ctx.lm, forget)), len(forget)
        )
        forget_term = simnpo_loss(-logp, lengths, self.cfg.beta, self.cfg.delta)
        retain_term = self.retain_term(ctx, self.cfg.retain_weight)
        return forget_term + retain_term, {"simnpo": forget_term.item(), "retain_nll": retain_term.item()}
